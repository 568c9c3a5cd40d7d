"""`memtier launch`: run a training script under torchrun with a plan applied.

Two processes supervise the job:

- the launcher (this module's `launch()`, behind the `memtier` command) resolves the plan (`--plan`, or
  `--auto`: plan for this machine first), builds the workers' environment and starts
- the agent: `python -m launch.run AGENT_REPORT TORCHRUN_ARGS...`, i.e. torchrun itself
  (`torch.distributed.run.parse_args` + `run`, the code behind `python -m torch.distributed.run`) in its
  own session, which writes what failed (global rank, local rank, exit code or signal, host) as JSON to
  AGENT_REPORT instead of a traceback.

Workers get MEMTIER_PLAN (absolute path of the plan; the script reads it with `planner.load_plan`),
MEMTIER_ENGINE, MEMTIER_DS_CONFIG for `--engine deepspeed`, OMP_NUM_THREADS = cores // processes per node,
and on GPUs CUDA_VISIBLE_DEVICES in the order of the plan's rank -> device mapping for this node (local rank
i gets the device of global rank node_rank * nproc + i). The process group backend is the script's to
choose (examples/train_lm.py: NCCL on GPUs, gloo on CPU).

Failures and signals:
- a rank that exits non-zero or dies: torchrun stops the other ranks (SIGTERM, then SIGKILL after
  `SHUTDOWN_TIMEOUT_S`), restarts the group up to `--max-restarts` times, then the launcher prints which rank
  failed and how and exits 1;
- SIGINT/SIGTERM to the launcher: forwarded as SIGTERM to the agent, which stops every rank (the workers'
  SIGTERM handling closes their tiers: swap files deleted); a second signal kills the whole process group;
  exit 128 + signal;
- on every way out the launcher kills whatever is left in the job's process group (no orphans) and removes
  swap directories of dead runs under the plan's NVMe tier path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from launch import heartbeat
from planner.errors import SpecError
from planner.plan import Plan, load_plan

# seconds torchrun waits for stopped workers to exit on SIGTERM before SIGKILL (its default is 30)
SHUTDOWN_TIMEOUT_S = 10.0
# seconds between torchrun's checks of its workers (its default is 0.1 in recent releases; set explicitly)
MONITOR_INTERVAL_S = 0.5
ENGINES = ("torch", "deepspeed", "accelerate")
# A rank that sends no heartbeat for this long is stopped (SIGSTOP, wedged); a first step that compiles a
# DeepSpeed op or solves a MIP keeps beating (the heartbeat is a thread). A collective whose peer is alive but
# silent fails after COLLECTIVE_TIMEOUT_S (torch's default is 30 min for gloo).
HEARTBEAT_TIMEOUT_S = 120.0
COLLECTIVE_TIMEOUT_S = 600.0


class LaunchError(SpecError):
    """Bad `memtier launch` input: names the option and, where there is one, the file."""


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    script: str
    script_args: tuple[str, ...] = ()
    plan_path: str | None = None
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    engine: str = "torch"
    max_restarts: int = 0
    ds_config: str | None = None
    shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S
    heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S  # a rank silent this long is killed (0: no watch)
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S  # the process group's timeout for one collective


@dataclass(frozen=True, kw_only=True)
class Failure:
    """The first rank that failed, as torchrun's agent saw it."""

    rank: int
    local_rank: int
    exitcode: int
    host: str = ""
    pid: int = 0
    signal: str = ""

    def describe(self) -> str:
        how = f"was killed by {self.signal}" if self.exitcode < 0 else f"exited with code {self.exitcode}"
        where = f" on {self.host}" if self.host else ""
        return f"rank {self.rank} (local rank {self.local_rank}{where}, pid {self.pid}) {how}"


@dataclass(frozen=True, kw_only=True)
class LaunchResult:
    exit_code: int
    failure: Failure | None = None
    signal: int | None = None  # the signal that stopped the launcher
    seconds: float = 0.0
    message: str = ""


# ------------------------------------------------------------------------------------------- environment
MMAP_THRESHOLD_BYTES = (
    64 << 10
)  # offload.state.MMAP_THRESHOLD_BYTES (launch does not import the runtime here)


def threads_per_rank(nproc: int, cores: int | None = None) -> int:
    """OMP_NUM_THREADS for each of `nproc` ranks on a node: the physical cores split evenly, at least 1."""
    if cores is None:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, cores // max(1, nproc))


def visible_devices(plan: Plan | None, *, nproc: int, node_rank: int) -> list[int] | None:
    """Device indices of this node in local-rank order, from the plan's rank -> device map (None: no map)."""
    if plan is None or not plan.layout.rank_to_device:
        return None
    mapping = plan.layout.rank_to_device
    out = []
    for local in range(nproc):
        g = node_rank * nproc + local
        if g >= len(mapping):
            raise LaunchError(
                f"rank {g} (node {node_rank}, local rank {local}) has no device: the plan maps {len(mapping)} ranks",
                field="layout.rank_to_device",
            )
        name = mapping[g]
        try:
            node_part, dev_part = name.split(":")
            node, dev = int(node_part[1:]), int(dev_part[1:])
        except ValueError:
            raise LaunchError(f"{name!r} is not 'nN:dM'", field=f"layout.rank_to_device[{g}]") from None
        if node != node_rank:
            raise LaunchError(
                f"rank {g} is mapped to {name}, not to node {node_rank} (this launcher's --node-rank)",
                field=f"layout.rank_to_device[{g}]",
            )
        out.append(dev)
    return out


def worker_env(
    spec: LaunchSpec,
    plan: Plan | None,
    *,
    base: dict[str, str] | None = None,
    cuda_devices: int | None = None,
    cores: int | None = None,
) -> dict[str, str]:
    """The environment torchrun's workers inherit."""
    env = dict(os.environ if base is None else base)
    if spec.plan_path:
        env["MEMTIER_PLAN"] = os.path.abspath(spec.plan_path)
    env["MEMTIER_ENGINE"] = spec.engine
    if spec.ds_config:
        env["MEMTIER_DS_CONFIG"] = os.path.abspath(spec.ds_config)
    env["OMP_NUM_THREADS"] = str(threads_per_rank(spec.nproc, cores))
    env["MEMTIER_COLLECTIVE_TIMEOUT_S"] = str(spec.collective_timeout_s)
    if cuda_devices is None:
        cuda_devices = _cuda_device_count()
    devices = visible_devices(plan, nproc=spec.nproc, node_rank=spec.node_rank)
    if cuda_devices and devices is not None:
        bad = [d for d in devices if d >= cuda_devices]
        if bad:
            raise LaunchError(
                f"the plan uses device(s) {bad} but this node has {cuda_devices} GPU(s)",
                field="layout.rank_to_device",
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if plan is not None and plan.model_state.stream:
        # a fixed mmap threshold from the start: freed activations and gradient copies go back to the system
        # (see offload.state.tame_host_allocator, which can only do part of it once the process runs)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
    # torchrun shares its rendezvous TCPStore with the workers' process group by default; after a restart the
    # new group can read the previous attempt's keys and connect to dead ranks (pytorch/pytorch#135712).
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch, no GPUs
        return 0


def torchrun_args(spec: LaunchSpec) -> list[str]:
    """Arguments of `python -m torch.distributed.run` for this job."""
    args = [
        "--nnodes",
        str(spec.nnodes),
        "--nproc-per-node",
        str(spec.nproc),
        "--max-restarts",
        str(spec.max_restarts),
        "--monitor-interval",
        str(MONITOR_INTERVAL_S),
        "--shutdown-timeout",
        str(int(spec.shutdown_timeout_s)),
    ]
    if spec.nnodes == 1 and not spec.rdzv_endpoint:
        args.append("--standalone")
    else:
        if not spec.rdzv_endpoint:
            raise LaunchError(
                f"--nnodes {spec.nnodes} needs --rdzv-endpoint HOST:PORT", field="--rdzv-endpoint"
            )
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint, "--rdzv-id", _rdzv_id(spec)]
    return args + [spec.script, *spec.script_args]


def _rdzv_id(spec: LaunchSpec) -> str:
    return os.environ.get("MEMTIER_RDZV_ID", f"memtier-{os.path.basename(spec.script)}")


def validate(spec: LaunchSpec) -> None:
    if not os.path.isfile(spec.script):
        raise LaunchError("file not found", field="script", source=spec.script)
    if spec.engine not in ENGINES:
        raise LaunchError(f"expected one of {ENGINES}, got {spec.engine!r}", field="--engine")
    if spec.max_restarts < 0:
        raise LaunchError(f"must be >= 0, got {spec.max_restarts}", field="--max-restarts")
    if spec.rdzv_endpoint is not None:
        host, _, port = spec.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise LaunchError(f"expected HOST:PORT, got {spec.rdzv_endpoint!r}", field="--rdzv-endpoint")
        if not 1 <= int(port) <= 65535:
            raise LaunchError(f"port {port} is not between 1 and 65535", field="--rdzv-endpoint")
    for name, value in (
        ("--heartbeat-timeout", spec.heartbeat_timeout_s),
        ("--collective-timeout", spec.collective_timeout_s),
    ):
        if not 0 <= value < float("inf"):
            raise LaunchError(f"must be a number of seconds >= 0, got {value}", field=name)


# ------------------------------------------------------------------------------------------- plans
def read_plan(path: str) -> Plan:
    if not os.path.isfile(path):
        raise LaunchError("file not found", field="--plan", source=path)
    return load_plan(path)


def preflight_tiers(plan: Plan, source: str | None = None) -> None:
    """Every NVMe tier of the plan: the path exists, is writable and has room for its cap.

    Runs before any rank starts, so a missing or read-only swap path is bad input (exit 2)
    naming the path, the bytes and the errno, not a failure in the middle of a step.
    """
    from offload.tiers.errors import TierPathError
    from offload.tiers.preflight import preflight

    for i, tier in enumerate(plan.tiers):
        if tier.kind != "nvme" or not tier.path:
            continue
        try:
            preflight(tier.path, int(tier.capacity_bytes))
        except TierPathError as e:
            raise LaunchError(str(e), field=f"tiers[{i}].path", source=source) from None


def check_plan_world(plan: Plan, spec: LaunchSpec) -> None:
    world = spec.nproc * spec.nnodes
    if plan.layout.world_size != world:
        lay = plan.layout
        raise LaunchError(
            f"tp({lay.tp}) * pp({lay.pp}) * dp({lay.dp}) * cp({lay.cp}) = {lay.world_size} != "
            f"nproc({spec.nproc}) * nnodes({spec.nnodes}) = {world}; re-plan for {world} ranks or launch "
            f"{lay.world_size}",
            field="layout",
            source=spec.plan_path,
        )


def check_runnable(plan: Plan, spec: LaunchSpec) -> None:
    """Refuse, before any rank starts, a layout the runtime cannot carry out (never run it another way).

    `launch.train.layouts.refusals` says what the trainer runs: on the torch engine data, tensor and pipeline
    parallelism (1F1B, interleaved), ZeRO 1-3 as FSDP2, and their products; ZeRO 0-3 data parallelism on
    DeepSpeed's; context parallelism nowhere. The first refusal is the error (exit 2, the field named).
    """
    from launch.train.layouts import refusals

    problems = refusals(plan)
    if problems:
        name, why = problems[0]
        raise LaunchError(
            f"{why}; memtier's trainer cannot run this plan: re-plan (`memtier plan --data-parallel-only` runs "
            "everywhere)",
            field=name,
            source=spec.plan_path,
        )


def auto_plan(
    *,
    model: str,
    seq: int,
    micro_batch: int,
    nproc: int,
    budget: int | None,
    out_dir: str,
    optimizer: str = "adamw",
    cluster_arg: str = "local",
    engine: str = "torch",
) -> str:
    """Plan for this machine and write plan.json under `out_dir`; its path.

    The cluster is `cluster_arg` ("local": launch.measure.probe.local_cluster, the cached probe). The plan comes from
    the planner's fixed-layout mode, planner.budget.plan_for_budget: data parallel over the ranks (what the
    torch engine runs), per-block activation swap/recompute, chunked loss and optimizer offload as the
    per-rank budget needs.
    """
    from launch.specs import cluster_from_arg, model_from_arg
    from planner.budget import plan_for_budget
    from planner.workload import OptimizerSpec, Workload

    cluster = cluster_from_arg(cluster_arg)
    spec = model_from_arg(model)
    dtype = "fp32" if cluster.device.kind == "cpu" else "bf16"
    workload = Workload(
        global_batch=micro_batch * nproc,
        micro_batch=micro_batch,
        seq_len=seq,
        dtype=dtype,
        optimizer=OptimizerSpec(kind=optimizer),  # type: ignore[arg-type]
    )
    if cluster.device.kind == "cpu":
        # the ranks of a node share its memory: each gets an equal share
        cap = budget or int(cluster.device.memory * (1 - workload.headroom) / nproc)
        cluster_for_ranks = dataclasses.replace(cluster, devices_per_node=nproc)
    else:
        cap = budget or int(cluster.device.memory * (1 - workload.headroom))
        cluster_for_ranks = cluster
    result = plan_for_budget(
        spec,
        cluster_for_ranks,
        workload,
        budget_bytes=cap,
        dp=nproc,
        optimizer_offload=True,
        engine=engine,  # type: ignore[arg-type]
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "plan.json")
    result.plan.save(path)
    print(
        f"memtier launch: planned {spec.name} for this machine ({result.steps[-1]}; predicted peak "
        f"{result.plan.predicted.peak_bytes / 2**20:.0f} MiB per rank of {cap / 2**20:.0f} MiB) -> {path}",
        file=sys.stderr,
    )
    return path


def deepspeed_config(plan: Plan | None, *, plan_path: str | None, out_dir: str) -> str:
    """The DeepSpeed config for the job: the one `memtier plan` emitted beside plan.json, else
    planner.emit.ds_config(plan) written to `out_dir` (planner/emit.py is its only producer)."""
    if plan is None:
        raise LaunchError(
            "the deepspeed engine needs a plan (its ds_config.json is derived from it): "
            "`memtier plan --engine deepspeed ...`, then `memtier launch --plan DIR/plan.json`",
            field="--engine",
        )
    if plan_path:
        emitted = os.path.join(os.path.dirname(os.path.abspath(plan_path)), "ds_config.json")
        if os.path.isfile(emitted):
            return emitted
    from planner.emit import write_ds_config

    return write_ds_config(plan, out_dir)


def resolve_engine(plan: Plan | None, requested: str | None, source: str | None) -> str:
    """The plan decides the engine (`layout.engine`); `--engine` may only repeat it."""
    if plan is None:
        return requested or "torch"
    if requested is not None and requested != plan.layout.engine:
        raise LaunchError(
            f"the plan's layout.engine is {plan.layout.engine!r}, not {requested!r} ({source}); re-plan with "
            f"`memtier plan --engine {requested}`",
            field="--engine",
        )
    return plan.layout.engine


# ------------------------------------------------------------------------------------------- supervision
def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_members(pgid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _reap_swap(plan: Plan | None) -> None:
    if plan is None:
        return
    tier = plan.tier("nvme")
    if tier is None or not tier.path or not os.path.isdir(tier.path):
        return
    try:
        from offload.tiers.rundir import reap_dead_runs
    except ImportError:
        return
    try:
        reap_dead_runs(tier.path)
    except OSError as exc:
        print(f"memtier launch: could not clean swap directory {tier.path}: {exc}", file=sys.stderr)


def launch(
    spec: LaunchSpec,
    plan: Plan | None = None,
    *,
    log_path: str | None = None,
    handle_signals: bool = True,
    on_start: Callable[[int], None] | None = None,
) -> LaunchResult:
    """Run the job; returns when every process of it is gone.

    `log_path`: the job's output goes there. `handle_signals=False` leaves SIGINT/SIGTERM alone (for callers
    that run several jobs from threads; only the main thread may install handlers); such a caller gets the
    agent's pid, which is also the job's process group, from `on_start`, to stop the job itself.
    """
    validate(spec)
    if plan is None and spec.plan_path:
        plan = read_plan(spec.plan_path)
    if plan is not None:
        check_plan_world(plan, spec)
        check_runnable(plan, spec)
        preflight_tiers(plan, spec.plan_path)
    env = worker_env(spec, plan)
    heartbeats = tempfile.mkdtemp(prefix="memtier-heartbeat-")
    env[heartbeat.HEARTBEAT_DIR_ENV] = heartbeats
    stale: list[heartbeat.Stale] = []
    fd, report = tempfile.mkstemp(prefix="memtier-agent-", suffix=".json")
    os.close(fd)
    os.unlink(report)  # the agent writes it only when something failed
    cmd = [sys.executable, "-m", "launch.run", report, *torchrun_args(spec)]
    started = time.perf_counter()
    received: list[int] = []
    # Ordering: the agent runs in its own session, so a terminal's Ctrl-C reaches only the launcher, which
    # forwards one SIGTERM to the agent (torchrun then stops its workers and exits) and, on a second signal,
    # SIGKILLs the whole group. Handlers are installed before the agent starts so no signal is missed.
    proc: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        if proc is None:
            return
        if len(received) == 1:
            _send(proc, signal.SIGTERM)
        else:
            _kill_group(proc.pid, signal.SIGKILL)

    previous = (
        {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if handle_signals else {}
    )
    try:
        log = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed below, after the wait
        try:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=log)
        finally:
            if log is not None:
                log.close()  # the child holds its own descriptor
        if on_start is not None:
            on_start(proc.pid)
        if received:  # a signal that arrived while starting
            _send(proc, signal.SIGTERM)
        code = _wait(proc, heartbeats, spec.heartbeat_timeout_s, stale)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if proc is not None:
            # Everything torchrun started is in its process group: after it exited, anything left there is an
            # orphan (a worker that ignored SIGTERM, a helper it spawned). Kill it and wait for it to go.
            left = _group_members(proc.pid)
            if left:
                _kill_group(proc.pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while _group_members(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        _reap_swap(plan)
        shutil.rmtree(heartbeats, ignore_errors=True)
    seconds = time.perf_counter() - started
    failure = _read_report(report)
    if received:
        sig = received[0]
        return LaunchResult(
            exit_code=128 + sig,
            signal=sig,
            seconds=seconds,
            message=f"stopped by {signal.Signals(sig).name}: all ranks were stopped",
        )
    if code == 0:
        return LaunchResult(exit_code=0, seconds=seconds, message="all ranks finished")
    if stale:
        msg = "; ".join(s.describe() for s in stale) + "; the job was stopped"
        if failure is not None:
            msg += f" ({failure.describe()})"
    elif failure is not None:
        msg = f"{failure.describe()}; the job was stopped"
        if spec.max_restarts:
            msg += f" after {spec.max_restarts} restart(s)"
    else:
        msg = f"torchrun exited with code {code}"
    return LaunchResult(exit_code=1, failure=failure, seconds=seconds, message=msg)


def _wait(
    proc: subprocess.Popen[bytes], heartbeats: str, timeout_s: float, stale: list[heartbeat.Stale]
) -> int:
    """Wait for the agent; meanwhile SIGKILL any rank whose heartbeat is older than `timeout_s` (recorded in
    `stale`). torchrun sees the killed worker fail and stops (or restarts) the group as for any crash."""
    killed: set[int] = set()
    while True:
        try:
            return proc.wait(timeout=1.0 if timeout_s else None)
        except InterruptedError:
            continue
        except subprocess.TimeoutExpired:
            pass
        for s in heartbeat.stale_ranks(heartbeats, timeout_s):
            if s.pid not in killed:
                killed.add(s.pid)
                stale.append(s)
                print(f"memtier launch: {s.describe()}", file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(s.pid, signal.SIGKILL)


def _send(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _read_report(path: str) -> Failure | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    first = data.get("first_failure")
    return Failure(**first) if first else None


# ------------------------------------------------------------------------------------------- CLI glue
def run_cli(args: argparse.Namespace) -> int:
    """`memtier launch` (called by launch.cli)."""
    script_args = list(args.script_args)
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    plan_path = args.plan
    if args.auto:
        plan_path = auto_plan(
            model=args.model,
            seq=args.seq,
            micro_batch=args.micro_batch,
            nproc=args.nproc * args.nnodes,
            budget=_parse_budget(args.budget),
            out_dir=args.plan_out,
            cluster_arg=args.cluster,
            engine=args.engine or "torch",
        )
    plan = read_plan(plan_path) if plan_path else None
    spec = LaunchSpec(
        script=args.script,
        script_args=tuple(script_args),
        plan_path=plan_path,
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank if args.node_rank is not None else int(os.environ.get("NODE_RANK", "0")),
        rdzv_endpoint=args.rdzv_endpoint,
        engine=resolve_engine(plan, args.engine, plan_path),
        max_restarts=args.max_restarts,
        **_timeouts(args),
    )
    if spec.engine == "deepspeed":
        out = os.path.dirname(os.path.abspath(plan_path)) if plan_path else args.plan_out
        spec = dataclasses.replace(spec, ds_config=deepspeed_config(plan, plan_path=plan_path, out_dir=out))
    result = launch(spec, plan)
    stream = sys.stderr
    print(f"memtier launch: {result.message} ({result.seconds:.1f} s)", file=stream)
    return result.exit_code


def _timeouts(args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for flag, name in (
        ("--heartbeat-timeout", "heartbeat_timeout_s"),
        ("--collective-timeout", "collective_timeout_s"),
    ):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is None:
            continue
        if not (value >= 0 and value < float("inf")):
            raise LaunchError(f"must be a number of seconds >= 0, got {value}", field=flag)
        out[name] = float(value)
    return out


def _parse_budget(text: str | None) -> int | None:
    if not text:
        return None
    from planner.units import parse_bytes

    try:
        return int(parse_bytes(text))
    except ValueError as exc:
        raise LaunchError(str(exc), field="--budget") from None


# ------------------------------------------------------------------------------------------- the agent
def _agent(argv: list[str]) -> int:
    """torchrun in this process; what failed goes to argv[0] as JSON."""
    report, targs = argv[0], argv[1:]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _honour_shutdown_timeout()
    try:
        run(parse_args(targs))
        return 0
    except ChildFailedError as exc:
        rank, f = exc.get_first_failure()
        first = {
            "rank": int(rank),
            "local_rank": int(f.local_rank),
            "exitcode": int(f.exitcode),
            "pid": int(f.pid),
            "host": _host(),
            "signal": f.signal_name() if f.exitcode < 0 else "",
        }
        with open(report + ".tmp", "w") as fh:
            json.dump({"first_failure": first, "failed_ranks": sorted(int(r) for r in exc.failures)}, fh)
        os.replace(report + ".tmp", report)
        return 1
    except SignalException as exc:
        return 128 + int(exc.sigval)


def _honour_shutdown_timeout() -> None:
    """Stop workers after a failure with the --shutdown-timeout grace, not a fixed 30 s.

    NOTE: torch's LocalElasticAgent._stop_workers (the path after a worker failure and before a restart)
    calls `_shutdown()` with its default 30 s, ignoring --shutdown-timeout, so a rank blocked in a C++ call
    would keep the job alive 30 s after another rank died. This routes it through the configured timeout.
    """
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    if not hasattr(LocalElasticAgent, "_shutdown") or not hasattr(LocalElasticAgent, "_stop_workers"):
        return

    def _stop_workers(self: Any, worker_group: Any) -> None:
        self._shutdown(timeout=getattr(self, "_shutdown_timeout", int(SHUTDOWN_TIMEOUT_S)))

    LocalElasticAgent._stop_workers = _stop_workers  # type: ignore[method-assign]


def _host() -> str:
    import socket

    return socket.gethostname()


if __name__ == "__main__":
    sys.exit(_agent(sys.argv[1:]))
