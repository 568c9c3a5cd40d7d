"""benchmarks/activations.py's ``memtier_compile`` strategy: memtier's plan carried out on compiled blocks
(`offload.apply(..., compile_blocks=backend)`), planned from costs measured under compile.

What compile changes, measured rather than guessed (`compiled_costs`): the blocks' saved tensors (the compiled
graph's `save_for_backward` set, `offload.activations.profile_compiled_blocks`), the per-block forward times,
the step's backward/forward ratio and the no-offload peak of the compiled model (so the bytes outside the
blocks' saved tensors too). The MIP, its margin and its runtime check are memtier's own
(`benchmarks.activations_memtier.memtier_plan`). Gradients are compared with those of the compiled model
without memtier (`grad_check`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from benchmarks.activations_trainer import Baseline, Config, Trainer, bench_plan
from planner.model import ModelSpec

# torch._dynamo.utils.same's default tolerance (atol = rtol = 1e-4 without an fp64 reference): the compiler's
# own accuracy check (dynamo's benchmark runner compares compiled and eager results with it)
GRAD_TOL = 1e-4


@contextlib.contextmanager
def _keep_all_compiled(tr: Trainer, spec: ModelSpec, cfg: Config, options: Any) -> Iterator[Any]:
    import offload
    from planner.plan import ActivationPolicy

    acts = tuple(ActivationPolicy(layer=i) for i in range(len(tr.blocks)))
    torch._dynamo.reset()
    handle = offload.apply(tr.model, None, compiled_plan(bench_plan(spec, cfg, acts), options))
    try:
        yield handle
    finally:
        handle.remove()
        torch._dynamo.reset()


def compiled_costs(
    tr: Trainer, spec: ModelSpec, cfg: Config, eager: Baseline, profiles: Sequence[Any], options: Any
):
    """(block profiles under compile, the compiled model's no-offload Baseline), measured on `tr` with
    `options` (an offload.activations.CompileOptions: backend, partitioner budget).

    Its times are scaled by the eager no-offload step's median over the one measured right before (load drift).
    The Baseline's MemTracker fields are the eager run's (MemTracker is a dispatch mode: compiled code runs
    eagerly under it); memtier's plan reads only its step, peak and forward/backward times.
    """
    from offload.activations import profile_compiled_blocks

    torch._dynamo.reset()  # graphs compiled at another partitioner budget are not reused
    cprofiles = profile_compiled_blocks(
        tr.model, tr.ids, options=options, blocks=list(tr.blocks), eager=profiles
    )
    starts: dict[int, float] = {}
    block_times: list[list[float]] = [[] for _ in tr.blocks]
    # no-offload eager steps right before, to scale the compiled times to the eager baseline's load: the
    # candidates (partitioner budgets) are compared by these times, measured minutes apart on a shared machine
    adjacent = tr.timed(cfg.steps, 0)["median_s"]
    with _keep_all_compiled(tr, spec, cfg, options):
        handles = []
        for i, b in enumerate(tr.blocks):
            handles.append(
                b.register_forward_pre_hook(lambda _m, _a, i=i: starts.__setitem__(i, time.perf_counter()))
            )
            handles.append(
                b.register_forward_hook(
                    lambda _m, _a, _o, i=i: block_times[i].append(time.perf_counter() - starts[i])
                )
            )
        try:
            step = tr.timed(cfg.steps, cfg.warmup)
        finally:
            for h in handles:
                h.remove()
        fwd, bwd = statistics.median(tr.fwd_s), statistics.median(tr.bwd_s)
        peak = tr.activation_peak()
    scale = float(eager.step["median_s"]) / adjacent
    base = dataclasses.replace(
        eager,
        step={
            **step,
            "median_s": step["median_s"] * scale,
            "measured_median_s": step["median_s"],
            "load_scale": scale,
        },
        act_peak_bytes=peak,
        block_fwd_s=tuple(statistics.median(t[-cfg.steps :]) * scale for t in block_times),
        fwd_total_s=fwd * scale,
        bwd_total_s=bwd * scale,
    )
    return cprofiles, base


def compiled_plan(plan: Any, options: Any) -> Any:
    """`plan` with its blocks compiled as `options` (an offload.activations.CompileOptions) say: the plan
    carries the setting (`Workload.compile`, `compile_memory_budget`), `offload.apply` follows it."""
    workload = plan.workload.replace(
        compile=options.backend, compile_memory_budget=options.activation_memory_budget
    )
    return plan.replace(workload=workload)


def _grads(tr: Trainer) -> list[torch.Tensor]:
    tr.opt.zero_grad(set_to_none=False)
    tr.model(tr.ids, labels=tr.ids).loss.backward()
    grads = [p.grad.detach().clone() for p in tr.model.parameters()]
    tr.opt.zero_grad(set_to_none=False)
    return grads


def grad_check(tr: Trainer, plan: Any, options: Any) -> dict[str, Any]:
    """One backward of the compiled model without memtier and one with memtier's plan on compiled blocks, same
    parameters and batch: the largest differences, and whether they are within the compiler's tolerance."""
    import offload
    from benchmarks.activations_torch import compiled_blocks

    with compiled_blocks(list(tr.blocks), backend=options.backend, budget=1.0):
        ref = _grads(tr)
    torch._dynamo.reset()
    with offload.apply(tr.model, None, compiled_plan(plan, options)):
        got = _grads(tr)
    torch._dynamo.reset()
    abs_diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    rel = max(float(((a - b).abs() / b.abs().clamp_min(1e-12)).max()) for a, b in zip(ref, got))
    return {
        "grad_max_abs_diff": abs_diff,
        "grad_max_rel_diff": rel,
        "grad_bit_exact": all(torch.equal(a, b) for a, b in zip(ref, got)),
        "grad_within_tol": all(torch.allclose(b, a, atol=GRAD_TOL, rtol=GRAD_TOL) for a, b in zip(ref, got)),
        "grad_tol": GRAD_TOL,
    }


class _Counters(Mapping[str, Any]):
    """What `Bench.measure` records from the installed handle, read when it asks (after the timed steps)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def _now(self) -> dict[str, Any]:
        stats = self.handle.stats
        out: dict[str, Any] = {"bytes_swapped": stats.bytes_swapped, "bytes_fetched": stats.bytes_fetched}
        if self.handle.compiled:
            out["compiled"] = [dataclasses.asdict(b) for b in self.handle.compiled]
        return out

    def __getitem__(self, key: str) -> Any:
        return self._now()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


@contextlib.contextmanager
def applied(tr: Trainer, plan: Any, *, compile: Any = None) -> Iterator[Mapping[str, Any]]:
    """`offload.apply` of `plan` (compiled with the CompileOptions `compile`, or eager), yielding its live
    counters."""
    import offload

    if compile is not None:
        torch._dynamo.reset()  # no graph compiled for another plan or partitioner budget is reused
    try:
        with offload.apply(
            tr.model, None, plan if compile is None else compiled_plan(plan, compile)
        ) as handle:
            yield _Counters(handle)
    finally:
        if compile is not None:
            torch._dynamo.reset()


def swap_recompute_summary(
    profiles: Sequence[Any], policies: Sequence[Any], installed: Mapping[str, Any], steps_run: int
) -> dict[str, Any]:
    """Per step: bytes the plan swaps (planned from the profiles; measured from the engine's counter) and
    what it recomputes (blocks, and the saved bytes their recompute avoids keeping)."""
    from offload.activations import BlockPolicy

    pols = [BlockPolicy.from_plan(a, index=i) for i, a in enumerate(policies)]
    rec = [i for i, p in enumerate(pols) if p.mode == "recompute"]
    return {
        "swap_bytes_per_step_planned": sum(pr.swap_bytes(p) for pr, p in zip(profiles, pols)),
        "swap_bytes_per_step_measured": installed.get("bytes_swapped", 0) // max(1, steps_run),
        "swapped_blocks": sum(p.mode == "swap" for p in pols),
        "recomputed_blocks": len(rec),
        "recomputed_saved_bytes": sum(profiles[i].saved_bytes - profiles[i].input_bytes for i in rec),
    }
