"""memtier benchmarks: one script per question; results as JSON + PNG under benchmarks/results/."""
