"""Workload: what a training step does (batch, sequence, dtypes, optimizer)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from planner.errors import SpecError

_POS = {"positive": True}
DType = Literal["bf16", "fp16", "fp32"]
OptimizerKind = Literal["adamw", "sgd", "galore", "natural_galore", "frugal"]
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    kind: OptimizerKind = "adamw"
    lr: float = field(default=1e-4, metadata=_POS)
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata=_POS)
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    # GaLore / Natural GaLore / FRUGAL: rank of the projected (state-full) subspace
    rank: int = field(default=128, metadata=_POS)
    update_proj_gap: int = field(default=200, metadata=_POS)
    # FRUGAL: share of each weight updated by the state-full optimizer
    density: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0})

    @property
    def low_rank(self) -> bool:
        return self.kind in ("galore", "natural_galore", "frugal")


@dataclass(frozen=True, kw_only=True)
class Workload:
    global_batch: int = field(metadata=_POS)  # sequences per optimizer step, all ranks
    micro_batch: int = field(default=1, metadata=_POS)  # sequences per rank per forward
    seq_len: int = field(metadata=_POS)
    dtype: DType = "bf16"  # bf16/fp16: mixed precision with fp32 master weights; fp32: plain fp32
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    flash_attention: bool = True  # fused attention kernel: no s x s score matrix kept
    headroom: float = field(default=0.05, metadata={"min": 0.0, "max": 0.9})  # device memory kept free
    # global-norm gradient clipping (Pascanu et al. 2013), 0 = off; the Plan's optimizer carries it
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0})

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def mixed_precision(self) -> bool:
        return self.dtype != "fp32"

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def replace(self, **changes: Any) -> Workload:
        return dataclasses.replace(self, **changes)

    def check_batch(self, dp: int) -> int:
        """Gradient accumulation steps for `dp` replicas; the arithmetic is printed when it fails."""
        per_step = self.micro_batch * dp
        if self.global_batch % per_step:
            raise SpecError(
                f"global_batch({self.global_batch}) % (micro_batch({self.micro_batch}) * dp({dp})) = "
                f"{self.global_batch % per_step} != 0",
                field="global_batch",
            )
        return self.global_batch // per_step
