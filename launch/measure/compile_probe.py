"""`memtier probe --compile`: what `torch.compile` changes in a transformer block on this machine.

The planner costs a compiled plan (`Workload.compile`) with two ratios of the same reference block, compiled
over eager (`DeviceSpec.compile_saved_ratio`, `compile_time_ratio`):

- saved bytes: the storages the block's backward keeps, packed through `saved_tensors_hooks` (a compiled block's
  AOTAutograd function saves its activations with `save_for_backward`, so the same hook sees them); the min-cut
  partitioner recomputes cheap pointwise ops in the backward and fusion drops intermediates, so it saves less;
- time: the fastest forward + backward of several, after the compile.

The block is `probe.llama_block` (transformers' eager Llama layer, written out), at torch's own partitioner
budget and at each of `PARTITIONER_BUDGETS` (AOTAutograd's `activation_memory_budget`): the planner picks one
of those for a compiled plan that leaves the budget open (`planner.workload.partitioner_modes`, in
`memtier plan`). Measured rather than assumed: how much a backend saves depends on the torch version, the device and
the block (Issue #25: "measure it, the probe or a traced compiled block, rather than guess").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from planner.cluster import CompileAtBudget

# the reference block (hidden size, batch, sequence): one where the GEMMs do not hide the element-wise work;
# a smaller one for `memtier probe --quick`
BLOCK, QUICK_BLOCK = (512, 1, 512), (256, 1, 256)
# the partitioner budgets probed: the min-cut's saved set falls in steps as the budget does (on this block,
# inductor on the 2-core dev machine, 2026-12-07: x0.78 of eager at 1.0, x0.55 at 0.8, x0.46 at 0.6, x0.33 at
# 0.4, x0.19 at 0.2)
PARTITIONER_BUDGETS = (1.0, 0.8, 0.6, 0.4, 0.2)


@dataclass(frozen=True)
class CompileFactors:
    backend: str
    saved_ratio: float  # compiled / eager saved-for-backward bytes
    time_ratio: float  # compiled / eager forward + backward seconds
    eager_saved_bytes: int
    compiled_saved_bytes: int
    eager_s: float
    compiled_s: float
    compile_s: float  # the first compiled call (dynamo, AOTAutograd, the backend)
    # the same at each of PARTITIONER_BUDGETS, the time ratios made monotone: a lower budget recomputes more,
    # never less, so a faster reading there is taken as the timing's noise
    at_budgets: tuple[CompileAtBudget, ...] = ()


def saved_bytes(forward: Any, x: Any, weights: tuple[Any, ...]) -> int:
    """Bytes of the distinct storages one forward of `forward(x)` saves for its backward, counted as the
    offloader's profile counts them (`offload.activations.profile.SavedCollector`): the weights left out."""
    import torch

    from offload.activations.profile import SavedCollector, distinct_storage_bytes

    collect = SavedCollector(weights)
    with torch.autograd.graph.saved_tensors_hooks(collect.pack, lambda t: t):
        out = forward(x.clone())  # a non-leaf input, as inside a model (the collector skips user leaves)
    out.sum().backward()
    return distinct_storage_bytes(collect.saved)


def measure_compile(backend: str, *, quick: bool = False, log: Any = None) -> CompileFactors:
    """Compile `probe.llama_block` with `backend` and compare it with the eager block (see the module doc)."""
    import torch
    import torch._functorch.config as functorch_config

    from launch.measure.probe import _best_time, llama_block

    reps = 3 if quick else 6
    forward, x, _flops, weights = llama_block(*(QUICK_BLOCK if quick else BLOCK))
    eager_saved = saved_bytes(forward, x, weights)
    eager_s = _best_time(lambda: forward(x).sum().backward(), reps)
    torch._dynamo.reset()
    compiled = torch.compile(forward, backend=backend, fullgraph=True)
    t0 = time.perf_counter()
    compiled(x).sum().backward()
    compile_s = time.perf_counter() - t0
    compiled_saved = saved_bytes(compiled, x, weights)
    compiled_s = _best_time(lambda: compiled(x).sum().backward(), reps)
    torch._dynamo.reset()
    at_budgets, slowest = [], 0.0
    for budget in PARTITIONER_BUDGETS:
        if budget == functorch_config.activation_memory_budget:  # torch's own: measured above
            saved, seconds = compiled_saved, compiled_s
        else:
            saved, seconds = _measured_at(forward, x, weights, backend, budget, reps)
        slowest = max(slowest, seconds / eager_s)
        at_budgets.append(_row(budget, saved / eager_saved, slowest))
    factors = CompileFactors(
        backend=backend,
        saved_ratio=compiled_saved / eager_saved,
        time_ratio=compiled_s / eager_s,
        eager_saved_bytes=eager_saved,
        compiled_saved_bytes=compiled_saved,
        eager_s=eager_s,
        compiled_s=compiled_s,
        compile_s=compile_s,
        at_budgets=tuple(at_budgets),
    )
    if log is not None:
        log(
            f"torch.compile ({backend}) of a transformer block: saves {compiled_saved / 2**20:.2f} MiB for "
            f"backward (eager {eager_saved / 2**20:.2f}, x{factors.saved_ratio:.2f}), fwd+bwd "
            f"{1e3 * compiled_s:.1f} ms (eager {1e3 * eager_s:.1f}, x{factors.time_ratio:.2f}); compiled in "
            f"{compile_s:.0f} s"
        )
        log(
            "  at partitioner budgets: "
            + ", ".join(
                f"{r.budget:g}: saves x{r.saved_ratio:.2f}, time x{r.time_ratio:.2f}"
                for r in factors.at_budgets
            )
        )
    return factors


def _row(budget: float, saved_ratio: float, time_ratio: float) -> CompileAtBudget:
    """A probed row, its ratios rounded and held within what a cluster file accepts (`CompileAtBudget`)."""
    return CompileAtBudget(
        budget=budget, saved_ratio=round(min(saved_ratio, 4.0), 4), time_ratio=round(min(time_ratio, 4.0), 4)
    )


def _measured_at(
    forward: Any, x: Any, weights: Any, backend: str, budget: float, reps: int
) -> tuple[int, float]:
    """(saved bytes, fastest forward + backward seconds) of the block compiled at partitioner `budget`."""
    import torch
    import torch._functorch.config as functorch_config

    from launch.measure.probe import _best_time

    torch._dynamo.reset()  # dynamo's cache does not key on the partitioner's budget
    try:
        # Ordering: the partitioner reads the budget when a graph is compiled (the first call, or a
        # recompile), so every call runs with it patched
        with functorch_config.patch(activation_memory_budget=budget):
            compiled = torch.compile(forward, backend=backend, fullgraph=True)
            compiled(x).sum().backward()
            return saved_bytes(compiled, x, weights), _best_time(lambda: compiled(x).sum().backward(), reps)
    finally:
        torch._dynamo.reset()
