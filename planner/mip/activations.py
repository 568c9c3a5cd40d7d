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

The pieces, one module each: `planner.mip.activation_costs` (the records and the cost model every strategy
is scored by), `planner.mip.activation_baselines` ("keep_all", "recompute_all", "greedy") and this module
(the MIP, `STRATEGIES` and `solve_activations`). The public names of all three are importable from here.

Every strategy (the MIP, "keep_all", "recompute_all", "greedy") returns an
`ActivationSolution`; all are scored by the same `evaluate_fractions`, and the MIP
returns the best baseline (status "fallback") whenever it cannot beat it, so it is
never worse than any of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from planner.mip.activation_baselines import greedy, keep_all, recompute_all
from planner.mip.activation_costs import (
    FIT_TOL_REL,
    GRANULARITIES,
    ActivationBudget,
    ActivationInputError,
    ActivationSettings,
    ActivationSolution,
    LayerCost,
    PolicyCost,
    RecomputeGranularity,
    _cost,
    _Instance,
    _instance,
    _solution,
    evaluate_fractions,
    prefetch_helps,
    transfer_overlap,
)
from planner.mip.common import MipOutcome, relative_gap, run_mip

__all__ = [
    "FIT_TOL_REL",
    "GRANULARITIES",
    "STRATEGIES",
    "ActivationBudget",
    "ActivationInputError",
    "ActivationSettings",
    "ActivationSolution",
    "LayerCost",
    "PolicyCost",
    "RecomputeGranularity",
    "Strategy",
    "evaluate_fractions",
    "greedy",
    "keep_all",
    "least_device_bytes",
    "prefetch_helps",
    "recompute_all",
    "solve_activations",
    "solve_mip",
    "transfer_overlap",
]

# Tie-break weight (in model time units per fully swapped layer): among plans of equal step
# time, prefer the one that moves fewer bytes to the tier. Small against any gap_rel used.
_SWAP_TIE_BREAK = 1e-7
_SNAP = 1e-7  # solver values this close to 0 or 1 are read as 0 or 1
_ZERO_S = 1e-12  # seconds: an added step time this small is float noise around zero


# ---- the MIP ------------------------------------------------------------------------------------


@dataclass
class _Model:
    """The built MIP and its variables (see `_variables` for each one's meaning and unit)."""

    problem: Any  # pulp.LpProblem
    keep: list[Any]  # pulp.LpVariable per layer: kept share, in [0, 1]
    swap: list[Any]  # swapped share per layer, in [0, 1]
    rec: list[Any]  # recomputed share per layer, in [0, 1] (binary for whole-block recompute)
    exposed_out: list[Any]  # swap-out time not hidden per layer, time units
    exposed_in: list[Any]  # swap-in time not hidden per layer, time units
    time_unit_s: float  # TIME_UNIT: seconds per model time unit
    mem_unit_bytes: float  # MEM_UNIT: bytes per model memory unit
    out: list[Any]  # per layer, when a swapped block's whole storage is in flight (else empty)


@dataclass(frozen=True)
class _Units:
    """The instance and budget in the model's units (notation as in `_cost`).

    Bytes in multiples of the largest block's activations, seconds in multiples of the slowest block's
    fwd+bwd+recompute, so every coefficient is O(1) for the solver.
    """

    mem_unit_bytes: float  # MEM_UNIT: bytes per model memory unit
    time_unit_s: float  # TIME_UNIT: seconds per model time unit
    act: np.ndarray  # block l's saved activations, memory units
    inp: np.ndarray  # block l's kept input when recomputed, memory units
    extra: np.ndarray  # the rest of the step's extra bytes at block l, memory units
    rc: np.ndarray  # block l's recompute time, time units
    write_t: float  # seconds per memory unit over the tier (swap-out), in time units; 0 without a tier
    read_t: float  # seconds per memory unit over the tier (swap-in), in time units; 0 without a tier
    out_window: np.ndarray  # forward of block l+1, time units
    bwd_next: np.ndarray  # backward of block l+1, time units
    rc_next: np.ndarray  # recompute of block l+1, time units
    slack: float  # ActivationBudget.forward_slack_bytes, memory units
    tail: float  # ActivationBudget.tail_bytes, memory units
    device_cap: float  # ActivationBudget.device_bytes, memory units
    tier_cap: float  # ActivationBudget.tier_capacity_bytes, memory units


def _units(inst: _Instance, budget: ActivationBudget) -> _Units:
    """`inst` and `budget` scaled to the model's units (see `_Units`)."""
    mem_unit_bytes = float(max(inst.act.max(), 1.0))  # MEM_UNIT: the largest block's activations, bytes
    times = [c.fwd_time_s + c.bwd_time_s + c.recompute_time_s for c in inst.costs]  # per block, seconds
    time_unit_s = float(max(max(times), 1e-9))  # TIME_UNIT: the slowest block's fwd+bwd+recompute, seconds
    can_swap = budget.can_swap
    return _Units(
        mem_unit_bytes=mem_unit_bytes,
        time_unit_s=time_unit_s,
        act=inst.act / mem_unit_bytes,
        inp=inst.inp / mem_unit_bytes,
        extra=inst.extra / mem_unit_bytes,
        rc=inst.rc / time_unit_s,
        write_t=mem_unit_bytes / budget.tier_write_bps / time_unit_s if can_swap else 0.0,
        read_t=mem_unit_bytes / budget.tier_read_bps / time_unit_s if can_swap else 0.0,
        out_window=inst.out_window / time_unit_s,
        bwd_next=inst.bwd_next / time_unit_s,
        rc_next=inst.rc_next / time_unit_s,
        slack=budget.forward_slack_bytes / mem_unit_bytes,
        tail=budget.tail_bytes / mem_unit_bytes,
        device_cap=budget.device_bytes / mem_unit_bytes,
        tier_cap=budget.tier_capacity_bytes / mem_unit_bytes,
    )


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

    units = _units(inst, budget)
    integral = settings.recompute_granularity == "layer"
    model = _variables(
        pulp.LpProblem(f"activations_{minimise}", pulp.LpMinimize),
        len(inst.costs),
        units,
        can_swap=budget.can_swap,
        integral=integral,
        # a swapped block's whole storage is in flight during the next forward (not with swap_out_early)
        whole_out=budget.can_swap and not budget.swap_out_early,
    )
    _add_shares_and_transfers(model, units, can_swap=budget.can_swap, integral=integral)
    _add_in_flight(model)
    peaks, at_loss = _device_bytes(model, units, prefetch=budget.prefetch)
    if minimise == "time":
        _add_step_time_objective(model, units, peaks, at_loss)
    else:
        _add_peak_objective(model, peaks, at_loss)
    if budget.can_swap:
        # [Constraint] the tier holds every swapped share at the end of the forward
        model.problem += (
            pulp.lpSum(units.act[l] * model.swap[l] for l in range(len(model.swap))) <= units.tier_cap,
            "tier_capacity",
        )
    return model


def _variables(
    prob: Any, n: int, units: _Units, *, can_swap: bool, integral: bool, whole_out: bool
) -> _Model:
    """The per-block decision variables of the model (no constraints yet)."""
    import pulp

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
    # out[l]: 1 when block l swaps any share. Until its copy to the tier completes (during block l+1's
    # forward) its whole saved storage stays alive beside the compact copy of its kept share: a partial swap
    # holds as much then as a whole one (planner.memory.forward_sweep). Not with swap_out_early.
    out = [pulp.LpVariable(f"out_{l}", 0, 1, cat=pulp.LpBinary) for l in range(n)] if whole_out else []
    return _Model(
        prob, keep, swap, rec, exposed_out, exposed_in, units.time_unit_s, units.mem_unit_bytes, out
    )


def _add_shares_and_transfers(model: _Model, units: _Units, *, can_swap: bool, integral: bool) -> None:
    """Every token's share, and the swap transfer time each block's neighbours cannot hide."""
    import pulp

    prob, keep, swap, rec = model.problem, model.keep, model.swap, model.rec
    act, write_t, read_t = units.act, units.write_t, units.read_t
    out_window, bwd_next, rc_next = units.out_window, units.bwd_next, units.rc_next
    n = len(keep)
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
        prob += model.exposed_out[l] >= write_t * act[l] * swap[l] - out_window[l] * not_rec, f"swap_out_{l}"
        # [Constraint] swap-in of block l is prefetched during the backward (and recompute) of block l+1
        if l + 1 < n and integral:
            prob += both_rec[l] <= rec[l + 1], f"next_rec_{l}"
            prob += both_rec[l] <= 1 - rec[l], f"next_rec_not_self_{l}"
            window_in = bwd_next[l] * not_rec + rc_next[l] * both_rec[l]
        elif l + 1 < n:
            window_in = bwd_next[l] + rc_next[l] * rec[l + 1]
        else:
            window_in = 0
        prob += model.exposed_in[l] >= read_t * act[l] * swap[l] - window_in, f"swap_in_{l}"


def _add_in_flight(model: _Model) -> None:
    """Block l is in flight (out[l] = 1) when it swaps any share (only when `out` exists)."""
    for l in range(len(model.out)):
        # [Constraint] a swapped share marks its block as in flight
        model.problem += model.swap[l] <= model.out[l], f"in_flight_{l}"


def _device_bytes(model: _Model, units: _Units, *, prefetch: bool) -> tuple[list[list[Any]], Any]:
    """Device bytes at every block's peak moments (memory units, one list per block) and at the loss.

    At block l: earlier blocks' resident shares + all of block l + block l-1 in flight: its swapped share
    prefetched in backward, or its whole storage during the forward (which lacks the backward's
    temporaries: forward_slack_bytes less).
    """
    import pulp

    keep, swap, rec, out = model.keep, model.swap, model.rec, model.out
    act, inp, extra = units.act, units.inp, units.extra
    n = len(keep)

    def peaks(l: int) -> list[Any]:
        resident = pulp.lpSum(act[j] * keep[j] + inp[j] * rec[j] for j in range(l))
        fetched = act[l - 1] * swap[l - 1] if l > 0 and prefetch else 0
        backward = resident + act[l] + fetched + extra[l]
        if l == 0 or not out:
            return [backward]  # the forward moment holds no more than this one (forward_slack_bytes >= 0)
        return [backward, resident + act[l] + act[l - 1] * out[l - 1] + extra[l] - units.slack]

    # device bytes at the loss: all resident shares + the last block in flight + the tail
    at_loss = (
        pulp.lpSum(act[j] * keep[j] + inp[j] * rec[j] for j in range(n))
        + (act[n - 1] * out[n - 1] if out else 0)
        + units.tail
    )
    return [peaks(l) for l in range(n)], at_loss


def _add_step_time_objective(model: _Model, units: _Units, peaks: list[list[Any]], at_loss: Any) -> None:
    """minimise="time": the device budget as constraints, the added step time as objective."""
    import pulp

    prob, n = model.problem, len(model.keep)
    for l in range(n):
        # [Constraint] device activation budget at every block boundary (forward end = backward start)
        for i, expr in enumerate(peaks[l]):
            prob += expr <= units.device_cap, f"device_{l}_{i}"
    # [Constraint] device activation budget at the loss, between the last forward and the first backward
    prob += at_loss <= units.device_cap, "device_at_loss"
    # [Objective] added step time: recompute + exposed transfer (+ a tie-break against needless swapping)
    prob += (
        pulp.lpSum(units.rc[l] * model.rec[l] + model.exposed_out[l] + model.exposed_in[l] for l in range(n))
        + _SWAP_TIE_BREAK * pulp.lpSum(units.act[l] * model.swap[l] for l in range(n)),
        "step_time",
    )


def _add_peak_objective(model: _Model, peaks: list[list[Any]], at_loss: Any) -> None:
    """minimise="peak": the device peak over all blocks and the loss as objective."""
    import pulp

    prob = model.problem
    # top: the device peak over all blocks, memory units
    top = pulp.LpVariable("peak", 0)
    for l, exprs in enumerate(peaks):
        for i, expr in enumerate(exprs):
            # [Constraint] every peak moment is below the top
            prob += expr <= top, f"peak_{l}_{i}"
    prob += at_loss <= top, "peak_at_loss"
    # [Objective] the device peak
    prob += top, "device_peak"


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
