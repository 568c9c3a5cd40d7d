"""benchmarks/activations.py's competitors from torch: ``sac_milp`` (torch's selective-activation-checkpointing
MILP over the blocks, fed with per-op stats measured here, carried out with selective checkpoint contexts) and
``compile_budget`` (every block under torch.compile with `activation_memory_budget`)."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.activations_trainer import Baseline

GIB = 2**30  # sac_milp's memory unit (its MEM_MULTIPLIER)


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Runs every op of a forward for real, timing it and recording its outputs' storages.

    Skips the ops selective checkpointing ignores (`SAC_IGNORED_OPS`), so op i here is the i-th call of a
    selective-checkpoint policy function on the same forward.
    """

    def __init__(self) -> None:
        super().__init__()
        # (func, seconds, output storage pointers, output bytes, dropout_p)
        self.records: list[tuple[Any, float, frozenset[int], int, float]] = []
        self._alive: list[Any] = []  # output storages kept alive so that pointers stay unique in one pass

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        from torch.utils.checkpoint import SAC_IGNORED_OPS

        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t0
        storages = {}
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                storages[st.data_ptr()] = st
        self._alive.extend(storages.values())
        dropout = kwargs.get("dropout_p", args[3] if len(args) > 3 and isinstance(args[3], float) else 0.0)
        self.records.append(
            (func, dt, frozenset(storages), sum(s.nbytes() for s in storages.values()), dropout)
        )
        return out


def block_sac_stats(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, repeats: int = 3):
    """torch's `SACStats` of one block, measured on CPU: per-op median runtime (ms) and output bytes."""
    from torch.distributed._tools.sac_estimator import SACStats
    from torch.testing._internal.composite_compliance import is_inplace, is_inplace_view_fn, is_view_fn

    runs = []
    saved_ptrs: set[int] = set()
    for r in range(repeats):
        x = args[0].detach().requires_grad_()
        rec = _OpRecorder()

        def pack(t: torch.Tensor, r: int = r) -> torch.Tensor:
            if r == 0:
                saved_ptrs.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rec:
            block(x, *args[1:], **kwargs)
        runs.append(rec.records)
    first = runs[0]
    if any([f for f, *_ in run] != [f for f, *_ in first] for run in runs):
        raise RuntimeError("the block's op sequence differs between runs: per-op stats cannot be aligned")
    runtimes = [statistics.median(run[i][1] for run in runs) * 1e3 for i in range(len(first))]
    view_like = [i for i, (f, *_) in enumerate(first) if is_view_fn(f) or is_inplace_view_fn(f)]
    # torch's estimator: sdpa is tagged random but is deterministic without dropout
    rand = [
        i
        for i, (f, _t, _p, _b, drop) in enumerate(first)
        if torch.Tag.nondeterministic_seeded in f.tags
        and not (f.overloadpacket.__name__.startswith("_scaled_dot_product") and drop == 0)
    ]
    memory = [0 if i in view_like else nbytes for i, (_f, _t, _p, nbytes, _d) in enumerate(first)]
    inplace = []
    for i, (f, _t, ptrs, *_) in enumerate(first):
        if is_inplace(f):
            parent = next((j for j in range(i) if ptrs and ptrs <= first[j][2]), i)
            inplace.append((i, parent))
    saved_ops = [i for i, (_f, _t, ptrs, *_) in enumerate(first) if ptrs and ptrs <= saved_ptrs]
    # as torch's estimator: the last non-view, non-inplace op is the block's output, stored anyway
    last = len(first) - 1
    skip = set(view_like) | {i for i, _ in inplace}
    while last in skip:
        last -= 1
    memory[last] = 0
    return SACStats(
        func_names=[f.overloadpacket.__name__ for f, *_ in first],
        runtimes=runtimes,
        memory=memory,
        view_like_ops=view_like,
        rand_ops=rand,
        saved_autograd_ops=saved_ops,
        inplace_ops=inplace,
        force_store_random=False,
    )


def tradeoff_segments(stats: Any) -> tuple[list[float], list[float], list[float]]:
    """Slopes, intercepts and breakpoints of the block's recompute-time vs discarded-memory curve.

    The curve is torch's (`SACEstimator._get_sac_tradeoff_pwlf_stats`): ops discarded in its greedy order
    (most memory per second of recompute first), x = discarded share of the block's op memory, y = share of
    its op runtime recomputed. torch fits 2 segments with `pwlf` (not installed here); we take the lower
    convex hull of the curve's points instead, so sac_milp's `rcp >= slope*r + intercept` reads it exactly
    where the greedy curve is convex.
    """
    from torch.distributed._tools.sac_estimator import SACEstimator

    meta = SACEstimator()._get_greedy_order_meta(stats)
    mem_total, rt_total = sum(stats.memory), sum(stats.runtimes)
    first = set(meta.recomputed_ops)
    for i in list(first):
        first |= meta.inplace_op_groups.get(i, set()) | meta.random_ops_group.get(i, set())
    disc = sum(stats.memory[i] for i in first)
    rt = sum(stats.runtimes[i] for i in first)
    pts = [(disc / mem_total, rt / rt_total)]
    for cand in meta.msps_meta:
        disc += cand.memory
        rt += cand.runtime
        pts.append((disc / mem_total, rt / rt_total))
    pts = sorted(set(pts))
    hull: list[tuple[float, float]] = []
    for p in pts:  # lower convex hull (Andrew's monotone chain)
        while len(hull) >= 2 and (
            (hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
            - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
            <= 0
        ):
            hull.pop()
        hull.append(p)
    slopes, intercepts = [], []
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if x1 - x0 > 1e-12:
            slopes.append((y1 - y0) / (x1 - x0))
            intercepts.append(y0 - slopes[-1] * x0)
    if not slopes:
        slopes, intercepts = [1.0], [0.0]
    return slopes, intercepts, [x for x, _ in hull]


def sac_module_info(
    *,
    stats: Any,
    profiles: Sequence[Any],
    base: Baseline,
    param_bytes: int,
) -> dict[str, Any]:
    """torch's `ModuleInfo` (ilp_utils) for the model root and its blocks, from measured stats.

    Blocks are identical: the one block's SACStats stand for all. The root is marked a leaf (not an AC
    candidate; sac_milp would otherwise need its own trade-off curve): it carries the memory at the loss.
    Gradients stay allocated across steps (zero_grad(set_to_none=False)), so grad_total is all of them.
    """
    slopes, intercepts, breaks = tradeoff_segments(stats)
    sac_memory, sac_runtime = int(sum(stats.memory)), float(sum(stats.runtimes))
    root = "Model"
    names = [f"{root}.layers.{i}" for i in range(len(profiles))]
    bwd_per_fwd = base.bwd_total_s / max(base.fwd_total_s, 1e-9)
    mod_stats = []
    for i, (name, p) in enumerate(zip(names, profiles)):
        mod_stats.append(
            {
                "fqn": name,
                "param_per_module": p.param_bytes,
                "grad_per_module": p.param_bytes,
                "grad_total": param_bytes,
                # saved activations of the block excluding its input (ilp_utils: "excluding input and output")
                "act_fw_per_module": max(0, p.saved_bytes - p.input_bytes),
                "act_bw_per_module": p.saved_bytes,
                # the block's backward temporaries: its output gradient and measured transient
                "act_grad_per_module": p.output_bytes + p.backward_transient_bytes,
                "act_total": base.live_after_block[i],
                "input_per_module": p.input_bytes,
                "output_per_module": p.output_bytes,
                "fw_runtime_per_module": base.block_fwd_s[i] * 1e3,
                "bw_runtime_per_module": base.block_fwd_s[i] * bwd_per_fwd * 1e3,
                "is_leaf": False,
                "sac_runtime": sac_runtime,
                "sac_memory": sac_memory,
                "n_segments": len(slopes),
                "slopes": slopes,
                "intercepts": intercepts,
                "breakpoints": breaks,
                "tradeoff_curve": {},
            }
        )
    mod_stats.insert(
        0,
        {
            "fqn": root,
            "param_per_module": param_bytes,
            "grad_per_module": param_bytes,
            "grad_total": param_bytes,
            "act_fw_per_module": 0,
            "act_bw_per_module": 0,
            # the rest of the measured peak above what is live at the loss: the loss's backward buffers
            "act_grad_per_module": max(0, base.memtracker_act_peak_bytes - base.live_after_forward),
            "act_total": base.live_after_forward,
            "input_per_module": 0,
            "output_per_module": 0,
            "fw_runtime_per_module": base.fwd_total_s * 1e3,
            "bw_runtime_per_module": base.bwd_total_s * 1e3,
            "is_leaf": True,
            "sac_runtime": 0.0,
            "sac_memory": 0,
            "n_segments": 0,
            "slopes": [],
            "intercepts": [],
            "breakpoints": [],
            "tradeoff_curve": {},
        },
    )
    return {
        "mod_order": {
            "fw_pre_order": [root, *names],
            "bw_pre_order": [root, *reversed(names)],
            "fw_post_order": [*names, root],
            "bw_post_order": [*reversed(names), root],
        },
        "mod_stats": mod_stats,
    }


def sac_decisions(
    *, stats: Any, module_info: dict[str, Any], budget_bytes: int, param_bytes: int
) -> dict[str, Any]:
    """sac_milp over the blocks, then each block's discard ratio as per-op save (1) / recompute (0)."""
    import copy

    from torch.distributed._tools.ilp_utils import parse_module_info
    from torch.distributed._tools.sac_ilp import get_optimal_checkpointing_policy_per_module, sac_milp

    graph = parse_module_info(copy.deepcopy(module_info))
    names = [n["fqn"] for n in graph.nodes if not n["is_leaf"]]
    # sac_milp's memory at a module: activations + parameters + gradients (all persistent here)
    memory_gib = (budget_bytes + 2 * param_bytes) / GIB
    t0 = time.perf_counter()
    discard, recompute_ms, peak = sac_milp(graph, memory_budget=memory_gib, ac_units=names)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "milp_seconds": seconds,
        "milp_recompute_ms": recompute_ms,
        "milp_peak_bytes": peak,
        "discard": discard,
    }
    if peak == -1:
        out["feasible"] = False
        return out
    out["feasible"] = True
    per_block: dict[int, list[int]] = {}
    for i, name in enumerate(names):
        r = discard.get(name)
        if r is None:
            continue
        save = get_optimal_checkpointing_policy_per_module(stats, memory_budget=max(0.0, min(1.0, 1.0 - r)))
        if not save:
            raise RuntimeError(f"the per-op policy MILP of {name} found no solution (discard ratio {r})")
        per_block[i] = save
    out["save"] = per_block
    out["saved_op_bytes"] = sum(
        sum(m for m, x in zip(stats.memory, per_block[i]) if x) if i in per_block else sum(stats.memory)
        for i in range(len(names))
    )
    return out


@contextlib.contextmanager
def selective_checkpoint(blocks: Sequence[nn.Module], save: dict[int, list[int]]) -> Iterator[dict[int, int]]:
    """Each block in `save` runs under a non-reentrant checkpoint whose policy saves op i iff save[i] == 1.

    Yields {block: ops its policy saw in the last forward} to check the alignment with the per-op stats.
    """
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    seen: dict[int, int] = {}

    def wrap(i: int, block: nn.Module, decisions: list[int]) -> Callable[..., Any]:
        forward = block.forward

        def context_fn() -> Any:
            # Ordering: the policy is called once per op in forward and once per op in the recompute, in the
            # same order; each pass counts from 0 (a fresh context per checkpointed call).
            count = {False: 0, True: 0}

            def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
                n = count[ctx.is_recompute]
                count[ctx.is_recompute] = n + 1
                if not ctx.is_recompute:
                    seen[i] = n + 1
                if n < len(decisions) and decisions[n]:
                    return CheckpointPolicy.MUST_SAVE
                return CheckpointPolicy.PREFER_RECOMPUTE

            return create_selective_checkpoint_contexts(policy)

        @functools.wraps(forward)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        return wrapped

    try:
        for i, decisions in save.items():
            blocks[i].__dict__["forward"] = wrap(i, blocks[i], decisions)
        yield seen
    finally:
        for i in save:
            blocks[i].__dict__.pop("forward", None)


@contextlib.contextmanager
def compiled_blocks(blocks: Sequence[nn.Module], *, backend: str, budget: float) -> Iterator[None]:
    """Every block's forward under torch.compile, partitioned with `activation_memory_budget=budget`."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()  # a new budget needs a new partition: no graph compiled before is reused
    try:
        # Ordering: the partitioner reads the budget when a graph is compiled (the first warm-up step, or a
        # recompile later), so it stays patched while the strategy runs.
        with functorch_config.patch(activation_memory_budget=budget):
            for b in blocks:
                b.__dict__["forward"] = torch.compile(b.forward, backend=backend)
            yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)
        torch._dynamo.reset()
