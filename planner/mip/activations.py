"""Per-layer activation policy: keep, swap to a host tier, or recompute (a MIP and its baselines).

After MEMO (Zhao et al. 2024, "Efficiently Training 7B LLM with 1 Million Sequence
Length on 8 GPUs", arXiv 2407.12117; "Memo: Fine-grained Tensor Management
For Ultra-long Context LLM Training", SIGMOD 2025): each transformer block's saved activations
are split along the tokens; a share `s_l` is swapped to a host tier after the block's
forward and fetched back before its backward, the transfer hidden behind the
neighbouring block's compute; a share `r_l` is dropped and recomputed; the rest,
`k_l`, stays on the device. MEMO picks the swap share so that the transfer hides
behind the compute and recomputes the rest; here the choice is a MIP whose
objective is the step time the policy adds, so swapping more than can be hidden is
allowed when it is cheaper than recomputing.

How much of a neighbour's compute a transfer can hide behind is `ActivationBudget.transfer_overlap`
(1 on an accelerator with a copy engine; 0 on a CPU "device", where the copy runs on the computing cores
and every swapped byte costs its copy time: `transfer_overlap(device_kind)`).

The runtime recomputes whole blocks (`recompute_granularity="layer"`: r_l binary);
`"token"` makes r_l continuous for a token-wise recompute (as MEMO does) with the same
model.

Every strategy (the MIP, "keep_all", "recompute_all", "greedy") returns an
`ActivationSolution`; all are scored by the same `evaluate_fractions`, and the MIP
returns the best baseline (status "fallback") whenever it cannot beat it, so it is
never worse than any of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from planner.errors import SpecError
from planner.mip.common import MipOutcome, MipSettings, SolverStatus, relative_gap, run_mip
from planner.plan import ActivationPolicy, SolverReport, TierName

RecomputeGranularity = Literal["layer", "token"]
GRANULARITIES: tuple[RecomputeGranularity, ...] = ("layer", "token")

# A plan fits when its bytes are within this share of the budget (plus one byte): the
# fractions read back from the solver are feasible to its ~1e-7 tolerance, far below what a
# runtime can realise anyway (one token of 32k is 3e-5 of a block).
FIT_TOL_REL = 1e-6
# Tie-break weight (in model time units per fully swapped layer): among plans of equal step
# time, prefer the one that moves fewer bytes to the tier. Small against any gap_rel used.
_SWAP_TIE_BREAK = 1e-7
_SNAP = 1e-7  # solver values this close to 0 or 1 are read as 0 or 1
_ZERO_S = 1e-12  # seconds: an added step time this small is float noise around zero


class ActivationInputError(SpecError):
    """A layer cost or budget that cannot be planned (names the field)."""


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
        for name in ("layer", "act_bytes", "input_bytes", "backward_extra_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ActivationInputError(f"must be an integer >= 0, got {value!r}", field=name)
        for name in ("fwd_time_s", "bwd_time_s", "recompute_time_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
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
        for name in ("device_bytes", "tier_capacity_bytes", "tail_bytes", "forward_slack_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ActivationInputError(f"must be an integer >= 0 bytes, got {value!r}", field=name)
        for name in ("tier_write_bps", "tier_read_bps"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
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
            stage="activations",
            strategy=self.strategy,
            status=self.status,
            objective=self.objective_s,
            gap=self.gap,
            seconds=self.seconds,
        )


# ---- the cost of a policy (shared by every strategy) ---------------------------------------------


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


# ---- baselines ------------------------------------------------------------------------------------


def keep_all(
    costs: Sequence[LayerCost], budget: ActivationBudget, settings: ActivationSettings | None = None
) -> ActivationSolution:
    """No offload, no recompute: every block keeps its activations on the device."""
    started = time.perf_counter()
    inst = _instance(costs, budget.transfer_overlap)
    n = len(inst.costs)
    return _solution(
        "keep_all", inst, budget, np.ones(n), np.zeros(n), np.zeros(n), status=None, gap=None, started=started
    )


def recompute_all(
    costs: Sequence[LayerCost], budget: ActivationBudget, settings: ActivationSettings | None = None
) -> ActivationSolution:
    """Full activation checkpointing: every block keeps only its input and is recomputed."""
    started = time.perf_counter()
    inst = _instance(costs, budget.transfer_overlap)
    n = len(inst.costs)
    return _solution(
        "recompute_all",
        inst,
        budget,
        np.zeros(n),
        np.zeros(n),
        np.ones(n),
        status=None,
        gap=None,
        started=started,
    )


def _hidden_swap_share(inst: _Instance, budget: ActivationBudget) -> np.ndarray:
    """Share of each block whose swap-out and swap-in both hide behind block l+1 (MEMO's swap ratio)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        by_out = np.where(inst.act > 0, inst.out_window * budget.tier_write_bps / inst.act, 1.0)
        by_in = np.where(inst.act > 0, inst.bwd_next * budget.tier_read_bps / inst.act, 1.0)
    return np.clip(np.minimum(by_out, by_in), 0.0, 1.0)


def greedy(
    costs: Sequence[LayerCost], budget: ActivationBudget, settings: ActivationSettings | None = None
) -> ActivationSolution:
    """MEMO-style greedy: swap what hides behind compute, then buy the rest of the memory cheapest first.

    1. If keeping everything fits, keep everything.
    2. Swap each block's hidden share (its transfer fits in block l+1's compute), in forward
       order while the tier has room: it costs no time.
    3. While the plan does not fit: among "recompute block l" and "swap the rest of block l",
       take the move with the most bytes of excess removed per second added.
    Moves are whole-block, so the answer is valid for both recompute granularities.
    """
    started = time.perf_counter()
    inst = _instance(costs, budget.transfer_overlap)
    n = len(inst.costs)
    k, s, r = np.ones(n), np.zeros(n), np.zeros(n)
    cost = _cost(inst, budget, k, s, r)
    if _fits(cost, budget):
        return _solution("greedy", inst, budget, k, s, r, status=None, gap=None, started=started)

    if budget.can_swap:
        room = float(budget.tier_capacity_bytes)
        for layer, share in enumerate(_hidden_swap_share(inst, budget)):
            if inst.act[layer] <= 0 or room <= 0:
                continue
            take = min(float(share), room / inst.act[layer])
            s[layer], k[layer] = take, 1.0 - take
            room -= take * inst.act[layer]

    def excess(c: PolicyCost) -> np.ndarray:
        over_layers = np.maximum(0.0, c.layer_peaks - budget.device_bytes).sum(axis=-1)
        return over_layers + np.maximum(0.0, c.loss_peak - budget.device_bytes)

    for _ in range(2 * n + 1):
        cost = _cost(inst, budget, k, s, r)
        if _fits(cost, budget):
            break
        room = budget.tier_capacity_bytes - float(cost.tier_bytes)
        # candidate moves as a batch: rows 0..n-1 recompute block l, rows n..2n-1 swap the rest of block l
        K, S, R = (np.tile(a, (2 * n, 1)) for a in (k, s, r))
        idx = np.arange(n)
        K[idx, idx], S[idx, idx], R[idx, idx] = 0.0, 0.0, 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            more = (
                np.where(inst.act > 0, np.minimum(k, max(room, 0.0) / inst.act), 0.0)
                if budget.can_swap
                else 0 * k
            )
        S[n + idx, idx] += more
        K[n + idx, idx] -= more
        valid = np.concatenate([r < 1.0, more > 0])
        trial = _cost(inst, budget, K, S, R)
        gain = excess(cost) - excess(trial)
        added = trial.objective_s - cost.objective_s
        score = np.where(added > 1e-15, gain / np.maximum(added, 1e-15), np.inf)
        score = np.where(
            valid & (gain > 0) & (trial.tier_bytes <= budget.tier_capacity_bytes * (1 + FIT_TOL_REL) + 1.0),
            score,
            -np.inf,
        )
        best = int(np.argmax(score))
        if score[best] == -np.inf:
            break  # no move removes any excess: infeasible
        k, s, r = K[best].copy(), S[best].copy(), R[best].copy()
        k = np.maximum(0.0, 1.0 - s - r)
    return _solution("greedy", inst, budget, k, s, r, status=None, gap=None, started=started)


# ---- the MIP ------------------------------------------------------------------------------------


@dataclass
class _Model:
    problem: Any  # pulp.LpProblem
    keep: list[Any]  # pulp.LpVariable per layer
    swap: list[Any]
    rec: list[Any]
    exposed_out: list[Any]
    exposed_in: list[Any]
    time_unit_s: float
    mem_unit_bytes: float
    out: list[Any]  # per layer, when a swapped block's whole storage is in flight (else empty)


def _build_model(
    inst: _Instance,
    budget: ActivationBudget,
    settings: ActivationSettings,
    *,
    minimise: Literal["time", "peak"] = "time",
) -> _Model:
    """The swap/recompute MIP (MEMO's token-wise split made an optimisation; notation as in `_cost`).

    minimise="time": least added step time within the device budget (the plan).
    minimise="peak": least device peak at any time cost (how far an infeasible budget is).
    """
    import pulp

    n = len(inst.costs)
    # Units: bytes in multiples of the largest block's activations, seconds in multiples of the
    # slowest block's fwd+bwd+recompute, so every coefficient is O(1) for the solver.
    mem_unit_bytes = float(max(inst.act.max(), 1.0))  # MEM_UNIT: bytes per model memory unit
    times = [c.fwd_time_s + c.bwd_time_s + c.recompute_time_s for c in inst.costs]
    time_unit_s = float(max(max(times), 1e-9))  # TIME_UNIT: seconds per model time unit
    act = inst.act / mem_unit_bytes  # block l's saved activations, memory units
    inp = inst.inp / mem_unit_bytes  # block l's kept input when recomputed, memory units
    extra = inst.extra / mem_unit_bytes  # the rest of the step's extra bytes at block l, memory units
    rc = inst.rc / time_unit_s  # block l's recompute time, time units
    can_swap = budget.can_swap
    # seconds per memory unit over the tier, in time units
    write_t = mem_unit_bytes / budget.tier_write_bps / time_unit_s if can_swap else 0.0
    read_t = mem_unit_bytes / budget.tier_read_bps / time_unit_s if can_swap else 0.0
    out_window = inst.out_window / time_unit_s  # forward of block l+1, time units
    bwd_next = inst.bwd_next / time_unit_s  # backward of block l+1, time units
    rc_next = inst.rc_next / time_unit_s  # recompute of block l+1, time units

    prob = pulp.LpProblem(f"activations_{minimise}", pulp.LpMinimize)
    integral = settings.recompute_granularity == "layer"
    # keep[l]: share of block l's tokens whose activations stay on the device, in [0, 1]
    keep = [pulp.LpVariable(f"keep_{l}", 0, 1) for l in range(n)]
    # swap[l]: share of block l's tokens swapped to the tier after forward, fetched before backward, in [0, 1]
    swap = [pulp.LpVariable(f"swap_{l}", 0, 1 if can_swap else 0) for l in range(n)]
    # rec[l]: share of block l's tokens dropped and recomputed; binary for whole-block recompute
    rec = [
        pulp.LpVariable(f"rec_{l}", 0, 1, cat=pulp.LpBinary if integral else pulp.LpContinuous)
        for l in range(n)
    ]
    # exposed_out[l] / exposed_in[l]: swap-out / swap-in time of block l not hidden by compute, time units
    exposed_out = [pulp.LpVariable(f"exposed_out_{l}", 0) for l in range(n)]
    exposed_in = [pulp.LpVariable(f"exposed_in_{l}", 0) for l in range(n)]

    # both_rec[l]: 1 when block l+1 is recomputed and block l is not (the product rec[l+1]·(1-rec[l]),
    # relaxed from above; only its upper bounds matter, the objective pushes it up)
    both_rec = [pulp.LpVariable(f"next_rec_only_{l}", 0, 1) for l in range(n)] if integral else []
    for l in range(n):
        # [Constraint] every token of block l is kept, swapped or recomputed
        prob += keep[l] + swap[l] + rec[l] == 1, f"shares_{l}"
        if not can_swap:
            continue
        # With whole-block recompute, block l is either recomputed (swap 0) or not; the windows
        # below are scaled by (1 - rec[l]): the convex hull of that disjunction (a perspective
        # reformulation), exact for binary rec and a much tighter LP relaxation than the plain
        # form, which lets a half-recomputed block keep its whole window. Token-wise recompute
        # keeps the plain form: there a block really is part recomputed, part swapped.
        not_rec = (1 - rec[l]) if integral else 1
        # [Constraint] swap-out of block l overlaps the forward of block l+1; the rest is exposed
        prob += exposed_out[l] >= write_t * act[l] * swap[l] - out_window[l] * not_rec, f"swap_out_{l}"
        # [Constraint] swap-in of block l is prefetched during the backward (and recompute) of block l+1
        if l + 1 < n and integral:
            prob += both_rec[l] <= rec[l + 1], f"next_rec_{l}"
            prob += both_rec[l] <= 1 - rec[l], f"next_rec_not_self_{l}"
            window_in = bwd_next[l] * not_rec + rc_next[l] * both_rec[l]
        elif l + 1 < n:
            window_in = bwd_next[l] + rc_next[l] * rec[l + 1]
        else:
            window_in = 0
        prob += exposed_in[l] >= read_t * act[l] * swap[l] - window_in, f"swap_in_{l}"

    # out[l]: 1 when block l swaps any share. Until its copy to the tier completes (during block l+1's
    # forward) its whole saved storage stays alive beside the compact copy of its kept share: a partial swap
    # holds as much then as a whole one (planner.memory.forward_sweep). Not with swap_out_early.
    whole_out = can_swap and not budget.swap_out_early
    out = [pulp.LpVariable(f"out_{l}", 0, 1, cat=pulp.LpBinary) for l in range(n)] if whole_out else []
    for l in range(len(out)):
        # [Constraint] a swapped share marks its block as in flight
        prob += swap[l] <= out[l], f"in_flight_{l}"

    # device peak at block l: earlier blocks' resident shares + all of block l + block l-1 in flight: its
    # swapped share prefetched in backward, or its whole storage during the forward (which lacks the
    # backward's temporaries: forward_slack_bytes less)
    slack = budget.forward_slack_bytes / mem_unit_bytes

    def peaks(l: int) -> list[pulp.LpAffineExpression]:
        resident = pulp.lpSum(act[j] * keep[j] + inp[j] * rec[j] for j in range(l))
        fetched = act[l - 1] * swap[l - 1] if l > 0 and budget.prefetch else 0
        backward = resident + act[l] + fetched + extra[l]
        if l == 0 or not whole_out:
            return [backward]  # the forward moment holds no more than this one (forward_slack_bytes >= 0)
        return [backward, resident + act[l] + act[l - 1] * out[l - 1] + extra[l] - slack]

    # device bytes at the loss: all resident shares + the last block in flight + the tail
    at_loss = (
        pulp.lpSum(act[j] * keep[j] + inp[j] * rec[j] for j in range(n))
        + (act[n - 1] * out[n - 1] if whole_out else 0)
        + budget.tail_bytes / mem_unit_bytes
    )

    if minimise == "time":
        device_cap = budget.device_bytes / mem_unit_bytes
        for l in range(n):
            # [Constraint] device activation budget at every block boundary (forward end = backward start)
            for i, expr in enumerate(peaks(l)):
                prob += expr <= device_cap, f"device_{l}_{i}"
        # [Constraint] device activation budget at the loss, between the last forward and the first backward
        prob += at_loss <= device_cap, "device_at_loss"
        # [Objective] added step time: recompute + exposed transfer (+ a tie-break against needless swapping)
        prob += (
            pulp.lpSum(rc[l] * rec[l] + exposed_out[l] + exposed_in[l] for l in range(n))
            + _SWAP_TIE_BREAK * pulp.lpSum(act[l] * swap[l] for l in range(n)),
            "step_time",
        )
    else:
        # top: the device peak over all blocks, memory units
        top = pulp.LpVariable("peak", 0)
        for l in range(n):
            for i, expr in enumerate(peaks(l)):
                prob += expr <= top, f"peak_{l}_{i}"
        prob += at_loss <= top, "peak_at_loss"
        prob += top, "device_peak"
    if can_swap:
        # [Constraint] the tier holds every swapped share at the end of the forward
        prob += (
            pulp.lpSum(act[l] * swap[l] for l in range(n)) <= budget.tier_capacity_bytes / mem_unit_bytes,
            "tier_capacity",
        )
    return _Model(prob, keep, swap, rec, exposed_out, exposed_in, time_unit_s, mem_unit_bytes, out)


def _read_fractions(model: _Model, integral: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def val(v: object) -> float:
        x = float(getattr(v, "varValue", 0.0) or 0.0)
        if x < _SNAP:
            return 0.0
        if x > 1.0 - _SNAP:
            return 1.0
        return x

    r = np.array([val(v) for v in model.rec])
    if integral:
        r = np.round(r)
    s = np.minimum(np.array([val(v) for v in model.swap]), 1.0 - r)
    k = np.maximum(0.0, 1.0 - s - r)
    return k, s, r


def _warm_start(model: _Model, start: ActivationSolution, inst: _Instance, budget: ActivationBudget) -> None:
    if not start.policies:
        return
    k = np.array([p.keep_fraction for p in start.policies])
    s = np.array([p.swap_fraction for p in start.policies])
    r = np.array([p.recompute_fraction for p in start.policies])
    swapped = s * inst.act
    for l in range(len(k)):
        model.keep[l].setInitialValue(float(k[l]))
        model.swap[l].setInitialValue(float(s[l]))
        model.rec[l].setInitialValue(float(r[l]))
        if model.out:
            model.out[l].setInitialValue(1.0 if s[l] > 0 else 0.0)
        if budget.can_swap:
            r_next = r[l + 1] if l + 1 < len(k) else 0.0
            out_exp = max(0.0, swapped[l] / budget.tier_write_bps - inst.out_window[l])
            in_exp = max(0.0, swapped[l] / budget.tier_read_bps - inst.bwd_next[l] - r_next * inst.rc_next[l])
        else:
            out_exp = in_exp = 0.0
        model.exposed_out[l].setInitialValue(out_exp / model.time_unit_s)
        model.exposed_in[l].setInitialValue(in_exp / model.time_unit_s)


def _least_peak(
    inst: _Instance, budget: ActivationBudget, settings: ActivationSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Fractions reaching the smallest device peak with this tier (the MIP with minimise="peak")."""
    model = _build_model(inst, budget, settings, minimise="peak")
    outcome = run_mip(model.problem, settings.mip)
    if not outcome.has_solution:
        return None
    return _read_fractions(model, settings.recompute_granularity == "layer")


def least_device_bytes(
    costs: Sequence[LayerCost], budget: ActivationBudget, settings: ActivationSettings | None = None
) -> int:
    """The smallest device peak any policy reaches with this tier: what an infeasible budget must grow to."""
    settings = settings or ActivationSettings()
    inst = _instance(costs, budget.transfer_overlap)
    fractions = _least_peak(inst, budget, settings)
    if fractions is None:  # the solver found no point in time; recompute-all is always one
        return recompute_all(costs, budget).device_bytes
    return int(math.ceil(float(_cost(inst, budget, *fractions).device_bytes)))


@dataclass
class _CountSearch:
    """What the search over the number of recomputed blocks found (model units)."""

    fractions: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # best MIP plan, None if none beat the start
    bound: float | None  # proven lower bound on the objective; None when the relaxation is infeasible
    infeasible: bool


def _model_objective(model: _Model, inst: _Instance, sol: ActivationSolution) -> float:
    """A baseline's objective in the MIP's units (time units plus the swap tie-break)."""
    swapped = sum(p.swap_fraction * a for p, a in zip(sol.policies, inst.act))
    return sol.objective_s / model.time_unit_s + _SWAP_TIE_BREAK * swapped / model.mem_unit_bytes


def _search_recompute_count(
    model: _Model,
    inst: _Instance,
    budget: ActivationBudget,
    settings: ActivationSettings,
    start: ActivationSolution | None,
    deadline: float,
) -> _CountSearch:
    """Whole-block recompute: branch on N = Σ rec (how many blocks are recomputed), then solve
    the MIP for each N.

    Blocks of a transformer are identical, so plain branching on rec[l] meets the same LP
    bound again with the fraction moved to another block, and CBC cannot close the gap
    (it stops at the time limit on 16 identical blocks). The LP relaxation with Σ rec = N
    fixed, g(N), is convex in N (an LP's value in its right-hand side) and bounds the MIP
    with that N; with N fixed the MIP is nearly integral and solves in tens of ms. So: start
    at the unconstrained LP's N, solve the MIP for the N with the lowest g(N) first, widen
    outwards, and stop when every unexplored g(N) is no better than the incumbent (gap_rel).
    """
    import heapq

    import pulp

    prob = model.problem
    n = len(model.rec)
    mip = settings.mip

    def remaining() -> float:
        return deadline - time.perf_counter()

    def relax(on: bool) -> None:
        for v in (*model.rec, *model.out):
            v.cat = pulp.LpContinuous if on else pulp.LpInteger  # (bounds stay 0..1: binary)

    def solve(time_limit_s: float, *, warm: bool = False) -> MipOutcome:
        return run_mip(prob, replace(mip, time_limit_s=max(0.05, time_limit_s)), warm_start=warm)

    # the LP relaxation without a count: its Σ rec is where g(N) is smallest
    relax(True)
    free = solve(remaining())
    if free.status == "infeasible":
        relax(False)
        return _CountSearch(fractions=None, bound=None, infeasible=True)
    if not free.has_solution:  # out of time already
        relax(False)
        return _CountSearch(fractions=None, bound=None, infeasible=False)
    n_lp = sum(float(v.varValue or 0.0) for v in model.rec)
    # [Constraint] exactly N blocks are recomputed (N is set per sub-problem below)
    prob += pulp.lpSum(model.rec) == 0, "recompute_count"
    count = prob.constraints["recompute_count"]

    lp_bounds: dict[int, float] = {}

    def g(k: int) -> float:  # LP bound of the MIP with k recomputed blocks; inf when infeasible
        if k not in lp_bounds:
            relax(True)
            count.changeRHS(k)
            out = solve(remaining())
            lp_bounds[k] = out.objective if out.has_solution and out.objective is not None else math.inf
            relax(False)
        return lp_bounds[k]

    start_count = round(sum(p.recompute_fraction for p in start.policies)) if start is not None else -1
    incumbent = _model_objective(model, inst, start) if start is not None else math.inf
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    lo, hi = math.floor(n_lp + 1e-6), math.ceil(n_lp - 1e-6)
    # (LP bound, N, direction to widen in: -1 down, +1 up, 0 both)
    frontier = [(g(lo), lo, 0)] if lo == hi else [(g(lo), lo, -1), (g(hi), hi, +1)]
    heapq.heapify(frontier)
    open_bounds: list[float] = []  # bounds of sub-MIPs stopped by the time limit
    while frontier:
        bound_n, k, direction = frontier[0]
        if bound_n >= incumbent - mip.gap_rel * abs(incumbent) - 1e-12 or remaining() <= 0:
            break  # no unexplored N can beat the incumbent (or out of time)
        heapq.heappop(frontier)
        count.changeRHS(k)
        # NOTE: no MIP start for CBC here: on some instances (8 uneven 70B blocks, N = 2) CBC's root
        # cuts after a MIP start raised its bound above the true optimum (0.499 > 0.4565, found by
        # HiGHS and by CBC without the start) and it stopped at the start as "optimal". With N fixed
        # the sub-MIP solves in tens of ms without a start, and solve_mip keeps the baselines anyway.
        warm = k == start_count and start is not None and mip.solver != "cbc"
        if warm:
            _warm_start(model, start, inst, budget)  # type: ignore[arg-type]
        out = solve(remaining(), warm=warm)
        if out.has_solution and out.objective is not None and out.objective < incumbent:
            incumbent = out.objective
            best = _read_fractions(model, integral=True)
        if out.status == "time_limit" or out.status == "no_solution":
            open_bounds.append(out.bound if out.bound is not None else bound_n)
        for step in (-1, +1):
            nxt = k + step
            if direction in (0, step) and 0 <= nxt <= n and g(nxt) < math.inf:
                heapq.heappush(frontier, (g(nxt), nxt, step))
    del prob.constraints["recompute_count"]
    bound = min([incumbent, *open_bounds, *(b for b, _, _ in frontier)])
    return _CountSearch(fractions=best, bound=bound if math.isfinite(bound) else None, infeasible=False)


def solve_mip(
    costs: Sequence[LayerCost], budget: ActivationBudget, settings: ActivationSettings | None = None
) -> ActivationSolution:
    """The swap/recompute MIP, warm-started from the best baseline and never worse than any baseline."""
    started = time.perf_counter()
    settings = settings or ActivationSettings()
    inst = _instance(costs, budget.transfer_overlap)
    baselines = [f(costs, budget, settings) for f in (keep_all, recompute_all, greedy)]
    feasible = [b for b in baselines if b.fits]
    best = min(feasible, key=lambda b: b.objective_s) if feasible else None

    if (
        best is not None
        and best.objective_s <= _ZERO_S
        and not any(p.swap_fraction > 0 for p in best.policies)
    ):
        # nothing is added to the step time and nothing moved: no plan can do better (keeping everything
        # fits). A zero-cost baseline that swaps (greedy's hidden shares) goes on to the MIP, whose
        # tie-break moves no more bytes than the budget needs.
        return _with(best, strategy="mip", status="optimal", gap=0.0, seconds=time.perf_counter() - started)
    model = _build_model(inst, budget, settings)
    fractions: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    if settings.recompute_granularity == "layer":
        search = _search_recompute_count(
            model, inst, budget, settings, best, deadline=started + settings.mip.time_limit_s
        )
        fractions = search.fractions
        bound_s = search.bound * model.time_unit_s if search.bound is not None else None
    else:  # token-wise recompute: a linear program
        outcome = run_mip(model.problem, settings.mip)
        if outcome.has_solution:
            fractions = _read_fractions(model, integral=False)
        bound_s = outcome.bound * model.time_unit_s if outcome.bound is not None else None

    if fractions is not None:
        mip = _solution("mip", inst, budget, *fractions, status="optimal", gap=None, started=started)
        if mip.fits and (best is None or mip.objective_s <= best.objective_s):
            gap = relative_gap(mip.objective_s, bound_s)
            proven = gap is not None and (
                gap <= settings.mip.gap_rel or mip.objective_s - (bound_s or 0.0) <= _ZERO_S
            )
            return _with(
                mip,
                status="optimal" if proven else "time_limit",
                gap=gap,
                seconds=time.perf_counter() - started,
            )
    if best is not None:
        # the MIP found nothing better (time limit, or its rounding left it worse): the best baseline,
        # reported "optimal" when the MIP's bound proves it optimal to within gap_rel
        gap = relative_gap(best.objective_s, bound_s)
        proven = gap is not None and (
            gap <= settings.mip.gap_rel or best.objective_s - (bound_s or 0.0) <= _ZERO_S
        )
        return _with(
            best,
            strategy="mip",
            status="optimal" if proven else "fallback",
            gap=gap,
            seconds=time.perf_counter() - started,
        )
    # nothing the MIP or the baselines found fits: the least-memory policy says by how many bytes
    least_fractions = _least_peak(inst, budget, settings)
    if least_fractions is None:
        n = len(inst.costs)
        least_fractions = (np.zeros(n), np.zeros(n), np.ones(n))
    least = _solution("mip", inst, budget, *least_fractions, status="fallback", gap=None, started=started)
    # (it fits only when the budget is within the solvers' tolerance of the least peak)
    return least if least.fits else _with(least, objective_s=0.0, recompute_s=0.0, exposed_transfer_s=0.0)


def _with(sol: ActivationSolution, **changes: object) -> ActivationSolution:
    return replace(sol, **changes)  # type: ignore[arg-type]


Strategy = Callable[[Sequence[LayerCost], ActivationBudget, ActivationSettings | None], ActivationSolution]
STRATEGIES: dict[str, Strategy] = {
    "mip": solve_mip,
    "greedy": greedy,
    "keep_all": keep_all,
    "recompute_all": recompute_all,
}


def solve_activations(
    costs: Sequence[LayerCost],
    budget: ActivationBudget,
    *,
    strategy: str = "mip",
    settings: ActivationSettings | None = None,
) -> ActivationSolution:
    """Plan the activations of `costs` (one entry per block, forward order) with `strategy`."""
    fn = STRATEGIES.get(strategy)
    if fn is None:
        raise ActivationInputError(
            f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}", field="strategy"
        )
    return fn(costs, budget, settings or ActivationSettings())
