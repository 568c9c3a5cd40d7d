"""Measurement on this machine: `memtier probe` (probe), `memtier bench` (mfu: the MFU runner, its strategies,
jobs, report and calibration) and what every measurement records beside its numbers (record)."""
