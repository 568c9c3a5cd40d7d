"""What does an activation memory budget cost in step time?

One HF Llama (built from config, random init, fp32, SGD; the optimizer, data, loss and thread count are
identical in every run) is trained for a few steps without offload, then under each strategy at activation
budgets of 25/50/75% of the no-offload activation peak, all in one process, side by side:

- ``memtier``: the activation MIP (`planner.mip.activations.solve_activations`) fed with measured per-block
  costs (saved bytes and input bytes from `offload.activations.profile_blocks`, forward times from hooks,
  backward times scaled by the measured backward/forward ratio, the NVMe tier's effective write/read
  bandwidth on one block's saved tensors (`tier_bandwidth`; `--bandwidth disk`: `launch.probe.measure_disk`'s
  sequential file I/O)), swapping to the NVMe tier and recomputing whole blocks (on a GPU machine the swap
  target would be host DRAM; this script runs the CPU case); its plan is checked with `offload.activations.predict_activation_peak_bytes` plus the forward-time
  peaks with the runtime's pinned swap sources (`pinned_peak_bytes`), and the MIP's budget tightened by any
  excess (up to 6 times); then `offload.apply` carries it out;
- ``recompute_all``: every block under a non-reentrant `torch.utils.checkpoint` (budget-independent: measured
  once, and checked against every budget);
- ``sac_milp``: torch's selective-activation-checkpointing MILP (`torch.distributed._tools.sac_ilp.sac_milp`)
  over the blocks, fed with stats measured here on CPU (torch's own `SACEstimator` runs under FakeTensorMode
  and times ops on CUDA): per-op runtimes and output bytes of one block from a TorchDispatchMode, the block
  memory and live activation bytes from MemTracker; each block's discard ratio is turned into a per-op
  save/recompute list by torch's `get_optimal_checkpointing_policy_per_module` and carried out with
  `torch.utils.checkpoint.create_selective_checkpoint_contexts`;
- ``compile_budget``: every block under `torch.compile` with
  `torch._functorch.config.activation_memory_budget` (the min-cut partitioner's knob, a fraction of the
  compiled graph's saved activations), set to the share of the blocks' saved bytes the budget leaves;
  ``compile_nobudget`` (budget 1.0) is the compiled speed without a memory limit.

Definitions (also written to the JSON):
- activation peak: the largest number of bytes allocated during one training step (forward, loss, backward,
  optimizer step) above the bytes live when it starts (parameters, gradients, optimizer state, the batch),
  measured by the PyTorch profiler's allocator accounting (`profile_memory=True`, "Total Allocated" of the
  main thread's CPU allocations). Not MemTracker: a TorchDispatchMode makes torch.compile run eagerly, and
  the same instrument must measure every strategy. The no-offload peak is also measured with MemTracker
  (JSON: baseline.memtracker_act_peak_bytes) as a cross-check.
- budget: fraction x no-offload activation peak; a strategy fits when its measured activation peak <= budget.
- step-time ratio: median step time / median no-offload step time, measured right before it in the same
  run (each strategy's own no-offload steps, so that load drifting on a shared machine hits both sides).

The loss is the chunked linear cross-entropy (`offload.loss`, in every run, the baseline included) unless
``--loss standard``: full logits (and their fp32 copies and gradient) are a floor under every strategy's
peak that no block policy moves, which would hide the blocks' trade-off at the small budgets.

    .venv/bin/python benchmarks/activations.py --quick   # llama-20m, 1x256 tokens, aot_eager (~1-2 min)
    .venv/bin/python benchmarks/activations.py           # llama-20m, 2x256 tokens, inductor (~3-7 min)

Writes benchmarks/results/activations{_quick}.json and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import savefig, write_json  # noqa: E402
from planner.model import ModelSpec, to_hf_config_dict  # noqa: E402
from planner.presets import MODEL_PRESETS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STRATEGIES = ("memtier", "recompute_all", "sac_milp", "compile_budget", "compile_nobudget")
COMPILE_BACKENDS = ("inductor", "aot_eager_decomp_partition")
LOSSES = ("chunked", "standard")
CHECKS = ("runtime", "offload")
BANDWIDTH_SOURCES = ("tier", "disk")
GIB = 2**30  # sac_milp's memory unit (its MEM_MULTIPLIER)
MAX_TIGHTEN = 6  # memtier: re-solves with a tighter MIP budget when the measured-profile check exceeds it


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: str  # a planner.presets MODEL_PRESETS name
    layers: int  # 0: the preset's own
    batch: int
    seq_len: int
    budgets: tuple[float, ...]  # fractions of the no-offload activation peak
    strategies: tuple[str, ...]
    steps: int  # timed steps per strategy (median)
    warmup: int  # untimed steps per strategy (compile happens here)
    loss: str
    loss_chunk: int  # tokens per chunk of the chunked loss
    compile_backend: str
    swap_dir: str  # directory of the NVMe tier's swap files
    disk_probe_mib: int
    bandwidth: str  # "tier" or "disk": which measured bandwidth the MIP plans with
    check: str  # memtier's plan check: "runtime" (offload's predictor + pinned swap sources) or "offload"
    threads: int
    seed: int
    quick: bool
    out: str  # output stem (no extension)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODEL_PRESETS), default="llama-20m")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--steps", type=int, default=None, help="timed steps per strategy")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loss", choices=LOSSES, default="chunked")
    p.add_argument("--loss-chunk", type=int, default=128, help="tokens per chunk of the chunked loss")
    p.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default=None)
    p.add_argument("--swap-dir", default=os.path.join(RESULTS, "tmp"), help="directory on the NVMe drive")
    p.add_argument("--disk-probe-mib", type=int, default=None)
    p.add_argument(
        "--bandwidth",
        choices=BANDWIDTH_SOURCES,
        default="tier",
        help="tier bandwidth the MIP plans with: the NVMe tier's own put/get of one block's saved tensors "
        "(per-tensor overheads included), or launch.probe.measure_disk's sequential 1 MiB file I/O",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch intra-op threads (default: cores - 1, leaving one for the swap worker)",
    )
    p.add_argument(
        "--check",
        choices=CHECKS,
        default="runtime",
        help="how memtier's plan is checked against the budget before it runs (the MIP re-solved tighter "
        "while it exceeds): offload.activations.predict_activation_peak_bytes alone ('offload'), or also "
        "the forward/loss peaks with swap sources pinned until written ('runtime')",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="1x256 tokens (not 2x256), 3 timed steps, aot_eager compile"
    )
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/activations[_quick])")
    a = p.parse_args(argv)
    for f in a.budgets:
        if not 0.0 < f < 1.0:
            p.error(f"--budgets: every fraction must be in (0, 1), got {f}")
    quick = a.quick
    return Config(
        model=a.model,
        layers=a.layers or 0,
        batch=a.batch or (1 if quick else 2),
        seq_len=a.seq_len or 256,
        budgets=tuple(sorted(a.budgets)),
        strategies=tuple(a.strategies),
        steps=a.steps or (3 if quick else 5),
        warmup=max(1, a.warmup),
        loss=a.loss,
        loss_chunk=a.loss_chunk,
        compile_backend=a.compile_backend or ("aot_eager_decomp_partition" if quick else "inductor"),
        swap_dir=a.swap_dir,
        disk_probe_mib=a.disk_probe_mib or (16 if quick else 64),
        bandwidth=a.bandwidth,
        check=a.check,
        threads=a.threads,
        seed=a.seed,
        quick=quick,
        out=a.out or os.path.join(RESULTS, "activations_quick" if quick else "activations"),
    )


def progress(msg: str) -> None:
    print(f"[activations] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- the model
def model_spec(cfg: Config) -> ModelSpec:
    spec = MODEL_PRESETS[cfg.model]
    return dataclasses.replace(spec, num_layers=cfg.layers) if cfg.layers else spec


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    import transformers

    d = to_hf_config_dict(spec)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    config._attn_implementation = "sdpa"
    config.use_cache = False  # training: no KV cache in any run
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    return model


class Trainer:
    """One model, optimizer and batch; every strategy installs itself on it and is removed after."""

    def __init__(self, cfg: Config, spec: ModelSpec) -> None:
        from offload.blocks import find_blocks

        self.model = build_model(spec, cfg.seed)
        self.blocks = find_blocks(self.model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.ids = torch.randint(0, spec.vocab_size, (cfg.batch, cfg.seq_len), generator=g)
        self.fwd_s: list[float] = []  # forward (incl. loss) seconds of the last timed steps
        self.bwd_s: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.model(self.ids, labels=self.ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        # gradients stay allocated: they are part of what is live outside forward/backward
        self.opt.zero_grad(set_to_none=False)
        t3 = time.perf_counter()
        self.fwd_s.append(t1 - t0)
        self.bwd_s.append(t2 - t1)
        return t3 - t0

    def timed(self, steps: int, warmup: int) -> dict[str, Any]:
        first = [self.step() for _ in range(warmup)]
        self.fwd_s.clear()
        self.bwd_s.clear()
        times = [self.step() for _ in range(steps)]
        return {"median_s": statistics.median(times), "times_s": times, "warmup_s": first}

    def activation_peak(self) -> int:
        """Bytes allocated above the step's starting point at its peak (profiler allocator accounting)."""
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        finally:
            os.unlink(path)
        mem = [e["args"] for e in events if e.get("name") == "[memory]"]
        if not mem:
            return 0
        # "Total Allocated" counts what the allocator handed out since profiling began (it cannot see the
        # sizes of tensors allocated before, so their frees are not subtracted): the running total minus its
        # value before the first event is the net allocation above the starting point.
        start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
        return int(max(a["Total Allocated"] for a in mem) - start)


# ---------------------------------------------------------------------------------------------- baseline
@dataclasses.dataclass(frozen=True, kw_only=True)
class Baseline:
    step: dict[str, Any]
    act_peak_bytes: int  # profiler instrument
    memtracker_act_peak_bytes: int
    static_bytes: int  # MemTracker: live at the step's start (params, grads, optimizer state, batch)
    live_after_block: tuple[int, ...]  # MemTracker: activation bytes live after each block's forward
    live_after_forward: int  # ... after the model's forward (loss computed)
    block_fwd_s: tuple[float, ...]  # median forward seconds per block
    fwd_total_s: float
    bwd_total_s: float


def measure_baseline(tr: Trainer, cfg: Config) -> Baseline:
    from torch.distributed._tools.mem_tracker import MemTracker

    starts: dict[int, float] = {}
    block_times: list[list[float]] = [[] for _ in tr.blocks]
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
    fwd_total, bwd_total = statistics.median(tr.fwd_s), statistics.median(tr.bwd_s)
    act_peak = tr.activation_peak()

    tracker = MemTracker()
    tracker.track_external(tr.model, tr.opt, tr.ids)
    live: list[int] = []

    def total(kind: str) -> int:
        return sum(int(dev["Total"]) for dev in tracker.get_tracker_snapshot(kind).values())

    handles = [b.register_forward_hook(lambda _m, _a, _o: live.append(total("current"))) for b in tr.blocks]
    handles.append(tr.model.register_forward_hook(lambda _m, _a, _o: live.append(total("current"))))
    try:
        with tracker:
            static = total("current")
            tr.step()
        peak = total("peak")
    finally:
        for h in handles:
            h.remove()
    return Baseline(
        step=step,
        act_peak_bytes=act_peak,
        memtracker_act_peak_bytes=peak - static,
        static_bytes=static,
        live_after_block=tuple(v - static for v in live[:-1]),
        live_after_forward=live[-1] - static,
        block_fwd_s=tuple(statistics.median(t[-cfg.steps :]) for t in block_times),
        fwd_total_s=fwd_total,
        bwd_total_s=bwd_total,
    )


# ---------------------------------------------------------------------------------------------- memtier
def tier_bandwidth(path: str, sizes: Sequence[int], *, rounds: int = 3) -> tuple[float, float]:
    """Effective (write, read) bytes/s of the NVMe tier `offload.apply` builds, on tensors of `sizes` bytes.

    Each round puts every tensor and waits for the tier, then gets every one back: what one swapped block
    costs, per-tensor overheads included (launch.probe.measure_disk streams 1 MiB blocks of one file).
    Best of `rounds`.
    """
    from offload.apply import tier_settings
    from offload.tiers import make_tier
    from planner.plan import TierPlan

    total = sum(sizes)
    kind, settings = tier_settings(TierPlan(kind="nvme", capacity_bytes=2 * total + (64 << 20), path=path))
    tensors = [torch.randn(max(1, n // 4)) for n in sizes]
    nbytes = sum(t.numel() * 4 for t in tensors)
    best_w = best_r = math.inf
    with make_tier(kind, **settings) as tier:
        for _ in range(rounds):
            t0 = time.perf_counter()
            handles = [tier.put(t) for t in tensors]
            tier.synchronize()
            t1 = time.perf_counter()
            for h in handles:
                tier.get(h)
            t2 = time.perf_counter()
            for h in handles:
                tier.free(h)
            best_w, best_r = min(best_w, t1 - t0), min(best_r, t2 - t1)
    return nbytes / best_w, nbytes / best_r


# share of a budget memtier's plan leaves unused for the runtime predictor's error
PLAN_MARGIN = 0.02


def pinned_peak_bytes(profiles: Sequence[Any], policies: Sequence[Any], *, head_bytes: int) -> int:
    """The forward-time and loss-time peaks under `policies`, with the runtime's swap sources in flight.

    NOTE: `offload.activations` keeps a swapped tensor's source storage alive until its copy to the tier is
    done, and the compact copy of its kept share is made then (on CPU; on GPU at once), so at the end of
    block l's forward (where the engine waits for block l-1's copies) all of block l-1's saved storage and
    its kept share are alive for a moment; at the loss (before the model's forward hook drains the engine)
    the same holds for the last swapped block. The planner's MIP counts only the swapped share (s x act) in
    flight; on a block swapped at s = 0.39 the measured peak was (1 - s) x act above it.
    """
    resident = [p.resident_bytes(pol) for p, pol in zip(profiles, policies)]
    peak = below = 0
    for l, p in enumerate(profiles):
        pinned = profiles[l - 1].saved_bytes if l and policies[l - 1].mode == "swap" else 0
        peak = max(peak, below + p.forward_peak_bytes + pinned)
        below += resident[l]
    last_pinned = profiles[-1].saved_bytes if policies[-1].mode == "swap" else 0
    return max(peak, below + head_bytes + last_pinned)


def memtier_plan(*, bench: Bench, budget_bytes: int) -> dict[str, Any]:
    """Solve the activation MIP for `budget_bytes` from measured costs; a Plan swapping to NVMe."""
    from planner.mip.activations import LayerCost
    from planner.plan import TierPlan

    cfg, profiles, base = bench.cfg, bench.profiles, bench.base
    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    saved_total = sum(p.saved_bytes for p in profiles)
    # what the no-offload peak holds beyond the blocks' saved tensors (embeddings, loss buffers, gradients
    # of activations): counted at the loss, where the MIP's `tail_bytes` sits
    head = max(0, base.act_peak_bytes - saved_total)
    bwd_per_fwd = base.bwd_total_s / max(base.fwd_total_s, 1e-9)
    costs = [
        LayerCost(
            layer=i,
            act_bytes=p.saved_bytes,
            input_bytes=p.input_bytes,
            fwd_time_s=base.block_fwd_s[i],
            # per-block backward is not hooked (full backward hooks change the graph): the step's measured
            # backward/forward ratio times the block's forward
            bwd_time_s=base.block_fwd_s[i] * bwd_per_fwd,
            recompute_time_s=base.block_fwd_s[i],
        )
        for i, p in enumerate(profiles)
    ]
    write_bps, read_bps = bench.tier_bps
    tier_cap = int(saved_total * 1.25) + (64 << 20)
    # the plan aims 2% under the budget: the runtime's predicted peak is within about 1% of the measured one
    target = int(budget_bytes * (1 - PLAN_MARGIN))
    device_bytes = target
    tries = []
    best_fit: tuple[Any, int] | None = None  # the fastest solution whose runtime-predicted peak fits
    for strategy in ("mip", "recompute_all"):
        for _ in range(MAX_TIGHTEN if strategy == "mip" else 1):
            sol, peak = _solve_checked(
                costs, profiles, cfg, head, device_bytes, strategy, write_bps, read_bps, tier_cap, device_kind
            )
            tries.append({"strategy": strategy, "device_bytes": device_bytes, "status": sol.status,
                          "predicted_peak": peak})  # fmt: skip
            if not sol.fits or peak is None:
                break
            if peak <= target:
                if best_fit is None or sol.objective_s < best_fit[0].objective_s:
                    best_fit = (sol, peak)
                break
            device_bytes -= peak - target
        # the MIP's budget, tightened by the runtime's excess, can pass below what recompute-all needs in the
        # MIP's own (coarser) accounting: recompute-all itself is then the other candidate
        device_bytes = target
    if best_fit is not None:
        sol, peak = best_fit
        tries.append({"chosen": sol.strategy, "predicted_peak": peak})
    out: dict[str, Any] = {"tighten": tries, "solution": sol, "fits": best_fit is not None}
    if best_fit is None:
        out["shortfall_bytes"] = sol.shortfall_bytes
        return out
    tiers = (TierPlan(kind="nvme", capacity_bytes=tier_cap, path=cfg.swap_dir),)
    out["plan"] = _plan(bench.spec, cfg, sol.policies, tiers)
    out["predicted_peak"] = peak
    out["predicted_step_s"] = base.step["median_s"] + sol.objective_s
    out["modes"] = "".join(
        "R" if a.recompute_fraction >= 0.5 else ("S" if a.swap_fraction > 0 else "K") for a in sol.policies
    )
    out["swap_fractions"] = [round(a.swap_fraction, 4) for a in sol.policies]
    return out


def _solve_checked(
    costs: Any, profiles: Any, cfg: Any, head: int, device_bytes: int, strategy: str,
    write_bps: float, read_bps: float, tier_cap: int, device_kind: str,
) -> tuple[Any, int | None]:  # fmt: skip
    """One activation solve for `device_bytes` and the runtime's predicted peak of its plan (None: no fit)."""
    from offload.activations import BlockPolicy, predict_activation_peak_bytes
    from planner.mip.activations import ActivationBudget, prefetch_helps, solve_activations, transfer_overlap

    ab = ActivationBudget(
        device_bytes=max(0, device_bytes),
        tier_capacity_bytes=tier_cap,
        tier_write_bps=write_bps,
        tier_read_bps=read_bps,
        tier="nvme",
        tail_bytes=head,
        # the planner's rules for this device (a CPU here: the copies compete with compute)
        transfer_overlap=transfer_overlap(device_kind),
        prefetch=prefetch_helps(device_kind, "nvme"),
    )
    sol = solve_activations(costs, ab, strategy=strategy)
    if not sol.fits:
        return sol, None
    policies = [BlockPolicy.from_plan(a, index=i) for i, a in enumerate(sol.policies)]
    peak = predict_activation_peak_bytes(profiles, policies, head_bytes=head)
    if cfg.check == "runtime":
        peak = max(peak, pinned_peak_bytes(profiles, policies, head_bytes=head))
    return sol, peak


# ---------------------------------------------------------------------------------------------- sac_milp
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


# ---------------------------------------------------------------------------------------------- the run
def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000] + "\n" + traceback.format_exc(limit=-3)[-1500:]


@dataclasses.dataclass(kw_only=True)
class Bench:
    """What every strategy run reads: the trainer, the measured baseline and the measured costs."""

    cfg: Config
    spec: ModelSpec
    tr: Trainer
    base: Baseline
    profiles: list[Any]  # offload.activations.BlockProfile per block
    block_call: tuple[tuple[Any, ...], dict[str, Any]]  # block 0's (args, kwargs) as the model calls it
    param_bytes: int
    tier_bps: tuple[float, float]  # (write, read) the MIP plans with
    sac: tuple[Any, dict[str, Any]] | None = None  # (SACStats of one block, ModuleInfo), built on first use

    @property
    def base_s(self) -> float:
        return float(self.base.step["median_s"])

    @property
    def saved_total(self) -> int:
        return sum(p.saved_bytes for p in self.profiles)

    def budget(self, frac: float) -> int:
        return int(frac * self.base.act_peak_bytes)

    def measure(self, install: Callable[[], Any]) -> dict[str, Any]:
        """Step time (median) and activation peak with `install()`'s context active."""
        t0 = time.perf_counter()
        # no-offload steps right before: the ratio is taken against them, so that load from other processes
        # drifting during the run (a shared machine) moves both sides of it
        adjacent = self.tr.timed(self.cfg.steps, 0)["median_s"]
        with install() as extra:
            timing = self.tr.timed(self.cfg.steps, self.cfg.warmup)
            peak = self.tr.activation_peak()
            installed = dict(extra) if isinstance(extra, dict) else {}
        return {
            "step": timing,
            "adjacent_base_s": adjacent,
            "act_peak_bytes": peak,
            "wall_s": time.perf_counter() - t0,
            "installed": installed,
        }

    def row(
        self, strategy: str, frac: float, measured: dict[str, Any] | None, **extra: Any
    ) -> dict[str, Any]:
        budget = self.budget(frac)
        row: dict[str, Any] = {"strategy": strategy, "budget_fraction": frac, "budget_bytes": budget, **extra}
        if measured is not None:
            med = measured["step"]["median_s"]
            base_s = measured.get("adjacent_base_s", self.base_s)
            row.update(
                status="ok",
                step_s=med,
                base_step_s=base_s,
                step_ratio=med / base_s,
                step_ratio_to_first_baseline=med / self.base_s,
                times_s=measured["step"]["times_s"],
                warmup_s=measured["step"]["warmup_s"],
                act_peak_bytes=measured["act_peak_bytes"],
                peak_over_budget=measured["act_peak_bytes"] / budget,
                fits=measured["act_peak_bytes"] <= budget,
            )
        row.setdefault("status", "not_run")
        return row

    def attempt(self, strategy: str, fracs: Sequence[float], fn: Callable[[], list[dict[str, Any]]]):
        """`fn()`'s rows, or one error row per budget when it raises (a failed strategy is a visible row)."""
        try:
            rows = fn()
        except Exception as exc:  # noqa: BLE001 - recorded with its message, the run goes on
            rows = [self.row(strategy, f, None, status="error", error=_error(exc)) for f in fracs]
        for r in rows:
            progress(_summary(r))
        return rows

    # ---- strategies
    def recompute_all(self) -> list[dict[str, Any]]:
        import offload
        from planner.plan import ActivationPolicy

        acts = tuple(
            ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0)
            for i in range(len(self.profiles))
        )
        plan = _plan(self.spec, self.cfg, acts)
        m = self.measure(lambda: offload.apply(self.tr.model, None, plan))
        return [self.row("recompute_all", f, m) for f in self.cfg.budgets]

    def memtier(self, frac: float) -> list[dict[str, Any]]:
        import offload

        mp = memtier_plan(bench=self, budget_bytes=self.budget(frac))
        sol = mp["solution"]
        info = {"mip_status": sol.status, "tighten": mp["tighten"], "mip_seconds": sol.seconds}
        if not mp["fits"]:
            return [
                self.row(
                    "memtier", frac, None, status="infeasible", shortfall_bytes=sol.shortfall_bytes, **info
                )
            ]
        m = self.measure(lambda: offload.apply(self.tr.model, None, mp["plan"]))
        return [
            self.row(
                "memtier",
                frac,
                m,
                predicted_step_s=mp["predicted_step_s"],
                # the MIP's added seconds on top of the adjacent no-offload step
                predicted_step_ratio=1 + sol.objective_s / m["adjacent_base_s"],
                predicted_act_peak_bytes=mp["predicted_peak"],
                modes=mp["modes"],
                swap_fractions=mp["swap_fractions"],
                added_s=sol.objective_s,
                **info,
            )
        ]

    def sac_milp(self, frac: float) -> list[dict[str, Any]]:
        if self.sac is None:
            args, kwargs = self.block_call
            stats = block_sac_stats(self.tr.blocks[0], args, kwargs)
            info = sac_module_info(
                stats=stats, profiles=self.profiles, base=self.base, param_bytes=self.param_bytes
            )
            self.sac = (stats, info)
            progress(f"sac stats: {len(stats.func_names)} ops per block, {sum(stats.runtimes):.1f} ms")
        stats, module_info = self.sac
        dec = sac_decisions(
            stats=stats, module_info=module_info, budget_bytes=self.budget(frac), param_bytes=self.param_bytes
        )
        info = {k: v for k, v in dec.items() if k != "save"}
        if not dec["feasible"]:
            return [self.row("sac_milp", frac, None, status="infeasible", **info)]
        save = dec["save"]
        m = self.measure(lambda: selective_checkpoint(list(self.tr.blocks), save))
        seen = m["installed"]
        info.update(
            saved_ops={str(i): sum(s) for i, s in save.items()},
            ops_per_block=len(stats.func_names),
            policy_calls_per_block={str(k): v for k, v in seen.items()},
            op_alignment_ok=all(v == len(stats.func_names) for v in seen.values()),
        )
        return [self.row("sac_milp", frac, m, **info)]

    def compiled(self, name: str, fracs: Sequence[float], share: float) -> list[dict[str, Any]]:
        backend = self.cfg.compile_backend
        m = self.measure(lambda: compiled_blocks(list(self.tr.blocks), backend=backend, budget=share))
        info = {"compile_backend": backend, "compile_budget_fraction": share}
        return [self.row(name, f, m, **info) for f in fracs]

    def compile_share(self, frac: float) -> float:
        """The share of the blocks' saved bytes a budget leaves after the bytes no block policy touches."""
        head = max(0, self.base.act_peak_bytes - self.saved_total)
        return min(1.0, max(0.0, (self.budget(frac) - head) / self.saved_total))


def _plan(spec: ModelSpec, cfg: Config, acts: tuple[Any, ...], tiers: tuple[Any, ...] = ()) -> Any:
    from planner.plan import Plan
    from planner.presets import resolve_cluster
    from planner.workload import Workload

    return Plan(
        model=spec,
        cluster=resolve_cluster("rtx4090-nvme"),  # metadata only: apply() reads activations and tiers
        workload=Workload(global_batch=cfg.batch, seq_len=cfg.seq_len, dtype="fp32"),
        activations=acts,
        tiers=tiers,
    )


def _block_call(tr: Trainer) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Block 0's inputs as the model passes them (hidden states, position embeddings, masks)."""
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    hook = tr.blocks[0].register_forward_pre_hook(
        lambda _m, a, kw: None if captured else captured.append((a, kw)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            tr.model(tr.ids)
    finally:
        hook.remove()
    return captured[0]


DEFINITIONS = {
    "act_peak_bytes": "peak bytes allocated during one training step above the bytes live at its start "
    "(params, grads, optimizer state, batch); torch.profiler allocator accounting, main thread",
    "budget_bytes": "budget_fraction x the no-offload act_peak_bytes",
    "fits": "act_peak_bytes <= budget_bytes",
    "step_ratio": "median step time / median no-offload step time measured right before it (base_step_s)",
    "predicted_step_ratio": "memtier: 1 + the MIP's added seconds / base_step_s",
    "compile_budget_fraction": "activation_memory_budget given to the partitioner: (budget - the no-offload "
    "peak's bytes outside the blocks' saved tensors) / the blocks' saved bytes, clamped to [0, 1]",
}


def run(cfg: Config) -> dict[str, Any]:
    from launch.probe import measure_disk
    from offload.activations import profile_blocks

    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.swap_dir, exist_ok=True)
    spec = model_spec(cfg)
    tr = Trainer(cfg, spec)
    loss_handle = None
    if cfg.loss == "chunked":
        from offload.loss import install_chunked_loss

        loss_handle = install_chunked_loss(tr.model, chunk_size=cfg.loss_chunk)
    param_bytes = sum(p.numel() * p.element_size() for p in tr.model.parameters())
    progress(
        f"{spec.name} x{spec.num_layers} layers, {param_bytes / 2**20:.0f} MiB params, batch {cfg.batch}x"
        f"{cfg.seq_len}, loss {cfg.loss}, {cfg.threads} thread(s)"
    )
    try:
        base = measure_baseline(tr, cfg)
        progress(
            f"no offload: {base.step['median_s']:.3f} s/step, activation peak "
            f"{base.act_peak_bytes / 2**20:.1f} MiB "
            f"(MemTracker {base.memtracker_act_peak_bytes / 2**20:.1f} MiB)"
        )
        profiles = profile_blocks(tr.model, tr.ids)
        disk_w, disk_r, direct = measure_disk(cfg.swap_dir, cfg.disk_probe_mib << 20)
        tier_w, tier_r = tier_bandwidth(cfg.swap_dir, [b for b, _ in profiles[0].saved_tensors])
        progress(
            f"NVMe at {cfg.swap_dir}: file I/O write {disk_w / 1e9:.2f} / read {disk_r / 1e9:.2f} GB/s "
            f"(O_DIRECT {direct}); the tier on one block's {len(profiles[0].saved_tensors)} saved tensors "
            f"({profiles[0].saved_bytes / 2**20:.1f} MiB): write {tier_w / 1e9:.2f} / read "
            f"{tier_r / 1e9:.2f} GB/s"
        )
        bench = Bench(
            cfg=cfg,
            spec=spec,
            tr=tr,
            base=base,
            profiles=profiles,
            block_call=_block_call(tr),
            param_bytes=param_bytes,
            tier_bps=(tier_w, tier_r) if cfg.bandwidth == "tier" else (disk_w, disk_r),
        )
        fracs = cfg.budgets
        baseline_m = {"step": base.step, "act_peak_bytes": base.act_peak_bytes}
        rows = [bench.row("no_offload", f, baseline_m) for f in fracs]
        if "recompute_all" in cfg.strategies:
            rows += bench.attempt("recompute_all", fracs, bench.recompute_all)
        for f in fracs:
            for name in ("memtier", "sac_milp"):
                if name in cfg.strategies:
                    rows += bench.attempt(name, [f], functools.partial(getattr(bench, name), f))
            if "compile_budget" in cfg.strategies:
                share = bench.compile_share(f)
                rows += bench.attempt(
                    "compile_budget", [f], lambda f=f, s=share: bench.compiled("compile_budget", [f], s)
                )
        if "compile_nobudget" in cfg.strategies:
            rows += bench.attempt(
                "compile_nobudget", fracs, lambda: bench.compiled("compile_nobudget", fracs, 1.0)
            )
    finally:
        if loss_handle is not None:
            loss_handle.remove()
    stats = bench.sac[0] if bench.sac is not None else None
    return {
        "question": "What does an activation memory budget cost in step time?",
        "config": dataclasses.asdict(cfg),
        "definitions": DEFINITIONS,
        "model": dataclasses.asdict(spec),
        "param_bytes": param_bytes,
        "baseline": dataclasses.asdict(base),
        "block_profile": dataclasses.asdict(profiles[0]),
        "nvme": {
            "path": cfg.swap_dir,
            "planned_with": cfg.bandwidth,
            "file_write_bps": disk_w,
            "file_read_bps": disk_r,
            "tier_write_bps": tier_w,
            "tier_read_bps": tier_r,
            "direct_io": direct,
        },
        "sac_stats": None
        if stats is None
        else {
            "ops": len(stats.func_names),
            "op_memory_bytes": sum(stats.memory),
            "op_runtime_ms": sum(stats.runtimes),
        },
        "rows": rows,
        "elapsed_s": time.perf_counter() - started,
    }


def _summary(row: dict[str, Any]) -> str:
    head = f"{row['strategy']} @ {row['budget_fraction']:.0%}"
    if row["status"] != "ok":
        return f"{head}: {row['status']} {row.get('error', '').splitlines()[0] if row.get('error') else ''}"
    pred = f" (predicted x{row['predicted_step_ratio']:.2f})" if "predicted_step_ratio" in row else ""
    return (
        f"{head}: x{row['step_ratio']:.2f}{pred}, peak {row['act_peak_bytes'] / 2**20:.1f} MiB vs budget "
        f"{row['budget_bytes'] / 2**20:.1f} MiB -> {'fits' if row['fits'] else 'EXCEEDS'}"
    )


# ---------------------------------------------------------------------------------------------- plot
# no red among them: red crosses mark a budget exceeded
COLORS = {
    "no_offload": "tab:gray",
    "memtier": "tab:orange",
    "recompute_all": "tab:green",
    "sac_milp": "tab:blue",
    "compile_budget": "tab:purple",
    "compile_nobudget": "tab:brown",
}


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [s for s in ("no_offload", *STRATEGIES) if any(r["strategy"] == s for r in rows)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    failed = []
    for name in names:
        rs = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["budget_fraction"])
        ok = [r for r in rs if r["status"] == "ok"]
        failed += [f"{name}@{r['budget_fraction']:.0%}: {r['status']}" for r in rs if r["status"] != "ok"]
        if not ok:
            continue
        color = COLORS[name]
        xs = [100 * r["budget_fraction"] for r in ok]
        ax.plot(xs, [r["step_ratio"] for r in ok], "-", color=color, label=name)
        ax2.plot(xs, [r["peak_over_budget"] for r in ok], "-", color=color, label=name)
        for r, x in zip(ok, xs):
            for a, y in ((ax, r["step_ratio"]), (ax2, r["peak_over_budget"])):
                if r["fits"]:
                    a.plot([x], [y], "o", color=color)
                else:  # open marker in the strategy's colour, crossed in red
                    a.plot([x], [y], "o", mfc="none", mec=color, ms=9)
                    a.plot([x], [y], "x", color="red", ms=6)
        if name == "memtier":
            ax.plot(
                xs,
                [r["predicted_step_ratio"] for r in ok],
                ":",
                color=color,
                label="memtier (planner's prediction)",
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("activation budget (% of the no-offload activation peak)")
    ax.set_ylabel("step time / no-offload step time")
    ax.set_title("cost of the budget (crossed: measured peak exceeds the budget)", fontsize=10)
    ax.legend(fontsize=7, ncols=2)
    ax2.axhline(1.0, color="red", lw=0.8, ls="--")
    ax2.set_xlabel("activation budget (% of the no-offload activation peak)")
    ax2.set_ylabel("measured activation peak / budget")
    ax2.set_title("does it fit? (<= 1)", fontsize=10)
    cfg, nvme, model = result["config"], result["nvme"], result["model"]
    fig.suptitle(
        f"{model['name']} x{model['num_layers']}, {cfg['batch']}x{cfg['seq_len']} tokens, swap to NVMe (tier "
        f"{nvme['tier_write_bps'] / 1e9:.2f}/{nvme['tier_read_bps'] / 1e9:.2f} GB/s w/r), "
        f"compile: {cfg['compile_backend']}",
        fontsize=10,
    )
    if failed:
        fig.text(0.01, 0.01, "not run: " + "; ".join(failed), fontsize=7, color="red")
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    savefig(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    result = run(cfg)
    write_json(cfg.out + ".json", result)
    plot(result, cfg.out + ".png")
    progress(f"wrote {cfg.out}.json and .png in {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
