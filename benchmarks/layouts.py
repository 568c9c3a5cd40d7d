"""Does the planner rank the layouts memtier runs the way they measure? 4 CPU ranks, torch's engine.

For each layout `launch.train.parallel` runs (dp4, FSDP2 dp4 ZeRO-3, dp2 x tp2, FSDP2 dp2 x tp2, pp2 x dp2
1F1B, pp2 interleaved 1F1B with 2 virtual stages, tp2 x pp2), one plan of the same model and global batch is
trained with `memtier launch --nproc 4` + `examples/train_lm.py`; the measured step time is the trainer's
median (`--metrics-out`, warm-up steps excluded; min and max beside it), the predicted one is
`planner.steptime.estimate_step_time` on this machine probed as a node of 4 CPU devices: the cached
`memtier probe` (compute, memory) with the links between the 4 ranks measured by `memtier probe --links
--nproc-per-node 4` (gloo, all pairs at once), the way `memtier launch --auto` plans CPU ranks. Spearman's
rho (Spearman 1904: the Pearson correlation of the ranks) says whether the planner orders the layouts as
they run.

    python benchmarks/layouts.py [--quick]       # JSON + PNG under benchmarks/results/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a plain script from a source checkout
    sys.path.insert(0, _ROOT)

from launch.measure.probe import local_cluster  # noqa: E402
from launch.measure.record import savefig, write_json  # noqa: E402
from planner.cluster import ClusterSpec  # noqa: E402
from planner.plan import Layout, Plan  # noqa: E402
from planner.planning import fixed_plan  # noqa: E402
from planner.presets import MODEL_PRESETS  # noqa: E402
from planner.steptime import estimate_step_time  # noqa: E402
from planner.workload import Workload  # noqa: E402

RANKS = 4
WARMUP = 2  # steps left out of the median (the first allocates, the second still settles)
TRAIN = os.path.join(_ROOT, "examples", "train_lm.py")
# name -> Layout fields (4 ranks; micro_batch x grad_accum x dp = the global batch, the same for all)
LAYOUTS: dict[str, dict[str, Any]] = {
    "dp4": {"dp": 4, "micro_batch": 2},
    "fsdp_dp4_zero3": {"dp": 4, "micro_batch": 2, "zero_stage": 3},
    "dp2_tp2": {"dp": 2, "tp": 2, "micro_batch": 4},
    "dp2_tp2_sp": {"dp": 2, "tp": 2, "micro_batch": 4, "sequence_parallel": True},
    "fsdp_dp2_tp2": {"dp": 2, "tp": 2, "micro_batch": 4, "zero_stage": 3},
    "pp2_dp2_1f1b": {"dp": 2, "pp": 2, "micro_batch": 2, "grad_accum": 2},
    "pp2_v2_interleaved": {"dp": 2, "pp": 2, "micro_batch": 2, "grad_accum": 2, "virtual_stages": 2},
    "tp2_pp2": {"tp": 2, "pp": 2, "micro_batch": 4, "grad_accum": 2},
}


def four_devices(cluster: ClusterSpec, workdir: str) -> ClusterSpec:
    """The probed node as 4 devices, as `memtier launch --auto` plans CPU ranks (`launch.run.auto_plan`),
    with the links between them measured (`memtier probe --links`, 4 ranks over gloo)."""
    from planner.cluster import cluster_to_yaml, load_cluster

    base = os.path.join(workdir, "local.yaml")
    with open(base, "w") as fh:
        fh.write(cluster_to_yaml(dataclasses.replace(cluster, devices_per_node=RANKS)))
    out = os.path.join(workdir, "links.yaml")
    cmd = [sys.executable, "-m", "launch.cli", "probe", "--links", "--nproc-per-node", str(RANKS),
           "--cluster", base, "--out", out]  # fmt: skip
    run = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"memtier probe --links failed:\n{run.stderr[-2000:]}")
    return load_cluster(out)


def make_plan(name: str, cluster: ClusterSpec, model_name: str, seq: int) -> Plan:
    fields = LAYOUTS[name]
    model = MODEL_PRESETS[model_name]
    layout = Layout(**fields, rank_to_device=tuple(f"n0:d{i}" for i in range(RANKS)))
    if layout.pp > 1:
        layout = dataclasses.replace(layout, stage_layers=(model.num_layers // layout.pp,) * layout.pp)
    batch = layout.micro_batch * layout.grad_accum * layout.dp
    workload = Workload(global_batch=batch, micro_batch=layout.micro_batch, seq_len=seq, dtype="fp32")
    plan = fixed_plan(model, cluster, workload, layout=layout)  # the planner's one builder
    predicted = estimate_step_time(model, cluster, workload, layout)
    return plan.replace(predicted=dataclasses.replace(plan.predicted, step_time_s=predicted.step_s))


def measure(plan: Plan, workdir: str, steps: int) -> dict[str, Any]:
    path = os.path.join(workdir, "plan.json")
    plan.save(path)
    metrics = os.path.join(workdir, "metrics.json")
    cmd = [sys.executable, "-m", "launch.cli", "launch", "--nproc", str(RANKS), "--plan", path, TRAIN,
           "--steps", str(steps), "--warmup-steps", str(WARMUP), "--metrics-out", metrics]  # fmt: skip
    out = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{plan.layout.describe()} failed:\n{out.stderr[-2000:]}")
    with open(metrics) as fh:
        return json.load(fh)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (no ties in step times)."""
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def plot(rows: list[dict[str, Any]], rho: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.scatter(r["predicted_step_s"], r["measured_step_s"])
        ax.annotate(r["layout"], (r["predicted_step_s"], r["measured_step_s"]), fontsize=8)
    ax.set_xlabel("predicted step time (s)")
    ax.set_ylabel("measured step time (s, median)")
    ax.set_title(f"layouts on 4 CPU ranks (gloo): Spearman rho = {rho:.2f}")
    savefig(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (4) and a shorter sequence (64)")
    p.add_argument("--model", default="llama-20m", choices=["tiny-llama", "llama-20m", "llama-34m"])
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results", "layouts"))
    args = p.parse_args(argv)
    steps, seq = (4, 64) if args.quick else (WARMUP + 10, 256)
    with tempfile.TemporaryDirectory(prefix="memtier-layouts-links-") as tmp:
        cluster = four_devices(local_cluster(), tmp)
    rows = []
    for name in args.layouts:
        plan = make_plan(name, cluster, args.model, seq)
        with tempfile.TemporaryDirectory(prefix=f"memtier-layouts-{name}-") as tmp:
            m = measure(plan, tmp, steps)
        rows.append({
            "layout": name, "describe": plan.layout.describe(), "predicted_step_s": plan.predicted.step_time_s,
            "measured_step_s": m["step_time_s"], "step_times_s": m["step_times_s"], "losses": m["losses"],
            "measured_min_s": min(m["step_times_s"]), "measured_max_s": max(m["step_times_s"]),
            "predicted_breakdown_s": estimate_step_time(plan.model, cluster, plan.workload, plan.layout).breakdown(),
        })  # fmt: skip
        r = rows[-1]
        print(f"{name:20s} predicted {r['predicted_step_s']:.3f} s  measured {m['step_time_s']:.3f} s "
              f"({r['measured_min_s']:.3f}-{r['measured_max_s']:.3f}, {len(m['step_times_s'])} steps)")  # fmt: skip
    rho = spearman([r["predicted_step_s"] for r in rows], [r["measured_step_s"] for r in rows])
    print(f"Spearman rho (predicted vs measured ranking): {rho:.2f}")
    config = {"model": args.model, "seq": seq, "steps": steps, "warmup_steps": WARMUP, "ranks": RANKS,
              "quick": args.quick}  # fmt: skip
    links = {
        "intra_node_bandwidth": cluster.links.intra_node.bandwidth,
        "latency": cluster.links.intra_node.latency,
    }
    write_json(args.out + ".json", {
        "config": config, "cluster": cluster.name, "links": links, "cores": cluster.cpu.cores, "rows": rows,
        "spearman_rho": rho,
    })  # fmt: skip
    plot(rows, rho, args.out + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
