"""Offsets of one block's tensors in a single reuse arena (dynamic storage allocation).

The tensors one transformer block allocates in forward + backward (sizes and
lifetimes from `planner.lifetimes.trace_block`) get fixed byte offsets in one arena
so that tensors alive at the same time never share bytes; the arena's size is
minimised. Every block of a model runs the same request sequence, so one answer is
reused by every layer: MEMO (Zhao et al. 2024, arXiv 2407.12117) solves this as
the first level of its bi-level MIP to stop fragmentation.

Strategies, all returning a `BufferSolution`:
- "mip": the DSA MIP (OLLA, Steiner et al. 2022, arXiv 2210.12924; MEMO): one ordering binary
  per pair of tensors whose lifetimes overlap (pairs that never coexist need no
  constraint), warm-started from best-fit improved by a short seeded local search,
  and falling back to that layout (status "fallback") when the solver does not beat
  it within its time limit. Past `max_pair_binaries` pairs only the tensors around the
  arena's top get binaries (a large-neighbourhood step), so hundreds of tensors stay
  solvable in the time limit. Done early whenever a layout comes within the relative gap
  (`MipSettings.gap_rel`) of the live-bytes lower bound. With `deterministic` (what
  `memtier plan` uses) the answer does not depend on the machine's speed: the local search
  has no deadline and only a proven-optimal MIP layout replaces the heuristic's.
- "best_fit": offline greedy by size with best-fit gaps (Pisarchyk & Lee 2020,
  "Efficient Memory Management for Deep Neural Net Inference", greedy by size), over a few
  orderings, keeping the smallest arena.
- "bump": no reuse at all; every tensor gets fresh bytes (the arena is the sum of sizes).
- "caching_allocator": a simulation of PyTorch's CUDA caching allocator replaying the
  same malloc/free sequence (its rounding, pools, segment sizes, best-fit block choice,
  splitting and coalescing; segments are never returned). Its peak reserved bytes is
  what the allocator itself would need on a GPU; on CPU, where torch uses plain
  malloc, this simulation is the allocator-peak reference.

fragmentation = arena bytes / live-bytes peak (>= 1; 1 means no byte is wasted at the peak).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from planner.errors import SpecError
from planner.mip.common import MipSettings, SolverStatus, relative_gap, run_mip
from planner.plan import SolverReport

# Largest offset the MIP sees, in its size units: sizes are expressed in units of
# alignment * 2^k so that the arena spans at most this many units (keeps big-M O(1e6)).
_MAX_MIP_UNITS = 1_000_000


class BufferInputError(SpecError):
    """Tensors or settings the buffer solver cannot use (names the field)."""


class Lifetime(Protocol):
    """What the solver reads from each tensor (planner.lifetimes.TensorLife has it)."""

    @property
    def size_bytes(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


@dataclass(frozen=True, kw_only=True)
class BufferSettings:
    alignment_bytes: int = field(
        default=512, metadata={"positive": True}
    )  # every offset is a multiple of this
    mip: MipSettings = field(default_factory=MipSettings)
    # the MIP's warm start is improved first by a seeded local search over best-fit orders,
    # for at most this many trials and at most search_share of the time limit
    search_iterations: int = field(default=300, metadata={"min": 0})
    search_share: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0})
    # at most this many ordering binaries: beyond it, the MIP moves only the tensors around the
    # arena's top (the others stay where the warm start put them), so big instances stay solvable
    max_pair_binaries: int = field(default=2000, metadata={"min": 0})
    seed: int = 0
    # the same answer on every run, whatever the machine's load: the local search runs all its
    # iterations (no deadline) and a MIP layout is taken only when the solver proved it optimal
    # (a time-limited incumbent depends on how far the solver got). `memtier plan` sets it.
    deterministic: bool = False

    def __post_init__(self) -> None:
        a = self.alignment_bytes
        if isinstance(a, bool) or not isinstance(a, int) or a < 1 or a & (a - 1):
            raise BufferInputError(f"must be a power of two >= 1, got {a!r}", field="alignment_bytes")
        if (
            isinstance(self.search_iterations, bool)
            or not isinstance(self.search_iterations, int)
            or self.search_iterations < 0
        ):
            raise BufferInputError(
                f"must be an integer >= 0, got {self.search_iterations!r}", field="search_iterations"
            )
        if not (isinstance(self.search_share, int | float) and 0.0 <= self.search_share <= 1.0):
            raise BufferInputError(f"must be in [0, 1], got {self.search_share!r}", field="search_share")


@dataclass(frozen=True, kw_only=True)
class BufferSolution:
    """Offsets of every tensor in one arena; the same type for the MIP and the baselines."""

    strategy: str  # "mip", "best_fit", "bump", "caching_allocator"
    status: SolverStatus
    offsets: tuple[int, ...]  # byte offset of tensor i in the arena, in input order
    arena_bytes: int  # bytes the arena needs (max over tensors of offset + aligned size)
    live_peak_bytes: int  # max over time of the bytes alive (unaligned): a lower bound for any arena
    fragmentation: float  # arena_bytes / live_peak_bytes
    gap: float | None  # relative gap to the best proven lower bound; None for heuristics
    seconds: float

    def report(self) -> SolverReport:
        return SolverReport(
            problem="buffers",
            strategy=self.strategy,
            status=self.status,
            objective=float(self.arena_bytes),
            gap=self.gap,
            seconds=self.seconds,
            fragmentation=self.fragmentation,
        )


# ---- shared helpers -----------------------------------------------------------------------------


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _check(tensors: Sequence[Lifetime]) -> None:
    for i, t in enumerate(tensors):
        for name in ("size_bytes", "start", "end"):
            v = getattr(t, name, None)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BufferInputError(f"must be an integer >= 0, got {v!r}", field=f"tensors[{i}].{name}")
        if t.end <= t.start:
            raise BufferInputError(f"end({t.end}) must be > start({t.start})", field=f"tensors[{i}].end")


def live_peak(tensors: Sequence[Lifetime], sizes: Sequence[int] | None = None) -> int:
    """Max over time of the bytes alive (with `sizes` instead of the tensors' own, if given)."""
    delta: dict[int, int] = {}
    for i, t in enumerate(tensors):
        size = t.size_bytes if sizes is None else sizes[i]
        delta[t.start] = delta.get(t.start, 0) + size
        delta[t.end] = delta.get(t.end, 0) - size
    live = peak = 0
    for time_index in sorted(delta):
        live += delta[time_index]
        peak = max(peak, live)
    return peak


def overlapping_pairs(tensors: Sequence[Lifetime]) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, alive at a common op index: the only pairs that need an order."""
    order = sorted(range(len(tensors)), key=lambda i: tensors[i].start)
    pairs: list[tuple[int, int]] = []
    active: list[int] = []
    for i in order:
        s = tensors[i].start
        active = [j for j in active if tensors[j].end > s]
        pairs.extend((min(i, j), max(i, j)) for j in active)
        active.append(i)
    pairs.sort()
    return pairs


def check_offsets(tensors: Sequence[Lifetime], offsets: Sequence[int], *, alignment_bytes: int = 1) -> None:
    """Raise BufferInputError if two tensors alive together share a byte or an offset is misaligned."""
    if len(offsets) != len(tensors):
        raise BufferInputError(f"{len(offsets)} offsets for {len(tensors)} tensors", field="offsets")
    for i, o in enumerate(offsets):
        if o < 0 or o % alignment_bytes:
            raise BufferInputError(
                f"offset {o} is negative or not {alignment_bytes}-aligned", field=f"offsets[{i}]"
            )
    for i, j in overlapping_pairs(tensors):
        a, b = tensors[i], tensors[j]
        if (
            a.size_bytes
            and b.size_bytes
            and offsets[i] < offsets[j] + b.size_bytes
            and offsets[j] < offsets[i] + a.size_bytes
        ):
            raise BufferInputError(
                f"tensors {i} [{offsets[i]}, +{a.size_bytes}) and {j} [{offsets[j]}, +{b.size_bytes}) "
                f"are alive together at ops [{max(a.start, b.start)}, {min(a.end, b.end)}) and overlap",
                field=f"offsets[{j}]",
            )


def _solution(
    strategy: str,
    tensors: Sequence[Lifetime],
    offsets: Sequence[int],
    sizes: Sequence[int],
    *,
    status: SolverStatus,
    gap: float | None,
    started: float,
    arena_bytes: int | None = None,
) -> BufferSolution:
    arena = (
        arena_bytes if arena_bytes is not None else max((o + s for o, s in zip(offsets, sizes)), default=0)
    )
    peak = live_peak(tensors)
    return BufferSolution(
        strategy=strategy,
        status=status,
        offsets=tuple(int(o) for o in offsets),
        arena_bytes=int(arena),
        live_peak_bytes=peak,
        fragmentation=arena / peak if peak else 1.0,
        gap=gap,
        seconds=time.perf_counter() - started,
    )


def compact(tensors: Sequence[Lifetime], sizes: Sequence[int], order: Sequence[int]) -> list[int]:
    """Lowest offsets consistent with a bottom-to-top `order`: each tensor sits on the highest
    earlier-ordered tensor it coexists with (a longest path over the order; never overlaps)."""
    rank = {i: r for r, i in enumerate(order)}
    neighbours: dict[int, list[int]] = {i: [] for i in range(len(tensors))}
    for i, j in overlapping_pairs(tensors):
        if rank[i] < rank[j]:
            neighbours[j].append(i)
        else:
            neighbours[i].append(j)
    offsets = [0] * len(tensors)
    for j in order:
        offsets[j] = max((offsets[i] + sizes[i] for i in neighbours[j] if sizes[i]), default=0)
    return offsets


# ---- baselines ------------------------------------------------------------------------------------


def bump(tensors: Sequence[Lifetime], settings: BufferSettings | None = None) -> BufferSolution:
    """No reuse: tensors get consecutive fresh bytes in allocation order."""
    started = time.perf_counter()
    settings = settings or BufferSettings()
    _check(tensors)
    sizes = [_align(t.size_bytes, settings.alignment_bytes) for t in tensors]
    offsets = [0] * len(tensors)
    top = 0
    for i in sorted(range(len(tensors)), key=lambda i: (tensors[i].start, i)):
        offsets[i] = top
        top += sizes[i]
    return _solution("bump", tensors, offsets, sizes, status="feasible", gap=None, started=started)


def _best_fit_order(tensors: Sequence[Lifetime], sizes: Sequence[int], order: Sequence[int]) -> list[int]:
    """Place tensors in `order`, each in the smallest gap among coexisting placed tensors that holds it."""
    offsets = [-1] * len(tensors)
    placed: list[int] = []
    for i in order:
        t, size = tensors[i], sizes[i]
        if size == 0:
            offsets[i] = 0
            continue
        busy = sorted(
            (offsets[j], offsets[j] + sizes[j])
            for j in placed
            if tensors[j].start < t.end and t.start < tensors[j].end
        )
        best_offset, best_gap = -1, None
        cursor = 0
        for lo, hi in busy:
            if lo - cursor >= size and (best_gap is None or lo - cursor < best_gap):
                best_offset, best_gap = cursor, lo - cursor
            cursor = max(cursor, hi)
        offsets[i] = best_offset if best_offset >= 0 else cursor
        placed.append(i)
    return offsets


_ORDERINGS: dict[str, Callable[[Lifetime, int], tuple[float, ...]]] = {
    # Pisarchyk & Lee 2020: largest first; ties by longer lifetime
    "size": lambda t, size: (-size, -(t.end - t.start), t.start),
    "area": lambda t, size: (-size * (t.end - t.start), -size, t.start),
    "lifetime": lambda t, size: (-(t.end - t.start), -size, t.start),
    "start": lambda t, size: (t.start, -size),
}


def _best_fit_search(tensors: Sequence[Lifetime], sizes: Sequence[int]) -> tuple[list[int], list[int], int]:
    """(order, offsets, arena) of the best ordering in _ORDERINGS under best-fit placement."""
    best: tuple[list[int], list[int], int] | None = None
    for key in _ORDERINGS.values():
        order = sorted(range(len(tensors)), key=lambda i, key=key: (*key(tensors[i], sizes[i]), i))  # type: ignore[misc]
        offsets = _best_fit_order(tensors, sizes, order)
        arena = max((o + s for o, s in zip(offsets, sizes)), default=0)
        if best is None or arena < best[2]:
            best = (order, offsets, arena)
    return best if best is not None else ([], [], 0)


def best_fit(tensors: Sequence[Lifetime], settings: BufferSettings | None = None) -> BufferSolution:
    """Greedy by size with best-fit gaps (Pisarchyk & Lee 2020), best of a few orderings."""
    started = time.perf_counter()
    settings = settings or BufferSettings()
    _check(tensors)
    sizes = [_align(t.size_bytes, settings.alignment_bytes) for t in tensors]
    _, offsets, _ = _best_fit_search(tensors, sizes)
    return _solution("best_fit", tensors, offsets, sizes, status="feasible", gap=None, started=started)


def _local_search(
    tensors: Sequence[Lifetime],
    sizes: Sequence[int],
    order: list[int],
    arena: int,
    *,
    iterations: int,
    seed: int,
    deadline: float,
    lower: int,
) -> tuple[list[int], int]:
    """Hill-climb over best-fit placement orders: move a few tensors in the order, keep the
    result when the arena does not grow (plateaus are walked). Seeded, so deterministic
    unless the deadline cuts it short. Returns the best (offsets, arena) seen."""
    rng = random.Random(seed)
    current, current_arena = list(order), arena
    best_offsets, best_arena = _best_fit_order(tensors, sizes, current), arena
    n = len(current)
    if n < 2:
        return best_offsets, best_arena
    for _ in range(iterations):
        if best_arena <= lower or time.perf_counter() > deadline:
            break
        trial = list(current)
        for _ in range(rng.randint(1, 4)):
            a, b = rng.randrange(n), rng.randrange(n)
            trial.insert(b, trial.pop(a))
        offsets = _best_fit_order(tensors, sizes, trial)
        trial_arena = max((o + s for o, s in zip(offsets, sizes)), default=0)
        if trial_arena <= current_arena:
            current, current_arena = trial, trial_arena
            if trial_arena < best_arena:
                best_offsets, best_arena = offsets, trial_arena
    return best_offsets, best_arena


# PyTorch CUDA caching allocator constants (c10/cuda/CUDACachingAllocator.cpp)
_K_MIN_BLOCK = 512  # kMinBlockSize: every request is rounded up to a multiple of this
_K_SMALL_SIZE = 1 << 20  # kSmallSize: requests up to 1 MiB come from the small pool
_K_SMALL_BUFFER = 2 << 20  # kSmallBuffer: small-pool segments are 2 MiB
_K_LARGE_BUFFER = 20 << 20  # kLargeBuffer: large requests under kMinLargeAlloc get a 20 MiB segment
_K_MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
_K_ROUND_LARGE = 2 << 20  # kRoundLarge: bigger segments are rounded up to 2 MiB


@dataclass
class _Block:
    segment: int
    offset: int  # within its segment
    size: int
    free: bool


def caching_allocator(tensors: Sequence[Lifetime], settings: BufferSettings | None = None) -> BufferSolution:
    """Replay the tensors' malloc/free sequence through a simulated CUDA caching allocator.

    Rules simulated (from c10/cuda/CUDACachingAllocator.cpp, one stream, no
    max_split_size, no empty_cache): round to 512 B; requests <= 1 MiB use the small
    pool (2 MiB segments), larger ones the large pool (20 MiB segments below 10 MiB,
    else the request rounded to 2 MiB); the smallest free cached block that fits is
    reused (best fit by size, then address); a block is split when the rest is >= 512 B
    (small pool) or > 1 MiB (large pool); freed blocks coalesce with free neighbours in
    their segment. The arena is the peak reserved bytes (all segments, laid end to end).
    """
    started = time.perf_counter()
    settings = settings or BufferSettings()
    _check(tensors)
    segments: list[int] = []  # segment sizes, in creation order
    segment_small: list[bool] = []  # True: the segment belongs to the small pool
    seg_blocks: list[list[_Block]] = []  # blocks of each segment, by offset
    offsets_in_seg: list[tuple[int, int]] = [(0, 0)] * len(tensors)
    held: dict[int, _Block] = {}
    sizes = [max(_K_MIN_BLOCK, _align(t.size_bytes, _K_MIN_BLOCK)) for t in tensors]

    events: list[tuple[int, int, int]] = []  # (op index, 0 = free / 1 = malloc, tensor)
    for i, t in enumerate(tensors):
        if t.size_bytes:
            events.append((t.start, 1, i))
            events.append((t.end, 0, i))
    events.sort()  # frees at op i come before mallocs at op i: half-open lifetimes

    for _time_index, kind, i in events:
        if kind == 0:
            block = held.pop(i)
            block.free = True
            blocks = seg_blocks[block.segment]
            k = blocks.index(block)
            # coalesce with the next, then the previous free block of the same segment
            if k + 1 < len(blocks) and blocks[k + 1].free:
                block.size += blocks.pop(k + 1).size
            if k > 0 and blocks[k - 1].free:
                blocks[k - 1].size += block.size
                blocks.pop(k)
            continue
        size = sizes[i]
        small = size <= _K_SMALL_SIZE
        candidates = [
            b
            for seg, blocks in enumerate(seg_blocks)
            if segment_small[seg] == small
            for b in blocks
            if b.free and b.size >= size
        ]
        if candidates:
            block = min(candidates, key=lambda b: (b.size, b.segment, b.offset))
        else:
            if small:
                seg_size = _K_SMALL_BUFFER
            elif size < _K_MIN_LARGE_ALLOC:
                seg_size = _K_LARGE_BUFFER
            else:
                seg_size = _align(size, _K_ROUND_LARGE)
            segments.append(seg_size)
            segment_small.append(small)
            block = _Block(segment=len(segments) - 1, offset=0, size=seg_size, free=True)
            seg_blocks.append([block])
        rest = block.size - size
        if (small and rest >= _K_MIN_BLOCK) or (not small and rest > _K_SMALL_SIZE):
            blocks = seg_blocks[block.segment]
            k = blocks.index(block)
            blocks.insert(
                k + 1, _Block(segment=block.segment, offset=block.offset + size, size=rest, free=True)
            )
            block.size = size
        block.free = False
        held[i] = block
        offsets_in_seg[i] = (block.segment, block.offset)

    bases = [0]
    for s in segments:
        bases.append(bases[-1] + s)
    offsets = [
        bases[seg] + off if tensors[i].size_bytes else 0 for i, (seg, off) in enumerate(offsets_in_seg)
    ]
    return _solution(
        "caching_allocator",
        tensors,
        offsets,
        sizes,
        status="feasible",
        gap=None,
        started=started,
        arena_bytes=bases[-1],
    )


# ---- the MIP ------------------------------------------------------------------------------------


def _identical_groups_sorted(tensors: Sequence[Lifetime], offsets: list[int]) -> list[int]:
    """The same layout with identical tensors (size, start, end) reassigned so that lower index means
    lower offset: swapping identical tensors changes nothing, and the MIP fixes this order."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.size_bytes, t.start, t.end), []).append(i)
    out = list(offsets)
    for members in groups.values():
        if len(members) > 1:
            for i, o in zip(members, sorted(offsets[i] for i in members)):
                out[i] = o
    return out


def _free_set(
    tensors: Sequence[Lifetime],
    live: list[int],
    pairs: list[tuple[int, int]],
    offsets: Sequence[int],
    w: Sequence[int],
    max_pairs: int,
) -> set[int]:
    """Tensors the MIP may move: all of them when their pairs fit in max_pairs binaries, else
    (a large-neighbourhood step) those alive with the tensor on top of the arena, highest first,
    while the pairs among them fit."""
    if len(pairs) <= max_pairs:
        return set(live)
    top = max(live, key=lambda i: (offsets[i] + w[i], -i))
    t = tensors[top]
    candidates = sorted(
        (i for i in live if tensors[i].start < t.end and t.start < tensors[i].end),
        key=lambda i: (-(offsets[i] + w[i]), i),
    )
    free: list[int] = []
    count = 0
    for i in candidates:
        added = sum(
            1 for j in free if tensors[i].start < tensors[j].end and tensors[j].start < tensors[i].end
        )
        if count + added > max_pairs:
            break
        free.append(i)
        count += added
    return set(free)


def solve_mip(tensors: Sequence[Lifetime], settings: BufferSettings | None = None) -> BufferSolution:
    """Dynamic storage allocation as a MIP (OLLA's address ILP, MEMO's first level), warm-started from best-fit.

    1. Best-fit over a few orderings; done ("optimal") if it reaches the live-bytes lower bound.
    2. A seeded local search over best-fit orders improves that start (search_share of the time).
    3. The MIP, warm-started from the best layout so far, runs for the rest of the time limit.
    The MIP's layout is returned when it is smaller (status "optimal" or "time_limit"), else
    the heuristic layout with status "fallback" ("optimal" when the MIP proved it optimal).
    """
    started = time.perf_counter()
    settings = settings or BufferSettings()
    _check(tensors)
    align = settings.alignment_bytes
    sizes = [_align(t.size_bytes, align) for t in tensors]
    lower = live_peak(tensors, sizes)  # no arena is smaller than the aligned bytes alive at one time
    # within the relative gap of the live-bytes bound: optimal as far as the settings ask
    close_enough = lower * (1 + settings.mip.gap_rel)
    incumbent, incumbent_arena = _heuristic_layout(
        tensors, sizes, settings, started=started, lower=lower, close_enough=close_enough
    )

    def heuristic(status: SolverStatus, gap: float | None) -> BufferSolution:
        return _solution("mip", tensors, incumbent, sizes, status=status, gap=gap, started=started)

    if incumbent_arena <= close_enough:
        return heuristic("optimal", relative_gap(incumbent_arena, float(lower)))
    incumbent = _identical_groups_sorted(tensors, incumbent)

    # MIP units: sizes in multiples of unit_bytes (alignment * 2^k) so the arena is at most
    # _MAX_MIP_UNITS units; rounding sizes up keeps every MIP layout valid in bytes.
    unit_bytes = align  # UNIT: bytes per MIP size unit
    while incumbent_arena / unit_bytes > _MAX_MIP_UNITS:
        unit_bytes *= 2
    w = [-(-s // unit_bytes) for s in sizes]  # tensor i's size, units
    live = [i for i in range(len(tensors)) if w[i] > 0]
    # the warm start: the incumbent's bottom-to-top order, compacted in units (feasible by construction)
    start_order = sorted(live, key=lambda i: (incumbent[i], i))
    start_offsets = compact(tensors, w, start_order)
    upper = max((start_offsets[i] + w[i] for i in live), default=0)  # big-M: the warm start's arena, units
    all_pairs = [(i, j) for i, j in overlapping_pairs(tensors) if w[i] and w[j]]
    free = _free_set(tensors, live, all_pairs, start_offsets, w, settings.max_pair_binaries)
    # the MIP's bound bounds the real arena only when it sees every tensor at its real aligned size
    exact = unit_bytes == align and len(free) == len(live)
    if settings.deterministic and not exact:
        # such a MIP can never prove its layout optimal, and a time-limited incumbent is not
        # taken in deterministic mode: the heuristic's layout stands, without the solver's time
        return heuristic("fallback", relative_gap(incumbent_arena, float(lower)))
    fixed_top = max((start_offsets[i] + w[i] for i in live if i not in free), default=0)
    # the arena is at least the live-bytes lower bound and the fixed tensors' top, units
    arena_floor = max(fixed_top, -(-lower // unit_bytes) if unit_bytes == align else 0)
    model = _dsa_model(tensors, w, all_pairs, free, start_offsets, upper=upper, arena_floor=arena_floor)
    remaining = settings.mip.time_limit_s - (time.perf_counter() - started)
    outcome = run_mip(model.problem, replace(settings.mip, time_limit_s=max(0.1, remaining)), warm_start=True)

    bound_bytes = float(lower)
    if outcome.bound is not None and exact:
        bound_bytes = max(bound_bytes, outcome.bound * unit_bytes)
    if outcome.has_solution:
        # bytes from the MIP's order: compaction gives integer, aligned, non-overlapping offsets
        # no higher than the MIP's own (exactly its layout when its offsets are integral)
        values = {
            i: float(model.offset[i].varValue or 0.0) if i in free else float(start_offsets[i]) for i in live
        }
        offsets = compact(tensors, sizes, sorted(live, key=lambda i: (values[i], i)))
        arena_bytes = max((offsets[i] + sizes[i] for i in live), default=0)
        status: SolverStatus = "optimal" if exact and outcome.status == "optimal" else "time_limit"
        if arena_bytes < incumbent_arena and (status == "optimal" or not settings.deterministic):
            offsets = [offsets[i] if w[i] else 0 for i in range(len(tensors))]
            return _solution(
                "mip",
                tensors,
                offsets,
                sizes,
                status=status,
                gap=relative_gap(arena_bytes, bound_bytes),
                started=started,
            )
    if exact and outcome.status == "optimal":
        return heuristic("optimal", 0.0)
    return heuristic("fallback", relative_gap(incumbent_arena, bound_bytes))


def _heuristic_layout(
    tensors: Sequence[Lifetime],
    sizes: Sequence[int],
    settings: BufferSettings,
    *,
    started: float,
    lower: int,
    close_enough: float,
) -> tuple[list[int], int]:
    """The MIP's warm start, (offsets, arena bytes): best-fit over a few orderings, improved by the seeded
    local search unless it is already within `close_enough` bytes."""
    order, incumbent, incumbent_arena = _best_fit_search(tensors, sizes)
    if incumbent_arena <= close_enough:
        return incumbent, incumbent_arena
    return _local_search(
        tensors,
        sizes,
        order,
        incumbent_arena,
        iterations=settings.search_iterations,
        seed=settings.seed,
        deadline=(
            float("inf")
            if settings.deterministic
            else started + settings.search_share * settings.mip.time_limit_s
        ),
        lower=lower,
    )


def _bounds_beside_fixed(
    all_pairs: Sequence[tuple[int, int]],
    free: set[int],
    start_offsets: Sequence[int],
    w: Sequence[int],
    upper: int,
) -> tuple[dict[int, int], dict[int, int]]:
    """(lowest, highest) offset of each free tensor, units: free tensors keep their place relative to the
    fixed ones they coexist with (bounds, not binaries)."""
    low = {i: 0 for i in free}
    high = {i: upper - w[i] for i in free}
    for i, j in all_pairs:
        if (i in free) == (j in free):
            continue
        f, x = (i, j) if i in free else (j, i)
        if (start_offsets[x], x) < (start_offsets[f], f):
            low[f] = max(low[f], start_offsets[x] + w[x])
        else:
            high[f] = min(high[f], start_offsets[x] - w[f])
    return low, high


@dataclass
class _DsaModel:
    problem: Any  # pulp.LpProblem
    offset: dict[int, Any]  # pulp.LpVariable per free tensor: its offset in the arena, units


def _dsa_model(
    tensors: Sequence[Lifetime],
    w: Sequence[int],
    all_pairs: Sequence[tuple[int, int]],
    free: set[int],
    start_offsets: Sequence[int],
    *,
    upper: int,
    arena_floor: int,
) -> _DsaModel:
    """The address MIP over the free tensors (sizes `w` in units, big-M `upper`), warm-started from
    `start_offsets`; the other tensors stay where the warm start put them."""
    import pulp

    pairs = [(i, j) for i, j in all_pairs if i in free and j in free]
    low, high = _bounds_beside_fixed(all_pairs, free, start_offsets, w, upper)
    prob = pulp.LpProblem("buffers", pulp.LpMinimize)
    # offset[i]: offset of free tensor i in the arena, units (fixed tensors stay at the warm start's)
    offset = {i: pulp.LpVariable(f"offset_{i}", low[i], high[i]) for i in sorted(free)}
    # arena: the arena's size, units; at least the live-bytes lower bound and the fixed tensors' top
    arena = pulp.LpVariable("arena", arena_floor, upper)
    # below[i, j]: 1 when tensor i lies below tensor j, 0 when above (only free pairs alive together)
    below: dict[tuple[int, int], object] = {}
    for i, j in pairs:
        ti, tj = tensors[i], tensors[j]
        if (ti.size_bytes, ti.start, ti.end) == (tj.size_bytes, tj.start, tj.end):
            below[i, j] = 1  # identical tensors are interchangeable: fix their order (symmetry breaking)
        else:
            below[i, j] = pulp.LpVariable(f"below_{i}_{j}", cat=pulp.LpBinary)
    # [Objective] the arena's size
    prob += arena, "arena"
    for i in sorted(free):
        # [Constraint] every tensor lies inside the arena
        prob += offset[i] + w[i] <= arena, f"inside_{i}"
    for i, j in pairs:
        z = below[i, j]
        # [Constraint] tensors alive together do not overlap: i below j, or j below i (big-M = upper)
        prob += offset[i] + w[i] <= offset[j] + upper * (1 - z), f"i_below_{i}_{j}"  # type: ignore[operator]
        prob += offset[j] + w[j] <= offset[i] + upper * z, f"j_below_{i}_{j}"  # type: ignore[operator]

    for i in free:
        offset[i].setInitialValue(start_offsets[i])
    arena.setInitialValue(upper)
    for (i, j), z in below.items():
        if not isinstance(z, int):
            z.setInitialValue(1 if (start_offsets[i], i) < (start_offsets[j], j) else 0)  # type: ignore[attr-defined]
    return _DsaModel(problem=prob, offset=offset)


def offsets_by_role(
    tensors: Sequence[Lifetime], solution: BufferSolution, role: str = "saved"
) -> tuple[int, ...]:
    """The arena offsets of the tensors with `role` (planner.lifetimes.TensorLife.role), in trace order:
    e.g. the per-saved-tensor `buffer_offsets` of a planner.plan.ActivationPolicy."""
    return tuple(o for t, o in zip(tensors, solution.offsets) if getattr(t, "role", None) == role)


Strategy = Callable[[Sequence[Lifetime], BufferSettings | None], BufferSolution]
STRATEGIES: dict[str, Strategy] = {
    "mip": solve_mip,
    "best_fit": best_fit,
    "bump": bump,
    "caching_allocator": caching_allocator,
}


def solve_buffers(
    tensors: Sequence[Lifetime], *, strategy: str = "mip", settings: BufferSettings | None = None
) -> BufferSolution:
    """Offsets for `tensors` in one arena with `strategy` (see the module docstring)."""
    fn = STRATEGIES.get(strategy)
    if fn is None:
        raise BufferInputError(
            f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}", field="strategy"
        )
    return fn(tensors, settings or BufferSettings())
