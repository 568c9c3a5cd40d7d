"""The planner's fixed-layout mode: the fastest plan for one data-parallel layout within a device budget.

`make_plan` (planner/planning.py) searches the layouts; this mode takes the layout as given (data parallel
over `dp` ranks, no tensor or pipeline parallelism, ZeRO-0: what memtier's torch engine runs) and plans
its memory for a budget. `memtier launch --auto` (launch/run.py) and `memtier bench` (memtier at
100/50/25% of the baseline's peak) call it. Both modes run the same strategies (`planner.strategies`),
time candidates with the same step-time model (`planner.search.time_step`) and build the Plan with the
same builder (`planner.planning.plan_from_candidate`: one set of tier margins, one OptimizerPlan).

The strategies are tried cheapest first until the memory model (planner.memory.estimate_memory) says
the whole step fits:

1. keep: every block keeps its activations, the standard loss;
2. chunked_loss: the chunked linear cross-entropy (no full logits; Wijmans et al. 2024);
3. activations: the activation MIP (`ActivationMip`: per block, swap a token share to the DRAM tier or
   recompute, whichever adds less time; a copy hides behind the neighbour block's compute on an
   accelerator and nowhere on a CPU device), with the chunked loss at each of LOSS_CHUNK_TOKENS;
4. activations+optimizer_offload: the same with the optimizer state offloaded to DRAM and updated on the
   CPU by memtier's runtime (at ZeRO-0), when the runtime can do it (`optimizer_offload`); when both 3
   and 4 fit, the faster predicted step wins (offloading the optimizer can cost less than the recompute
   it saves);
5. the same with a smaller micro-batch (more accumulation steps: same tokens per step; accumulation keeps
   every gradient on the device, so a smaller micro-batch saves less than it seems).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from planner.cluster import ClusterSpec
from planner.errors import InfeasibleError
from planner.lora import check_lora
from planner.memory import MemoryOptions
from planner.model import ModelSpec
from planner.plan import Engine, Layout, SolverReport
from planner.planning import PlanResult, plan_from_candidate
from planner.search import Candidate, SearchResult, time_step
from planner.strategies import ActivationMip, KeepAll, OptimizerOffload, OptimizerResident
from planner.strategy import Strategy, StrategyInput
from planner.units import fmt_bytes
from planner.workload import Workload

# tokens per chunk of the chunked loss, largest first (offload/loss.py measured 1024 as the knee on 2 CPU
# threads for a 128K vocabulary; a smaller chunk frees the budget the activations need)
LOSS_CHUNK_TOKENS = (1024, 512, 256)


@dataclass(frozen=True)
class Rung:
    """One step of the ladder: an optimizer and an activation strategy, and the loss chunks to try."""

    name: str
    optimizer: Strategy
    activations: Strategy
    chunks: tuple[int, ...]  # tokens per loss chunk; 0: the standard loss

    @property
    def moves_activations(self) -> bool:
        return not isinstance(self.activations, KeepAll)


def rungs(*, optimizer_offload: bool) -> tuple[Rung, ...]:
    """The strategies of the fixed-layout mode, cheapest first (the module docstring's 1-4)."""
    resident, mip = OptimizerResident(), ActivationMip()
    out = [
        Rung("keep", resident, KeepAll(), (0,)),
        Rung("chunked_loss", resident, KeepAll(), LOSS_CHUNK_TOKENS[:1]),
        Rung("activations", resident, mip, LOSS_CHUNK_TOKENS),
    ]
    if optimizer_offload:
        # memtier's runtime (offload.optimizer) offloads at ZeRO-0, DeepSpeed's ZeRO-Offload does not
        out.append(
            Rung("activations+optimizer_offload", OptimizerOffload(min_zero_stage=0), mip, LOSS_CHUNK_TOKENS)
        )
    return tuple(out)


def layouts(workload: Workload, dp: int, *, smaller_micro_batches: bool) -> Iterator[Layout]:
    """Data parallel over `dp` ranks at the workload's micro-batch, then (optionally) at its divisors."""
    sizes = [workload.micro_batch]
    if smaller_micro_batches:
        sizes += [m for m in range(workload.micro_batch - 1, 0, -1) if workload.micro_batch % m == 0]
    for mb in sizes:
        ga = workload.global_batch // (mb * dp)
        if ga >= 1 and ga * mb * dp == workload.global_batch:
            yield Layout(dp=dp, micro_batch=mb, grad_accum=ga)


@dataclass
class _Tally:
    tried: list[str] = dataclasses.field(default_factory=list)  # rung labels, in order
    solved: int = 0
    timed: int = 0
    closest: tuple[int, str] | None = None  # (bytes over the budget, rung label) of the smallest miss

    def miss(self, need_bytes: int, budget_bytes: int, label: str) -> None:
        miss = need_bytes - budget_bytes
        if self.closest is None or miss < self.closest[0]:
            self.closest = (miss, label)


def _climb(rung: Rung, inp: StrategyInput, label: str, tally: _Tally) -> Candidate | None:
    """The rung's fastest fitting candidate over its loss chunks."""
    found: list[tuple[float, int, Candidate]] = []
    for chunk in rung.chunks:
        at = dataclasses.replace(inp, options=dataclasses.replace(inp.options, loss_chunk_tokens=chunk))
        opt = rung.optimizer.solve(at)
        act = rung.activations.solve(dataclasses.replace(at, options=opt.options))
        tally.solved += 2
        if not (opt.fits and act.fits) or act.memory is None:
            tally.miss(max(opt.device_bytes, act.device_bytes), inp.budget_bytes, label)
            continue
        t = time_step(inp.model, inp.cluster, inp.workload, inp.layout, act.options, None, opt, act)
        tally.timed += 1
        cand = Candidate(
            layout=inp.layout,
            split="even",
            optimizer=opt,
            activations=act,
            memory=act.memory,
            time=t,
            budget_bytes=inp.budget_bytes,
        )
        found.append((round(t.step_s, 6), -chunk, cand))  # equal to a microsecond: the largest chunk
    return min(found, key=lambda f: f[:2])[2] if found else None


def plan_for_budget(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    budget_bytes: int,
    dp: int = 1,
    optimizer_offload: bool = False,
    optimizer_impl: Literal["foreach", "single_tensor", "fused"] = "fused",
    time_limit_s: float = 10.0,
    allow_smaller_micro_batch: bool = True,
    engine: Engine = "torch",
) -> PlanResult:
    """The fastest plan of the module docstring's ladder whose predicted per-device peak is within
    `budget_bytes` (used as given: no headroom is taken off); InfeasibleError (exit 3) if none is."""
    check_lora(model, workload)
    t0 = time.perf_counter()
    tally = _Tally()
    ladder = rungs(optimizer_offload=optimizer_offload)
    for layout in layouts(workload, dp, smaller_micro_batches=allow_smaller_micro_batch):
        inp = StrategyInput(
            model=model,
            cluster=cluster,
            workload=workload,
            layout=layout,
            budget_bytes=budget_bytes,
            options=MemoryOptions.on(cluster, workload, optimizer_impl=optimizer_impl),
            time_limit_s=time_limit_s,
        )
        # activation plans with and without optimizer offload: the faster predicted step wins, the first on a tie
        fitting: list[Candidate] = []
        for rung in ladder:
            if not (rung.optimizer.applies(inp) and rung.activations.applies(inp)):
                continue
            label = f"{rung.name} (micro-batch {layout.micro_batch})"
            tally.tried.append(label)
            cand = _climb(rung, inp, label, tally)
            if cand is not None and not rung.moves_activations:
                fitting = [cand]  # nothing moved and nothing recomputed: no later rung is faster
                break
            if cand is not None:
                fitting.append(cand)
        if fitting:
            best = min(fitting, key=lambda c: c.step_s)
            return _result(
                model, cluster, workload, best, tally, budget_bytes, engine, time.perf_counter() - t0
            )
    raise _infeasible(workload, dp, budget_bytes, tally, optimizer_offload=optimizer_offload)


def _result(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    chosen: Candidate,
    tally: _Tally,
    budget_bytes: int,
    engine: Engine,
    seconds: float,
) -> PlanResult:
    t = chosen.time
    search = SearchResult(
        ranked=(chosen,),
        budget_bytes=budget_bytes,
        shapes=1,
        configurations=len(tally.tried),
        pruned_by_states=0,
        solved=tally.solved,
        timed=tally.timed,
        seconds=seconds,
        mapping_seconds=0.0,
        closest=None,
        report=SolverReport(
            problem="layout", strategy="fixed", status="feasible", objective=t.step_s, seconds=seconds
        ),
    )
    why = (
        f"{chosen.describe()}: {t.step_s:.3f} s per step (MFU {100 * t.mfu:.1f}%), peak"
        f" {fmt_bytes(chosen.peak_bytes)} of a budget of {fmt_bytes(budget_bytes)} per device"
        f" ({chosen.memory.peak_phase} is the peak phase).",
        f"tried, cheapest first: {', '.join(tally.tried)}.",
    )
    plan = plan_from_candidate(model, cluster, workload, chosen, search, notes=why, engine=engine)
    return PlanResult(plan=plan, chosen=chosen, search=search, why=why, steps=tuple(tally.tried))


def _infeasible(
    workload: Workload, dp: int, budget_bytes: int, tally: _Tally, *, optimizer_offload: bool
) -> InfeasibleError:
    if tally.closest is None:
        return InfeasibleError(
            f"global_batch({workload.global_batch}) is not a multiple of dp({dp}) x any micro-batch <= "
            f"{workload.micro_batch}",
            need_bytes=0,
            have_bytes=budget_bytes,
        )
    miss, label = tally.closest
    alternatives = [f"a budget of at least {math.ceil((budget_bytes + miss) / 2**20)} MiB ({label})"]
    if not optimizer_offload:
        alternatives.append("optimizer-state offload (not available in this runtime)")
    return InfeasibleError(
        f"no plan fits {budget_bytes / 2**20:.0f} MiB per device: the closest ({label}) needs "
        f"{miss / 2**20:.0f} MiB more",
        need_bytes=budget_bytes + miss,
        have_bytes=budget_bytes,
        alternatives=alternatives,
    )
