"""benchmarks/activations.py's setting: its config, the model and trainer every strategy runs on, and the
measured no-offload baseline (step time, activation peak, per-block forward times)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

from planner.model import ModelSpec, to_hf_config_dict
from planner.presets import MODEL_PRESETS

STRATEGIES = ("memtier", "memtier_compile", "recompute_all", "sac_milp", "compile_budget", "compile_nobudget")


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
        self.losses: list[float] = []  # the last timed steps' losses (a strategy that breaks them is caught)

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
        self.losses.append(float(loss.detach()))
        return t3 - t0

    def timed(self, steps: int, warmup: int) -> dict[str, Any]:
        first = [self.step() for _ in range(warmup)]
        self.fwd_s.clear()
        self.bwd_s.clear()
        self.losses.clear()
        times = [self.step() for _ in range(steps)]
        return {
            "median_s": statistics.median(times),
            "times_s": times,
            "warmup_s": first,
            "losses": self.losses[:],
        }

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


def prepared(cfg: Config) -> tuple[ModelSpec, Trainer, Any]:
    """The bench's setting made ready: torch's threads set, the model and trainer built, and the chunked loss
    installed when `cfg.loss` says so. Returns (spec, trainer, the chunked loss's handle or None)."""
    torch.set_num_threads(cfg.threads)
    spec = model_spec(cfg)
    tr = Trainer(cfg, spec)
    if cfg.loss != "chunked":
        return spec, tr, None
    from offload.loss import install_chunked_loss

    return spec, tr, install_chunked_loss(tr.model, chunk_size=cfg.loss_chunk)


@dataclasses.dataclass(frozen=True)
class Round:
    """One configuration's turn in `alternating_rounds`: its timed steps, their forward and backward seconds,
    and the bytes its swap engine wrote during them (0 without one)."""

    times_s: list[float]
    fwd_s: list[float]
    bwd_s: list[float]
    bytes_swapped: int


def _bytes_swapped(handle: Any) -> int:
    return int(getattr(getattr(handle, "stats", None), "bytes_swapped", 0))


def alternating_rounds(
    tr: Trainer, installs: dict[str, Any], *, rounds: int, steps: int, warmup: int, label: str = ""
) -> tuple[dict[str, list[Round]], dict[str, int]]:
    """Configurations taking turns on one trainer, so load drifting on a shared machine hits them alike.

    Each round installs each configuration (`installs[name]()`: a context manager; dynamo is reset first, so
    each compiles its own graphs), runs `warmup` untimed steps (the compile), measures its activation peak in
    the first round, then `steps` timed steps; the order flips every round. Returns ({name: a Round per
    round}, {name: activation peak bytes})."""
    names = list(installs)
    out: dict[str, list[Round]] = {n: [] for n in names}
    peaks: dict[str, int] = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            torch._dynamo.reset()
            with installs[name]() as handle:
                for _ in range(warmup):
                    tr.step()
                if name not in peaks:
                    peaks[name] = tr.activation_peak()
                before = _bytes_swapped(handle)
                tr.fwd_s.clear()
                tr.bwd_s.clear()
                times = [tr.step() for _ in range(steps)]
                out[name].append(Round(times, tr.fwd_s[:], tr.bwd_s[:], _bytes_swapped(handle) - before))
            progress(f"{label}round {r + 1}/{rounds} {name}: {statistics.median(times):.3f} s/step")
    torch._dynamo.reset()
    return out, peaks


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


def bench_plan(spec: ModelSpec, cfg: Config, acts: tuple[Any, ...], tiers: tuple[Any, ...] = ()) -> Any:
    from planner.planning import fixed_plan
    from planner.presets import resolve_cluster
    from planner.workload import Workload

    return fixed_plan(
        spec,
        resolve_cluster("rtx4090-nvme"),  # metadata only: apply() reads activations and tiers
        Workload(global_batch=cfg.batch, seq_len=cfg.seq_len, dtype="fp32"),
        activations=acts,
        tiers=tiers,
    )


def block_call_of(tr: Trainer) -> tuple[tuple[Any, ...], dict[str, Any]]:
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
