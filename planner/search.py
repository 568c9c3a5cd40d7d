"""Parallel layout search: enumerate, prune by memory, time what fits, rank, map the best.

Enumerated: tensor (tp), context (cp, only for long sequences), pipeline (pp) and data
(dp = world / (tp * cp * pp)) parallel sizes; the pipeline split of the blocks (even,
or uneven when the layers do not divide or the LM head weighs on the last stage);
ZeRO stage; micro-batch (grad_accum follows from the global batch); and, through the
planning strategies (`planner.strategy`, `planner.strategies`), the optimizer-state placement
and the activation policy. Hard constraints: heads and kv heads divisible by tp (or tp by kv heads),
pp <= layers, seq divisible by cp, global batch divisible by micro-batch * dp, ZeRO-2/3
only without pipeline parallelism (DeepSpeed's pipeline engine takes ZeRO-1 at most;
Megatron's distributed optimizer is ZeRO-1 too).

Pruning, cheapest first (Pipette, Yim et al. 2024, prunes by memory before timing too):
  1. model states: parameters + gradients + optimizer states on the worst stage are a
     lower bound on its peak; a (layout, ZeRO, optimizer placement) over the budget is
     dropped with all its micro-batches and activation policies;
  2. micro-batch: memory grows with it, so once the leanest activation policy misses the
     budget at micro-batch b, every larger one misses too;
  3. activation baselines are tried from the least recompute to the most; the first that
     fits is the fastest of them (recompute only adds time in the step-time model).
Only what fits is timed, with the links of each group kind computed once per parallel
shape (`planner.mapping.LinkEvaluator`). The rank-to-device search runs on the best few
shapes only.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from planner.cluster import ClusterSpec
from planner.comm import GroupLink
from planner.errors import SpecError
from planner.estimate import validate_layout
from planner.flops import head_forward_flops, layer_forward_flops
from planner.mapping import AnnealSettings, LinkEvaluator, MappingResult, anneal_mapping, default_mapping
from planner.memory import MemoryBreakdown, MemoryOptions, stage_layer_counts
from planner.model import ModelSpec
from planner.plan import Layout, SolverReport
from planner.steptime import StepTime, estimate_step_time
from planner.strategies import ACTIVATION_BASELINES, OPTIMIZER_STRATEGIES
from planner.strategy import Strategy, StrategyInput, StrategyResult, host_fits
from planner.workload import Workload

# optimizer strategies that decide a per-subgroup placement; on a tie they lose to the baselines
PLACEMENT_STRATEGIES = frozenset({"interleaved"})


class SearchSpaceError(SpecError):
    """A search-space setting out of range (names the field)."""


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    micro_batch: int | None = None  # fixed micro-batch; None: search the divisors of global_batch / dp
    max_micro_batch: int = field(default=16, metadata={"positive": True})
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    max_tp: int | None = None  # None: any divisor of the world size the heads allow
    # context parallelism: costed when True, but memtier's trainer does not run it yet (launch/train/layouts.py
    # refuses cp > 1), so the search leaves it out by default
    context_parallel: bool = False
    cp_min_seq: int = field(default=8192, metadata={"positive": True})  # context parallel from this length
    cp_min_chunk: int = field(default=2048, metadata={"positive": True})  # tokens per cp rank, at least
    uneven_splits: bool = True
    sequence_parallel: bool = True  # with tp > 1 (Korthikanti et al. 2022: same comm volume, less memory)
    # the embeddings and head split by vocabulary over tp (Megatron's layers: `memtier plan --vocab-parallel`
    # for a Megatron launch); memtier's trainer keeps them whole on every tp rank, so off by default
    vocab_parallel: bool = False
    # chunked linear cross-entropy (offload.loss) with this many tokens per chunk; 0 keeps the
    # standard loss. Its time equals the standard loss's (same FLOPs), so it is on by default
    # and the memory model decides whether it lowers the peak (it never raises it)
    loss_chunk_tokens: int = field(default=1024, metadata={"min": 0})
    # model chunks per device for the interleaved 1F1B schedule (Megatron-LM runs it; DeepSpeed's pipeline
    # engine does not, so only 1 by default): tried where every stage's blocks divide evenly and the
    # micro-batches per step are a multiple of the stages
    virtual_stages: tuple[int, ...] = (1,)
    # only the layouts memtier's own trainer runs today (launch/run.py: check_runnable): data parallel
    data_parallel_only: bool = False

    def __post_init__(self) -> None:
        if self.micro_batch is not None and self.micro_batch < 1:
            raise SearchSpaceError(f"must be >= 1, got {self.micro_batch}", field="micro_batch")
        if self.max_micro_batch < 1:
            raise SearchSpaceError(f"must be >= 1, got {self.max_micro_batch}", field="max_micro_batch")
        if not self.virtual_stages or any(v < 1 for v in self.virtual_stages):
            raise SearchSpaceError(f"must be >= 1, got {self.virtual_stages}", field="virtual_stages")
        bad = [z for z in self.zero_stages if z not in (0, 1, 2, 3)]
        if bad or not self.zero_stages:
            raise SearchSpaceError(f"ZeRO stages are 0..3, got {self.zero_stages}", field="zero_stages")


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One costed configuration: a layout with its optimizer placement and activation policy."""

    layout: Layout
    split: str  # how the blocks were split over the pipeline: even, front, back, head
    optimizer: StrategyResult
    activations: StrategyResult
    memory: MemoryBreakdown  # worst pipeline stage
    time: StepTime
    budget_bytes: int
    mapping: MappingResult | None = None  # set for the shapes whose rank mapping was searched

    @property
    def options(self) -> MemoryOptions:
        return self.activations.options

    @property
    def added_time_s(self) -> float:
        return self.optimizer.added_time_s + self.activations.added_time_s

    @property
    def step_s(self) -> float:
        return self.time.step_s

    @property
    def peak_bytes(self) -> int:
        return self.memory.total

    @property
    def fits(self) -> bool:
        return self.optimizer.fits and self.activations.fits and self.peak_bytes <= self.budget_bytes

    @property
    def shape(self) -> tuple[int, int, int, int]:
        lay = self.layout
        return (lay.dp, lay.tp, lay.pp, lay.cp)

    def describe(self) -> str:
        s = self.layout.describe()
        if self.layout.pp > 1:
            s += f" [{self.split}]"
        return (
            s
            + f" {self.activations.strategy}"
            + (f" opt:{self.optimizer.strategy}" if self.optimizer.strategy != "resident" else "")
        )

    def sort_key(self) -> tuple[float, int, int, str]:
        # fastest first; then the leaner one; then the plainer optimizer placement (interleaved
        # offload is chosen only when it is faster: at its no-device-update split it ties with
        # offload); then a stable textual order (determinism)
        return (
            self.step_s,
            self.peak_bytes,
            int(self.optimizer.strategy in PLACEMENT_STRATEGIES),
            self.describe(),
        )


@dataclass(frozen=True, kw_only=True)
class Shortfall:
    """The leanest configuration that still misses the budget."""

    need_bytes: int
    describe: str
    layout: Layout
    optimizer: str
    activations: str


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    ranked: tuple[Candidate, ...]  # the best candidate of each parallel shape, fastest first
    budget_bytes: int
    shapes: int  # (dp, tp, pp, cp) combinations that satisfy the hard constraints
    configurations: int  # (shape, split, ZeRO, optimizer placement) combinations considered
    pruned_by_states: int  # of those, dropped because the model states alone miss the budget
    solved: int  # strategy solves (memory evaluations)
    timed: int  # candidates that fit and were timed
    seconds: float
    mapping_seconds: float
    closest: Shortfall | None  # the smallest miss seen (exact peaks only; None if something fit)
    report: SolverReport

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    def top(self, k: int) -> tuple[Candidate, ...]:
        return self.ranked[:k]


# ---- enumeration -------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    """The divisors of n, ascending (trial division up to sqrt(n): a huge global batch stays cheap)."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def tp_choices(model: ModelSpec, world: int, max_tp: int | None = None) -> list[int]:
    kv = model.num_kv_heads
    return [
        t
        for t in _divisors(world)
        if model.num_heads % t == 0 and (kv % t == 0 or t % kv == 0) and (max_tp is None or t <= max_tp)
    ]


def cp_choices(workload: Workload, world: int, space: SearchSpace) -> list[int]:
    out = [1]
    if space.context_parallel and workload.seq_len >= space.cp_min_seq:
        c = 2
        while c <= world and workload.seq_len % c == 0 and workload.seq_len // c >= space.cp_min_chunk:
            if world % c == 0:
                out.append(c)
            c *= 2
    return out


def parallel_shapes(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, space: SearchSpace
) -> Iterator[tuple[int, int, int, int]]:
    """(dp, tp, pp, cp) with tp * cp * pp * dp = world and the hard constraints met."""
    world = cluster.world_size
    if space.data_parallel_only:
        if workload.global_batch % (world * (space.micro_batch or 1)) == 0:
            yield world, 1, 1, 1
        return
    for tp in tp_choices(model, world, space.max_tp):
        for cp in cp_choices(workload, world, space):
            if world % (tp * cp):
                continue
            for pp in _divisors(world // (tp * cp)):
                if pp > model.num_layers:
                    continue
                dp = world // (tp * cp * pp)
                mb_min = space.micro_batch or 1
                if workload.global_batch % (dp * mb_min):
                    continue
                yield dp, tp, pp, cp


def micro_batches(workload: Workload, dp: int, space: SearchSpace) -> list[int]:
    per_replica = workload.global_batch // dp
    if space.micro_batch is not None:
        return [space.micro_batch] if per_replica % space.micro_batch == 0 else []
    return [b for b in _divisors(per_replica) if b <= space.max_micro_batch]


def stage_splits(
    model: ModelSpec, workload: Workload, pp: int, *, uneven: bool = True
) -> list[tuple[str, tuple[int, ...]]]:
    """Ways to split the blocks over `pp` stages, each named.

    even/front  L // pp blocks each, the remainder on the first stages (Megatron, DeepSpeed
                `partition_method="uniform"`);
    back        the remainder on the stages before the last: the first stages hold the most
                in-flight micro-batches in 1F1B, the last holds the logits;
    head        balanced compute: the last stage also runs the LM head (2 * h * V FLOPs per
                token, `planner.flops`), so it gets fewer blocks.
    """
    L = model.num_layers
    if pp == 1:
        return [("even", ())]
    base, extra = divmod(L, pp)
    front = stage_layer_counts(model, pp)
    out: list[tuple[str, tuple[int, ...]]] = [("even" if extra == 0 else "front", front)]
    if not uneven:
        return out
    if extra:
        back = [base] * pp
        for i in range(extra):
            back[max(0, pp - 2 - i)] += 1
        out.append(("back", tuple(back)))
    # head-balanced: n_last blocks + head on the last stage, the rest spread over pp - 1
    lf = layer_forward_flops(model, workload.seq_len, workload.seq_len)
    hf = head_forward_flops(model, workload.seq_len)
    best: tuple[float, int] | None = None
    for n_last in range(1, L - (pp - 1) + 1):
        rest = L - n_last
        worst = max(-(-rest // (pp - 1)) * lf, n_last * lf + hf)
        if best is None or worst < best[0]:
            best = (worst, n_last)
    assert best is not None  # pp <= L, so the range above is never empty
    n_last = best[1]
    b2, e2 = divmod(L - n_last, pp - 1)
    head = [b2] * (pp - 1)
    for i in range(e2):
        head[pp - 2 - i] += 1  # extras away from the first stages (most in-flight activations)
    out.append(("head", (*head, n_last)))
    seen: set[tuple[int, ...]] = set()
    unique = []
    for name, split in out:
        if split not in seen:
            seen.add(split)
            unique.append((name, split))
    return unique


def zero_choices(space: SearchSpace, *, pp: int) -> list[int]:
    # DeepSpeed's pipeline engine supports ZeRO-1 at most (Megatron's distributed optimizer is ZeRO-1)
    return [z for z in space.zero_stages if pp == 1 or z <= 1]


def shape_variants(
    model: ModelSpec, workload: Workload, space: SearchSpace, *, pp: int
) -> Iterator[tuple[str, tuple[int, ...], int, int]]:
    """(split name, blocks per stage, ZeRO stage, virtual stages) for one parallel shape with `pp` stages."""
    for split_name, split in stage_splits(model, workload, pp, uneven=space.uneven_splits):
        chunks = [v for v in space.virtual_stages if v == 1 or (pp > 1 and all(n % v == 0 for n in split))]
        for zero in zero_choices(space, pp=pp):
            for v in chunks:
                yield split_name, split, zero, v


def full_layout(
    shape: tuple[int, int, int, int],
    workload: Workload,
    space: SearchSpace,
    *,
    micro_batch: int,
    zero: int,
    split: tuple[int, ...],
    virtual: int = 1,
) -> Layout:
    """The layout of a (dp, tp, pp, cp) shape at a micro-batch (grad_accum follows from the global batch)."""
    dp, tp, pp, cp = shape
    return Layout(
        dp=dp,
        tp=tp,
        pp=pp,
        cp=cp,
        micro_batch=micro_batch,
        grad_accum=workload.global_batch // (dp * micro_batch),
        zero_stage=zero,
        sequence_parallel=space.sequence_parallel and tp > 1,
        vocab_parallel=space.vocab_parallel and tp > 1,
        stage_layers=split,
        virtual_stages=virtual,
    )


def interleave_ok(layout: Layout) -> bool:
    """Megatron's interleaved schedule needs the micro-batches of a step to be a multiple of the stages."""
    return layout.virtual_stages == 1 or layout.grad_accum % layout.pp == 0


# ---- the search ---------------------------------------------------------------------------


@dataclass
class _Tally:
    configurations: int = 0
    pruned_by_states: int = 0
    solved: int = 0
    timed: int = 0
    closest: Shortfall | None = None

    def miss(self, need: int, layout: Layout, split: str, opt: str, act: str) -> None:
        if self.closest is None or need < self.closest.need_bytes:
            desc = layout.describe() + (f" [{split}]" if layout.pp > 1 else "") + f" {act} opt:{opt}"
            self.closest = Shortfall(
                need_bytes=need, describe=desc, layout=layout, optimizer=opt, activations=act
            )


def time_step(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    options: MemoryOptions,
    links: dict[str, GroupLink] | None,
    optimizer: StrategyResult,
    activations: StrategyResult,
) -> StepTime:
    """The step time with the strategies' `added_time_s`, each booked under its own term.

    Both enter the step through the step-time model's `swap_exposed_s` (so the step, TFLOP/s
    and MFU include them); the breakdown then books the activation strategy's exposed swap
    under "swap" and the optimizer strategy's correction under "optimizer" (interleaved offload:
    negative, the time it saves against the CPU-only update the model charges). `links` None:
    the slowest links of the default rank order (planner.comm.worst_group_links).
    """
    t = estimate_step_time(
        model,
        cluster,
        workload,
        layout,
        options,
        links=links,
        swap_exposed_s=optimizer.added_time_s + activations.added_time_s,
    )
    if not optimizer.added_time_s:
        return t
    return dataclasses.replace(
        t, optimizer_s=t.optimizer_s + optimizer.added_time_s, swap_s=activations.added_time_s
    )


def _run_strategies(
    base: StrategyInput,
    opt_strategy: Strategy,
    act_strategies: Sequence[Strategy],
    *,
    first_fit: bool,
    tally: _Tally,
    split: str,
) -> tuple[StrategyResult, list[StrategyResult]]:
    """The optimizer strategy, then the activation strategies; (optimizer result, fitting activation results)."""
    opt = opt_strategy.solve(base)
    tally.solved += 1
    fitting: list[StrategyResult] = []
    for act_strategy in act_strategies:
        inp = dataclasses.replace(base, options=opt.options)
        if not act_strategy.applies(inp):
            continue
        res = act_strategy.solve(inp)
        tally.solved += 1
        if res.fits:
            fitting.append(res)
            if first_fit:
                break
        else:
            tally.miss(res.device_bytes, base.layout, split, opt.strategy, res.strategy)
    return opt, fitting


@dataclass
class _Found:
    """The fitting candidates so far: the best of each parallel shape, and every variant of each."""

    best_by_shape: dict[tuple[int, int, int, int], Candidate] = field(default_factory=dict)
    variants: dict[tuple[int, int, int, int], list[Candidate]] = field(default_factory=dict)

    def add(self, cand: Candidate) -> None:
        key = cand.shape
        self.variants.setdefault(key, []).append(cand)
        if key not in self.best_by_shape or cand.sort_key() < self.best_by_shape[key].sort_key():
            self.best_by_shape[key] = cand

    def ranked(self) -> list[Candidate]:
        return sorted(self.best_by_shape.values(), key=Candidate.sort_key)


@dataclass(frozen=True, kw_only=True)
class _Problem:
    """What every step of one search reads."""

    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload
    budget_bytes: int
    space: SearchSpace
    time_limit_s: float = 10.0
    seed: int = 0

    @classmethod
    def of(cls, model: ModelSpec, cluster: ClusterSpec, workload: Workload, **kw: Any) -> _Problem:
        return cls(model=model, cluster=cluster, workload=workload, **kw)

    def input(self, layout: Layout, **changes: object) -> StrategyInput:
        kw: dict[str, object] = {
            "options": MemoryOptions.on(
                self.cluster, self.workload, loss_chunk_tokens=self.space.loss_chunk_tokens
            )
        }
        kw.update(changes)
        return StrategyInput(
            model=self.model,
            cluster=self.cluster,
            workload=self.workload,
            layout=layout,
            budget_bytes=self.budget_bytes,
            time_limit_s=self.time_limit_s,
            seed=self.seed,
            **kw,  # type: ignore[arg-type]
        )


def _search_shape(
    pb: _Problem,
    shape: tuple[int, int, int, int],
    optimizer_strategies: Sequence[Strategy],
    cheap_acts: Sequence[Strategy],
    tally: _Tally,
    found: _Found,
) -> None:
    """Every split, ZeRO stage, optimizer placement and micro-batch of one parallel shape, cheap strategies."""
    model, cluster, workload, space = pb.model, pb.cluster, pb.workload, pb.space
    dp, tp, pp, cp = shape
    links = LinkEvaluator(Layout(dp=dp, tp=tp, pp=pp, cp=cp), cluster).links(
        default_mapping(cluster.world_size)
    )
    mbs = micro_batches(workload, dp, space)
    for split_name, split, zero, virtual in shape_variants(model, workload, space, pp=pp):
        for opt_strategy in optimizer_strategies:
            probe = pb.input(
                Layout(dp=dp, tp=tp, pp=pp, cp=cp, zero_stage=zero, stage_layers=split), links=links
            )
            if not opt_strategy.applies(probe):
                continue
            if zero > 0 and dp * cp == 1 and opt_strategy.name == "resident":
                continue  # ZeRO without data parallelism partitions nothing
            tally.configurations += 1
            if not opt_strategy.solve(probe).fits:
                tally.pruned_by_states += 1
                continue
            for mb in mbs:
                layout = full_layout(
                    shape, workload, space, micro_batch=mb, zero=zero, split=split, virtual=virtual
                )
                if not interleave_ok(layout):
                    continue
                inp = dataclasses.replace(probe, layout=layout)
                opt, fitting = _run_strategies(
                    inp, opt_strategy, cheap_acts, first_fit=True, tally=tally, split=split_name
                )
                if not fitting:
                    break  # memory grows with the micro-batch: larger ones miss too
                act = fitting[0]
                validate_layout(model, cluster, workload, layout)
                assert act.memory is not None  # activation strategies return their breakdown
                t = time_step(model, cluster, workload, layout, act.options, links, opt, act)
                tally.timed += 1
                found.add(
                    Candidate(
                        layout=layout,
                        split=split_name,
                        optimizer=opt,
                        activations=act,
                        memory=act.memory,
                        time=t,
                        budget_bytes=pb.budget_bytes,
                    )
                )


def _refine(
    pb: _Problem, ranked: Sequence[Candidate], costly_acts: Sequence[Strategy], tally: _Tally, found: _Found
) -> None:
    """The expensive activation strategies (solvers) on the best few shapes."""
    for cand in ranked:
        links = LinkEvaluator(cand.layout, pb.cluster).links(default_mapping(pb.cluster.world_size))
        inp = pb.input(cand.layout, options=cand.optimizer.options, links=links)
        for strategy in costly_acts:
            if not strategy.applies(inp):
                continue
            res = strategy.solve(inp)
            tally.solved += 1
            if not res.fits or res.memory is None:
                continue
            t = time_step(
                pb.model, pb.cluster, pb.workload, cand.layout, res.options, links, cand.optimizer, res
            )
            tally.timed += 1
            found.add(dataclasses.replace(cand, activations=res, memory=res.memory, time=t))


def _map_ranked(
    pb: _Problem,
    ranked: list[Candidate],
    found: _Found,
    *,
    mapping_top: int,
    settings: AnnealSettings,
    progress: Callable[[str], None] | None,
) -> list[Candidate]:
    """The rank-to-device mapping searched for the best few shapes; the ranking again."""
    mapped = []
    for j, cand in enumerate(ranked[:mapping_top]):
        if progress:
            progress(f"rank mapping: {j + 1}/{min(mapping_top, len(ranked))} ({cand.describe()})")
        winner = map_candidate(pb.model, pb.cluster, pb.workload, cand, seed=pb.seed, settings=settings)
        mapping = winner.mapping
        assert mapping is not None
        # the other variants of this shape (split, ZeRO, micro-batch, strategies) under the
        # mapping found: the best variant with default links need not be the best with these
        for other in found.variants.get(cand.shape, []):
            if other is cand:
                continue
            alt = remap(pb.model, pb.cluster, pb.workload, other, mapping)
            if alt.step_s > other.step_s:
                alt = other  # this variant is faster in the default order
            if alt.sort_key() < winner.sort_key():
                winner = alt
        mapped.append(winner)
    return sorted(mapped + list(ranked[mapping_top:]), key=Candidate.sort_key)


def search(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    budget_bytes: int,
    space: SearchSpace | None = None,
    optimizer_strategies: Sequence[Strategy] = OPTIMIZER_STRATEGIES,
    activation_strategies: Sequence[Strategy] = ACTIVATION_BASELINES,
    mapping_top: int = 4,
    refine_top: int = 3,
    anneal: AnnealSettings | None = None,
    seed: int = 0,
    time_limit_s: float = 10.0,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """All layouts that fit, best per parallel shape, fastest first; the best few rank-mapped."""
    space = space or SearchSpace()
    pb = _Problem.of(
        model, cluster, workload, budget_bytes=budget_bytes, space=space, time_limit_s=time_limit_s, seed=seed
    )
    t0 = time.perf_counter()
    tally = _Tally()
    found = _Found()
    cheap_acts = [s for s in activation_strategies if not s.expensive]
    costly_acts = [s for s in activation_strategies if s.expensive]
    shapes = list(parallel_shapes(model, cluster, workload, space))
    for i, shape in enumerate(shapes):
        if progress and i % max(1, len(shapes) // 10) == 0:
            dp, tp, pp, cp = shape
            progress(f"layout search: shape {i + 1}/{len(shapes)} (dp{dp} tp{tp} pp{pp} cp{cp})")
        _search_shape(pb, shape, optimizer_strategies, cheap_acts, tally, found)
    ranked = found.ranked()
    if costly_acts and ranked:
        _refine(pb, ranked[:refine_top], costly_acts, tally, found)
        ranked = found.ranked()
    t_map = time.perf_counter()
    if mapping_top > 0 and ranked:
        settings = anneal or AnnealSettings(time_limit_s=time_limit_s)
        ranked = _map_ranked(pb, ranked, found, mapping_top=mapping_top, settings=settings, progress=progress)
    mapping_seconds = time.perf_counter() - t_map
    seconds = time.perf_counter() - t0
    best = ranked[0] if ranked else None
    return SearchResult(
        ranked=tuple(ranked),
        budget_bytes=budget_bytes,
        shapes=len(shapes),
        configurations=tally.configurations,
        pruned_by_states=tally.pruned_by_states,
        solved=tally.solved,
        timed=tally.timed,
        seconds=seconds,
        mapping_seconds=mapping_seconds,
        closest=None if ranked else tally.closest,
        report=SolverReport(
            problem="layout",
            strategy="enumerate",
            status="feasible" if ranked else "infeasible",
            objective=best.step_s if best else 0.0,
            seconds=seconds,
        ),
    )


def map_candidate(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    cand: Candidate,
    *,
    seed: int = 0,
    settings: AnnealSettings | None = None,
) -> Candidate:
    """The candidate with its rank-to-device mapping searched (never slower than the default)."""
    opt, act = cand.optimizer, cand.activations

    def cost(links: dict[str, GroupLink]) -> float:
        return time_step(model, cluster, workload, cand.layout, cand.options, links, opt, act).step_s

    result = anneal_mapping(cand.layout, cluster, cost, seed=seed, settings=settings)
    names = tuple(cluster.device_name(d) for d in result.mapping)
    layout = dataclasses.replace(cand.layout, rank_to_device=names)
    t = time_step(model, cluster, workload, layout, cand.options, result.links, opt, act)
    return dataclasses.replace(cand, layout=layout, time=t, mapping=result)


def remap(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, cand: Candidate, mapping: MappingResult
) -> Candidate:
    """`cand` re-timed on a mapping found for another candidate of the same shape."""
    evaluator = LinkEvaluator(cand.layout, cluster)
    links = evaluator.links(np.asarray(mapping.mapping))
    layout = dataclasses.replace(
        cand.layout, rank_to_device=tuple(cluster.device_name(d) for d in mapping.mapping)
    )
    opt, act = cand.optimizer, cand.activations
    t = time_step(model, cluster, workload, layout, cand.options, links, opt, act)
    default_links = evaluator.links(default_mapping(cluster.world_size))
    default_t = time_step(model, cluster, workload, cand.layout, cand.options, default_links, opt, act)
    result = dataclasses.replace(mapping, step_s=t.step_s, default_step_s=default_t.step_s, links=links)
    return dataclasses.replace(cand, layout=layout, time=t, mapping=result)


def least_memory(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    *,
    space: SearchSpace | None = None,
    optimizer_strategies: Sequence[Strategy] = OPTIMIZER_STRATEGIES,
    activation_strategies: Sequence[Strategy] = ACTIVATION_BASELINES,
) -> dict[str, Shortfall]:
    """Per optimizer placement, the configuration with the smallest peak (memory only, no timing).

    The leanest micro-batch and every activation strategy are tried on every shape, split
    and ZeRO stage: this is what an infeasible answer reports. Configurations whose host
    bytes overflow the host tiers are left out (no device memory would make them fit).
    """
    space = space or SearchSpace()
    out: dict[str, Shortfall] = {}
    # no device budget: the strategies report what each configuration needs
    pb = _Problem.of(model, cluster, workload, budget_bytes=1 << 62, space=space)
    for dp, tp, pp, cp in parallel_shapes(model, cluster, workload, space):
        mbs = micro_batches(workload, dp, space)
        if not mbs:
            continue
        mb = mbs[0]
        for split_name, split, zero, virtual in shape_variants(model, workload, space, pp=pp):
            layout = full_layout(
                (dp, tp, pp, cp), workload, space, micro_batch=mb, zero=zero, split=split, virtual=virtual
            )
            if not interleave_ok(layout):
                continue
            base = pb.input(layout)
            for opt_strategy in optimizer_strategies:
                if not opt_strategy.applies(base):
                    continue
                opt = opt_strategy.solve(base)
                if not host_fits(cluster, opt.host_bytes):
                    continue  # the optimizer state overflows the host tiers whatever the device holds
                for act_strategy in activation_strategies:
                    inp = dataclasses.replace(base, options=opt.options, budget_bytes=0)
                    if act_strategy.expensive or not act_strategy.applies(inp):
                        continue
                    res = act_strategy.solve(inp)
                    if not host_fits(cluster, res.host_bytes):
                        continue  # no device budget makes this fit: the host tiers are too small
                    cur = out.get(opt.strategy)
                    if cur is None or res.device_bytes < cur.need_bytes:
                        desc = layout.describe() + (f" [{split_name}]" if pp > 1 else "")
                        out[opt.strategy] = Shortfall(
                            need_bytes=res.device_bytes,
                            describe=f"{desc} {res.strategy}",
                            layout=layout,
                            optimizer=opt.strategy,
                            activations=res.strategy,
                        )
    return out
