"""The planner's MIPs (PuLP + CBC) and the baselines they must match or beat.

- `planner.mip.activations`: per-layer keep / swap / recompute shares (MEMO's token-wise swap and recompute).
- `planner.mip.buffers`: offsets of one block's tensors in a reuse arena (MEMO's bi-level MIP, first level).
- `planner.mip.common`: solver settings, one solve call, typed outcome.
"""

from planner.mip.common import MipOutcome, MipSettings, SolverStatus

__all__ = ["MipOutcome", "MipSettings", "SolverStatus"]
