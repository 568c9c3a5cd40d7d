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
# "mixed": 16-bit working weights and gradients with an fp32 master copy and fp32 moments (Micikevicius et
# al. 2018; the ZeRO paper's K = 12 for Adam); "pure": weights, gradients and moments all in the working
# dtype, no master copy (what a plain torch AdamW on bf16 parameters does: 4 B/param of Adam state, measured
# on an H100, README "Measured on a GPU"). Pure saves 8 B/param (Adam) but updates smaller than a bf16 ulp
# of the weight are lost (Zamirai et al. 2020, "Revisiting BFloat16 Training"): the trade-off is accuracy.
Precision = Literal["mixed", "pure"]
# Optimizer-state bits: 0 = the precision's dtype (fp32 in mixed, the working dtype in pure); 8 or 4 =
# block-quantized moments (bitsandbytes' 8-bit blockwise Adam, Dettmers et al. 2022; torchao's 4-bit Adam)
StateBits = Literal[0, 8, 4]


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
    # moments stored in 8 or 4 bits per element (0: not quantized); see `StateBits`
    state_bits: StateBits = 0

    @property
    def low_rank(self) -> bool:
        return self.kind in ("galore", "natural_galore", "frugal")


@dataclass(frozen=True, kw_only=True)
class Workload:
    # sequences per optimizer step, all ranks (at most 2**31: far beyond any real step, and it keeps the
    # search's enumeration of batch divisors bounded)
    global_batch: int = field(metadata={"positive": True, "max": 2**31})
    micro_batch: int = field(default=1, metadata=_POS)  # sequences per rank per forward
    seq_len: int = field(metadata=_POS)
    dtype: DType = "bf16"  # working dtype of weights, activations and gradients
    precision: Precision = "mixed"  # bf16/fp16 only: fp32 master + fp32 moments, or none (`Precision`)
    # layer-wise (per-parameter) optimizer updates: each parameter is stepped in its post-accumulate-grad
    # hook and its gradient freed (GaLore, Zhao et al. 2024, Sec. 4.3); no global-norm clipping then
    layerwise: bool = False
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    flash_attention: bool = True  # fused attention kernel: no s x s score matrix kept
    headroom: float = field(default=0.05, metadata={"min": 0.0, "max": 0.9})  # device memory kept free
    # global-norm gradient clipping (Pascanu et al. 2013), 0 = off; the Plan's optimizer carries it
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0})
    # LoRA (Hu et al. 2021): rank of the adapters on `lora_targets` (HF module names, PEFT's
    # `target_modules`); 0 = full fine-tuning. The base weights are frozen: no gradients, no optimizer
    # state, no weight-gradient GEMMs for them (`planner.lora`)
    lora_rank: int = field(default=0, metadata={"min": 0})
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # the blocks run under `torch.compile` with this backend ("": eagerly); the planner costs them with the
    # probed compile factors (`DeviceSpec.compile_*`), `offload.apply` compiles them with their decisions
    compile: str = ""
    # AOTAutograd's min-cut partitioner budget inside each compiled block
    # (`torch._functorch.config.activation_memory_budget`); None: torch's own setting
    compile_memory_budget: float | None = None

    def __post_init__(self) -> None:
        b = self.compile_memory_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, int | float) or not 0.0 <= b <= 1.0):
            raise SpecError(f"must be a share in [0, 1] or null, got {b!r}", field="compile_memory_budget")
        if b is not None and not self.compile:
            raise SpecError(
                "a partitioner budget needs compile (a backend name)", field="compile_memory_budget"
            )

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def mixed_precision(self) -> bool:
        """An fp32 master copy beside 16-bit working weights."""
        return self.dtype != "fp32" and self.precision == "mixed"

    @property
    def state_dtype_bytes(self) -> int:
        """Bytes per element of unquantized optimizer moments: fp32, or the working dtype in pure mode."""
        return self.dtype_bytes if self.precision == "pure" else DTYPE_BYTES["fp32"]

    def mode(self) -> str:
        """The memory mode in words: precision, state bits, layer-wise updates."""
        prec = "fp32" if self.dtype == "fp32" else f"{self.dtype} {self.precision}"
        bits = f", {self.optimizer.state_bits}-bit states" if self.optimizer.state_bits else ""
        lora = f", LoRA r={self.lora_rank} on {','.join(self.lora_targets)}" if self.lora else ""
        b = self.compile_memory_budget
        compiled = (
            f", compiled ({self.compile}{f', partitioner {b:g}' if b is not None else ''})"
            if self.compile
            else ""
        )
        return f"{prec}{bits}{', layer-wise' if self.layerwise else ''}{lora}{compiled}"

    @property
    def lora(self) -> bool:
        """Only LoRA adapters train (`lora_rank` > 0)."""
        return self.lora_rank > 0

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


def low_bit_runs_on(device_kind: str, bits: int) -> bool:
    """Whether a kept library runs `bits`-bit optimizer states on the device: bitsandbytes' 8-bit Adam on
    CUDA and (its CPU backend, bitsandbytes >= 0.45) on the CPU; torchao's 4-bit Adam on CUDA only."""
    return bits == 8 or (bits == 4 and device_kind != "cpu")


def memory_modes(
    workload: Workload,
    *,
    precision: tuple[Precision, ...],
    layerwise: tuple[bool, ...],
    state_bits: tuple[StateBits, ...],
    device_kind: str,
) -> tuple[Workload, ...]:
    """The workload under each asked-for memory mode the device can run, most exact first (mixed before
    pure, 32-bit before 8 before 4, whole-step before layer-wise): ties go to the more exact mode.

    fp32 has no master copy to drop (one precision); layer-wise updates turn global clipping off (each
    parameter is stepped before the other gradients exist); SGD has no quantized variant here."""
    out: list[Workload] = []
    for prec in precision if workload.dtype != "fp32" else ("mixed",):
        for bits in state_bits:
            # (LoRA's few adapter states are planned unquantized: `planner.lora.check_lora`)
            sgd_or_lora = workload.optimizer.kind == "sgd" or workload.lora
            if bits and (sgd_or_lora or not low_bit_runs_on(device_kind, bits)):
                continue
            for lw in layerwise:
                w = workload.replace(
                    precision=prec,
                    layerwise=lw,
                    max_grad_norm=0.0 if lw else workload.max_grad_norm,
                    optimizer=dataclasses.replace(workload.optimizer, state_bits=bits),
                )
                if w not in out:
                    out.append(w)
    return tuple(out)


def partitioner_modes(workload: Workload, probed: tuple[float, ...]) -> tuple[Workload, ...]:
    """`workload` at each `probed` partitioner budget (highest first: least recompute wins a tie) where it is
    compiled and leaves the budget open; else `workload` alone. `probed`: `DeviceSpec.partitioner_budgets`."""
    if not workload.compile or workload.compile_memory_budget is not None or not probed:
        return (workload,)
    return tuple(workload.replace(compile_memory_budget=b) for b in sorted(probed, reverse=True))
