"""The activation planner's records and the cost model every strategy is scored by.

`LayerCost` (one block, from the cost model), `ActivationBudget` (the device bytes and the one swap tier),
`ActivationSettings` and `ActivationSolution` (what every strategy returns); `evaluate_fractions` prices
per-layer keep/swap/recompute fractions (`_cost`, which the MIP in `planner.mip.activations` writes in linear
form). The strategies live in `planner.mip.activation_baselines` and `planner.mip.activations`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from planner.errors import SpecError
from planner.mip.common import MipSettings, SolverStatus
from planner.plan import ActivationPolicy, SolverReport, TierName

RecomputeGranularity = Literal["layer", "token"]
GRANULARITIES: tuple[RecomputeGranularity, ...] = ("layer", "token")

# A plan fits when its bytes are within this share of the budget (plus one byte): the
# fractions read back from the solver are feasible to its ~1e-7 tolerance, far below what a
# runtime can realise anyway (one token of 32k is 3e-5 of a block).
FIT_TOL_REL = 1e-6


class ActivationInputError(SpecError):
    """A layer cost or budget that cannot be planned (names the field)."""


def _check_integers(record: object, names: Sequence[str], *, unit: str) -> None:
    """Every field of `record` in `names` is an integer >= 0 (`unit` ends the message: "", " bytes")."""
    for name in names:
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ActivationInputError(f"must be an integer >= 0{unit}, got {value!r}", field=name)


def _finite_non_negative(value: object) -> bool:
    """A real number (not a bool), finite and >= 0."""
    return (
        not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value >= 0
    )


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """What one transformer block costs, as the planner's cost model predicts it."""

    layer: int  # block index, in forward order
    act_bytes: int  # bytes the block saves for backward (including its input)
    input_bytes: int  # bytes a recomputed block keeps: its input hidden states
    fwd_time_s: float  # forward compute time, seconds
    bwd_time_s: float  # backward compute time (without recompute), seconds
    recompute_time_s: float  # time to rerun the whole block's forward during backward, seconds
    # bytes the rest of the step holds while this block runs its backward beyond what the budget already
    # leaves out for every block (without an offloaded optimizer: the gradients of the blocks after it)
    backward_extra_bytes: int = 0

    def __post_init__(self) -> None:
        _check_integers(self, ("layer", "act_bytes", "input_bytes", "backward_extra_bytes"), unit="")
        for name in ("fwd_time_s", "bwd_time_s", "recompute_time_s"):
            value = getattr(self, name)
            if not _finite_non_negative(value):
                raise ActivationInputError(f"must be a finite number >= 0 seconds, got {value!r}", field=name)


@dataclass(frozen=True, kw_only=True)
class ActivationBudget:
    """The memory and the one swap tier the activations may use."""

    device_bytes: int  # device bytes available to saved activations (after weights, grads, workspace)
    tier_capacity_bytes: int = 0  # bytes of the swap tier available to activations (0: no swapping)
    tier_write_bps: float = 0.0  # device -> tier bandwidth, bytes/s (swap-out)
    tier_read_bps: float = 0.0  # tier -> device bandwidth, bytes/s (swap-in)
    tier: TierName = "dram"  # the one tier every swapped share goes to
    # bytes alive at the loss (after the last block's forward, before any block's backward)
    # besides the blocks' resident shares: the logits and the loss's backward buffers
    tail_bytes: int = 0
    # share of the neighbouring block's compute a transfer can hide behind, in [0, 1]: 1 on an accelerator
    # (a copy engine moves the bytes while the SMs compute), 0 where the copy runs on the cores that compute
    # (a CPU "device": see `transfer_overlap`), so every swapped byte adds its copy time to the step
    transfer_overlap: float = 1.0
    # whether block l-1's swapped share is fetched ahead during block l's backward (ActivationPolicy.prefetch;
    # see `prefetch_helps`). Off, block l-1's share is on the device only while its swap-out runs in block
    # l's forward, a moment that lacks the backward's temporaries: `forward_slack_bytes` (the bytes the
    # backward moment holds beyond the forward one, which `device_bytes` was net of)
    prefetch: bool = True
    forward_slack_bytes: int = 0
    # the runtime's MemoryOptions.swap_out_early: a swapped block's copy to the tier completes before the next
    # block's activations build up, so no swapped block is in flight during the forward or at the loss
    swap_out_early: bool = False

    def __post_init__(self) -> None:
        _check_integers(
            self, ("device_bytes", "tier_capacity_bytes", "tail_bytes", "forward_slack_bytes"), unit=" bytes"
        )
        for name in ("tier_write_bps", "tier_read_bps"):
            value = getattr(self, name)
            if not _finite_non_negative(value):
                raise ActivationInputError(f"must be a finite number >= 0 bytes/s, got {value!r}", field=name)
            if self.tier_capacity_bytes > 0 and value <= 0:
                raise ActivationInputError(
                    f"must be > 0 when tier_capacity_bytes({self.tier_capacity_bytes}) > 0, got {value!r}",
                    field=name,
                )
        if self.tier == "device":
            raise ActivationInputError("the swap tier cannot be the device itself", field="tier")
        x = self.transfer_overlap
        if isinstance(x, bool) or not isinstance(x, int | float) or not (math.isfinite(x) and 0 <= x <= 1):
            raise ActivationInputError(f"must be a number in [0, 1], got {x!r}", field="transfer_overlap")

    @property
    def can_swap(self) -> bool:
        return self.tier_capacity_bytes > 0 and self.tier_write_bps > 0 and self.tier_read_bps > 0


@dataclass(frozen=True, kw_only=True)
class ActivationSettings:
    recompute_granularity: RecomputeGranularity = "layer"  # "layer": r_l in {0,1}; "token": r_l in [0,1]
    # 5 s: an 80-layer plan returns well within 10 s even when the solver stops at its limit;
    # gap 1e-3 of the *added* step time (a few ms on a multi-second step)
    mip: MipSettings = field(default_factory=lambda: MipSettings(time_limit_s=5.0, gap_rel=1e-3))

    def __post_init__(self) -> None:
        if self.recompute_granularity not in GRANULARITIES:
            raise ActivationInputError(
                f"expected one of {GRANULARITIES}, got {self.recompute_granularity!r}",
                field="recompute_granularity",
            )


@dataclass(frozen=True, kw_only=True)
class ActivationSolution:
    """One strategy's per-layer policy and what it costs; the same type for the MIP and the baselines."""

    strategy: str  # "mip", "greedy", "keep_all", "recompute_all"
    status: SolverStatus
    policies: tuple[ActivationPolicy, ...]  # one per layer, in forward order (empty when infeasible)
    objective_s: float  # step time the policy adds: recompute_s + exposed_transfer_s, seconds
    device_bytes: int  # peak device bytes of saved activations (max over layers, see `layer_peaks`);
    # a fitting plan is within FIT_TOL_REL (1 ppm) of the budget
    tier_bytes: int  # bytes on the swap tier at the end of the forward
    gap: float | None  # relative optimality gap; None for heuristics (no bound)
    seconds: float  # wall-clock seconds this strategy took
    shortfall_bytes: int = 0  # when infeasible: device bytes missing for the least-memory plan
    recompute_s: float = 0.0  # seconds of recompute in backward
    exposed_transfer_s: float = 0.0  # seconds of swap transfer not hidden behind compute

    @property
    def fits(self) -> bool:
        return self.status != "infeasible"

    def report(self) -> SolverReport:
        """The line this solve adds to `Plan.predicted.solvers`."""
        return SolverReport(
            problem="activations",
            strategy=self.strategy,
            status=self.status,
            objective=self.objective_s,
            gap=self.gap,
            seconds=self.seconds,
        )


@dataclass(frozen=True)
class _Instance:
    """The inputs as arrays, in forward order; windows are the compute a transfer can hide behind."""

    costs: tuple[LayerCost, ...]
    act: np.ndarray  # bytes saved by block l
    inp: np.ndarray  # bytes a recomputed block l keeps
    extra: (
        np.ndarray
    )  # bytes the rest of the step adds during block l's backward (LayerCost.backward_extra_bytes)
    rc: np.ndarray  # recompute seconds of block l
    out_window: np.ndarray  # forward seconds of block l+1 (swap-out of l overlaps it); 0 for the last
    bwd_next: (
        np.ndarray
    )  # backward seconds of block l+1 (swap-in of l is prefetched during it); 0 for the last
    rc_next: np.ndarray  # recompute seconds of block l+1 (also inside that window when l+1 is recomputed)
    # (the three windows are the compute times times ActivationBudget.transfer_overlap)


def transfer_overlap(device_kind: str) -> float:
    """`ActivationBudget.transfer_overlap` for a device kind ("cuda", "rocm", "cpu", ...).

    On a CPU "device" the tier is host memory and a swap is a memcpy run by a thread on the same cores as
    the compute (offload.activations' CPU worker): it takes as long as the copy and hides behind nothing.
    On an accelerator a DMA engine copies over the host link while kernels run (MEMO's premise).
    """
    return 0.0 if device_kind == "cpu" else 1.0


def prefetch_helps(device_kind: str, tier: str) -> bool:
    """`ActivationBudget.prefetch` for a device kind and swap tier.

    Fetching a block ahead hides the copy when something other than the compute moves the bytes: an
    accelerator's copy engine, or the drive's DMA for an NVMe read. On a CPU device swapping to DRAM or CXL
    the fetch is a memcpy on the compute cores, which nothing hides: fetching ahead then only holds a
    second block on the device.
    """
    return not (device_kind == "cpu" and tier in ("dram", "cxl"))


def _instance(costs: Sequence[LayerCost], overlap: float = 1.0) -> _Instance:
    """The costs as arrays; the overlap windows scaled by `overlap` (ActivationBudget.transfer_overlap)."""
    costs = tuple(costs)
    if not costs:
        raise ActivationInputError("no layers to plan", field="costs")
    for i, c in enumerate(costs):
        if not isinstance(c, LayerCost):
            raise ActivationInputError(f"expected a LayerCost, got {type(c).__name__}", field=f"costs[{i}]")
        if i and c.layer <= costs[i - 1].layer:
            raise ActivationInputError(
                f"layers must be in increasing forward order: {costs[i - 1].layer} then {c.layer}",
                field=f"costs[{i}].layer",
            )
    act = np.array([c.act_bytes for c in costs], dtype=np.float64)
    fwd = np.array([c.fwd_time_s for c in costs], dtype=np.float64)
    bwd = np.array([c.bwd_time_s for c in costs], dtype=np.float64)
    rc = np.array([c.recompute_time_s for c in costs], dtype=np.float64)
    shift = lambda a: np.concatenate([a[1:], [0.0]])  # noqa: E731 - value of block l+1 at index l
    return _Instance(
        costs=costs,
        act=act,
        inp=np.array([c.input_bytes for c in costs], dtype=np.float64),
        extra=np.array([c.backward_extra_bytes for c in costs], dtype=np.float64),
        rc=rc,
        out_window=shift(fwd) * overlap,
        bwd_next=shift(bwd) * overlap,
        rc_next=shift(rc) * overlap,
    )


@dataclass(frozen=True)
class PolicyCost:
    """What a set of per-layer fractions costs (arrays may carry a leading batch axis)."""

    layer_peaks: np.ndarray  # device bytes at block l's forward end / backward start
    loss_peak: np.ndarray  # device bytes at the loss (resident shares + tail)
    device_bytes: np.ndarray  # max over layers of layer_peaks
    tier_bytes: np.ndarray
    recompute_s: np.ndarray
    exposed_transfer_s: np.ndarray

    @property
    def objective_s(self) -> np.ndarray:
        return self.recompute_s + self.exposed_transfer_s


def _cost(
    inst: _Instance, budget: ActivationBudget, k: np.ndarray, s: np.ndarray, r: np.ndarray
) -> PolicyCost:
    """The memory and time model, written once; the MIP below is its linear form.

    Memory at block l, at two moments: every earlier block's resident share (k_j·act_j +
    r_j·input_j) and all of block l's activations (made in forward, needed whole in backward
    whether kept, fetched or recomputed), plus block l-1 in flight: in backward its swapped
    share, prefetched during l's backward (with `prefetch`), and what the rest of the step adds
    then (`LayerCost.backward_extra_bytes`); in forward, when it swaps any share, its whole
    saved storage, alive beside the compact copy of its kept share until its swap-out (during
    l's forward) completes, without the backward's temporaries (`forward_slack_bytes`).
    Time: Σ r_l·recompute_l plus the transfer time not hidden: swap-out of l overlaps the
    forward of l+1; swap-in of l overlaps the backward (and recompute) of l+1.

    NOTE: the brief's memory form, Σ_l (k_l·act_l + r_l·input_l) + max_l (a recomputed
    block's act_l), counts no bytes for swapped shares, yet a swapped block is whole on the
    device during its own backward and one block is in flight while the next computes.
    The per-block peak above is exact for this one-block-ahead schedule, still linear
    (L constraints), and equals the brief's form for keep-all; with recompute-all it is
    max_l (Σ_{j<l} input_j + act_l), never above the brief's.
    """
    act, inp = inst.act, inst.inp
    resident = k * act + r * inp
    before = np.cumsum(resident, axis=-1) - resident  # Σ_{j<l} resident_j
    swapped = s * act

    def previous(a: np.ndarray) -> np.ndarray:  # block l-1's value at index l
        return np.concatenate([np.zeros_like(a[..., :1]), a[..., :-1]], axis=-1)

    # the backward moment: block l-1's swapped share prefetched (when the runtime fetches ahead)
    fetched = previous(swapped) if budget.prefetch else 0.0
    backward = before + act + fetched + inst.extra
    # the forward moment (no backward temporaries: forward_slack_bytes less): a block with any swapped share
    # keeps its whole saved storage alive beside the compact copy of its kept share until its copy to the
    # tier completes, during the next block's forward (planner.memory.forward_sweep)
    out = np.zeros_like(swapped) if budget.swap_out_early else act * (s > 0)
    forward = before + act + previous(out) + inst.extra - budget.forward_slack_bytes
    peaks = np.maximum(backward, forward)
    # at the loss: every block's resident share, the last block's swap-out still in flight,
    # and the loss's own buffers (`ActivationBudget.tail_bytes`)
    at_loss = resident.sum(axis=-1) + out[..., -1] + budget.tail_bytes
    recompute_s = (r * inst.rc).sum(axis=-1)
    if budget.can_swap:
        r_next = np.concatenate([r[..., 1:], np.zeros_like(r[..., :1])], axis=-1)
        out_exposed = np.maximum(0.0, swapped / budget.tier_write_bps - inst.out_window)
        in_exposed = np.maximum(0.0, swapped / budget.tier_read_bps - (inst.bwd_next + r_next * inst.rc_next))
        exposed = (out_exposed + in_exposed).sum(axis=-1)
    else:
        exposed = np.zeros_like(recompute_s)
    return PolicyCost(
        layer_peaks=peaks,
        loss_peak=at_loss,
        device_bytes=np.maximum(peaks.max(axis=-1), at_loss),
        tier_bytes=swapped.sum(axis=-1),
        recompute_s=recompute_s,
        exposed_transfer_s=exposed,
    )


def evaluate_fractions(
    costs: Sequence[LayerCost],
    budget: ActivationBudget,
    keep: Sequence[float],
    swap: Sequence[float],
    recompute: Sequence[float],
) -> PolicyCost:
    """The cost of given per-layer fractions under the model every strategy is scored by."""
    inst = _instance(costs, budget.transfer_overlap)
    arrays = [np.asarray(v, dtype=np.float64) for v in (keep, swap, recompute)]
    for name, a in zip(("keep", "swap", "recompute"), arrays):
        if a.shape[-1] != len(inst.costs):
            raise ActivationInputError(f"expected {len(inst.costs)} fractions, got {a.shape[-1]}", field=name)
    return _cost(inst, budget, *arrays)


def _fits(cost: PolicyCost, budget: ActivationBudget) -> bool:
    device_ok = cost.device_bytes <= budget.device_bytes * (1 + FIT_TOL_REL) + 1.0
    tier_ok = cost.tier_bytes <= budget.tier_capacity_bytes * (1 + FIT_TOL_REL) + 1.0
    return bool(device_ok and tier_ok)


def _solution(
    strategy: str,
    inst: _Instance,
    budget: ActivationBudget,
    k: np.ndarray,
    s: np.ndarray,
    r: np.ndarray,
    *,
    status: SolverStatus | None,
    gap: float | None,
    started: float,
) -> ActivationSolution:
    """An ActivationSolution for fractions (status None: "feasible" if it fits, else "infeasible")."""
    cost = _cost(inst, budget, k, s, r)
    fits = _fits(cost, budget)
    if status is None or not fits:
        status = "feasible" if fits else "infeasible"
    policies = tuple(
        ActivationPolicy(
            layer=c.layer,
            keep_fraction=float(ki),
            swap_fraction=float(si),
            recompute_fraction=float(ri),
            swap_tier=budget.tier,
            prefetch=budget.prefetch,
        )
        for c, ki, si, ri in zip(inst.costs, k, s, r)
    )
    return ActivationSolution(
        strategy=strategy,
        status=status,
        policies=policies if status != "infeasible" else (),
        objective_s=float(cost.objective_s),
        device_bytes=int(math.ceil(float(cost.device_bytes))),
        tier_bytes=int(math.ceil(float(cost.tier_bytes))),
        gap=gap if status != "infeasible" else None,
        seconds=time.perf_counter() - started,
        shortfall_bytes=max(0, int(math.ceil(float(cost.device_bytes) - budget.device_bytes)))
        if not fits
        else 0,
        recompute_s=float(cost.recompute_s),
        exposed_transfer_s=float(cost.exposed_transfer_s),
    )
