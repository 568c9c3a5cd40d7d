"""Does the rank mapping searched on measured links run faster on links that really differ?

An emulated cluster (`launch.measure.netem`: one network namespace per node, one rank per node, links
shaped with tc; 4 nodes at 100 mbit except one pair at 25 mbit) is measured with `memtier probe --links`,
then a data-parallel plan of a small model is made three ways and each is trained side by side for a few
steps with `memtier launch` + `examples/train_lm.py` (gloo over the shaped links):

  (a) measured: `make_plan` on the measured cluster YAML (the mapping searched on the measured matrix);
  (b) uniform:  `make_plan` on the same cluster with every link at the median measured bandwidth (what a
      user typing the spec sheet would give), its mapping run on the real links;
  (c) default:  rank r on node r.

The mapping is realised by which node hosts which rank. torchrun's c10d rendezvous numbers the nodes by
their address, not by `--node-rank` (torch warns that node_rank is only used by the static backend), so
namespace k always runs global rank k; running a mapping that puts logical block k on physical node
nodes_of_blocks[k] therefore gives namespace k the links of that physical node (the same physical
cluster with its nodes renamed). Predicted step times are the planner's (`planner.search.remap`: the
plan's layout timed on the measured links under each mapping); measured ones are the median step time
the trainer reports (`--metrics-out`), warm-up steps excluded.

    sudo python benchmarks/mapping.py [--quick]       # JSON + PNG under benchmarks/results/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from importlib import metadata
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a plain script from a source checkout
    sys.path.insert(0, _ROOT)

from launch.measure import links, netem  # noqa: E402
from planner.cluster import ClusterSpec, Links, cluster_to_yaml, load_cluster  # noqa: E402
from planner.plan import Plan  # noqa: E402
from planner.planning import make_plan  # noqa: E402
from planner.presets import MODEL_PRESETS  # noqa: E402
from planner.search import SearchSpace, remap  # noqa: E402
from planner.workload import Workload  # noqa: E402

RESULTS = os.path.join(_ROOT, "benchmarks", "results")
CONFIGS = ("measured", "uniform", "default")
TRAIN = os.path.join(_ROOT, "examples", "train_lm.py")


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    info["python"] = sys.version.split()[0]
    for pkg in ("torch", "numpy"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def uniform(cluster: ClusterSpec) -> ClusterSpec:
    """The same cluster with every inter-node link at the median measured one, no overrides."""
    bw = cluster.bandwidth_matrix()
    lat = cluster.latency_matrix()
    n = cluster.world_size
    off = [(i, j) for i in range(n) for j in range(i + 1, n)]
    inter = dataclasses.replace(
        cluster.links.inter_node,
        bandwidth=statistics.median(float(bw[i, j]) for i, j in off),
        latency=statistics.median(float(lat[i, j]) for i, j in off),
    )
    links_ = Links(intra_node=cluster.links.intra_node, inter_node=inter, overrides=())
    return dataclasses.replace(cluster, name=f"{cluster.name}-uniform", links=links_)


def block_nodes(mapping: tuple[int, ...], cluster: ClusterSpec) -> list[int]:
    """Physical node of each logical node block (`mapping`: logical rank -> global device index)."""
    per = cluster.devices_per_node
    return [int(d) // per for d in mapping[::per]]


def plans(measured: ClusterSpec, args: argparse.Namespace) -> tuple[Plan, dict[str, dict[str, Any]]]:
    """The three layouts with their node placement and the planner's predicted step time on the real links."""
    model = MODEL_PRESETS[args.model]
    world = measured.world_size
    workload = Workload(
        global_batch=args.micro_batch * world, micro_batch=args.micro_batch, seq_len=args.seq, dtype="fp32"
    )
    space = SearchSpace(micro_batch=args.micro_batch, data_parallel_only=True, zero_stages=(0,))
    res_m = make_plan(model, measured, workload, space=space, time_limit_s=5.0)
    res_u = make_plan(model, uniform(measured), workload, space=space, time_limit_s=5.0)
    chosen = res_m.chosen
    if chosen.mapping is None:
        raise SystemExit("the planner did not search a mapping for the chosen layout")
    mappings = {
        "measured": chosen.mapping.mapping,
        "uniform": res_u.chosen.mapping.mapping if res_u.chosen.mapping else tuple(range(world)),
        "default": tuple(range(world)),
    }
    out = {}
    for name, mapping in mappings.items():
        timed = remap(model, measured, workload, chosen, dataclasses.replace(chosen.mapping, mapping=mapping))
        out[name] = {
            "mapping": list(mapping),
            "nodes_of_blocks": block_nodes(mapping, measured),
            "predicted_step_s": timed.time.step_s,
            "predicted_dp_link_bytes_per_s": timed.mapping.links["dp"].bandwidth if timed.mapping else None,
        }
    out["uniform"]["predicted_by_uniform_plan_s"] = res_u.chosen.time.step_s
    return res_m.plan, out


def train(cluster: netem.EmulatedCluster, plan_path: str, args: Any, tag: str) -> float:
    """One DP training run, global rank k in namespace k; the median step time (s)."""
    port = 29600 + CONFIGS.index(tag)
    metrics = os.path.join(args.work, f"metrics-{tag}.json")
    argv = [sys.executable, "-m", "launch.cli", "launch", "--plan", plan_path, "--nproc", "1"]
    argv += ["--nnodes", str(cluster.nodes), "--rdzv-endpoint", cluster.rdzv_endpoint(port)]

    def node_argv(k: int) -> list[str]:
        tail = [TRAIN, "--steps", str(args.steps), "--warmup-steps", str(args.warmup), "--threads", "1"]
        tail += ["--log-every", str(args.steps)]
        return [*argv, "--node-rank", str(k), *tail, "--metrics-out", metrics]

    results = cluster.run_all(node_argv, timeout_s=args.timeout, cwd=_ROOT)
    for k, r in enumerate(results):
        if r.returncode != 0:
            raise SystemExit(f"{tag}: node {k} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    with open(metrics) as fh:
        return float(json.load(fh)["step_time_s"])


def relabelled(shapes: list[list[netem.LinkShape | None]], nodes_of_blocks: list[int]) -> list[list[Any]]:
    """The physical links seen from the ranks: namespace k stands for physical node nodes_of_blocks[k]."""
    n = len(nodes_of_blocks)
    return [[shapes[nodes_of_blocks[i]][nodes_of_blocks[j]] for j in range(n)] for i in range(n)]


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["configs"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [rows[n]["measured_step_s"] for n in names], 0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [rows[n]["predicted_step_s"] for n in names], 0.4, label="predicted")
    ax.set_xticks(list(x), [f"{n}\n{rows[n]['nodes_of_blocks']}" for n in names])
    ax.set_ylabel("step time (s)")
    c = result["cluster"]
    ax.set_title(f"DP {result['model']} on {c['nodes']} netns nodes, {c['slow']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    shapes = netem.uniform_shapes(args.nodes, args.fast_mbit)
    shapes = netem.with_link(shapes, 0, 1, netem.LinkShape(rate_mbit=args.slow_mbit))
    t0 = time.perf_counter()
    base, out = os.path.join(args.work, "base.yaml"), os.path.join(args.work, "cluster.yaml")
    from launch.specs import cluster_from_arg

    local = cluster_from_arg("local")
    if args.no_block_overhead:
        # the probe's per-block fixed cost is measured on a machine shared with other jobs; a stray load
        # spike there would make every predicted step compute-bound, hiding what the links change
        local = dataclasses.replace(local, device=dataclasses.replace(local.device, block_overhead=0.0))
    with open(base, "w") as fh:
        fh.write(cluster_to_yaml(local))
    with netem.emulated_cluster(shapes, tag="probe") as cluster:
        probe = [sys.executable, "-m", "launch.cli", "probe", "--links", "--nnodes", str(cluster.nodes)]
        probe += ["--rdzv-endpoint", cluster.rdzv_endpoint(29599), "--cluster", base, "--out", out]
        probe += ["--message-bytes", args.probe_bytes, "--reps", "3"]
        for r in cluster.run_all(
            lambda k: [*probe, "--node-rank", str(k)], timeout_s=args.timeout, cwd=_ROOT
        ):
            if r.returncode:
                raise SystemExit(f"probe --links failed:\n{r.stderr[-3000:]}")
    measured = load_cluster(out)
    plan, configs = plans(measured, args)
    # every node is given a plan naming its own node (`memtier launch` checks rank_to_device against
    # --node-rank); which physical node hosts which rank carries the mapping
    path = os.path.join(args.work, "plan.json")
    layout = dataclasses.replace(
        plan.layout, rank_to_device=tuple(measured.device_name(r) for r in range(measured.world_size))
    )
    dataclasses.replace(plan, layout=layout).save(path)
    rows: dict[str, Any] = {}
    for rnd in range(args.rounds):  # configs interleaved, so a busy moment hits all of them
        for name in CONFIGS:
            # torchrun's c10d rendezvous numbers nodes by address, not by --node-rank, so namespace k always
            # runs global rank k: the mapping is realised by giving namespace k the links of physical node
            # nodes_of_blocks[k] (the same physical cluster, its nodes renamed)
            nodes_of_blocks = configs[name]["nodes_of_blocks"]
            with netem.emulated_cluster(relabelled(shapes, nodes_of_blocks), tag=name) as cluster:
                step = train(cluster, path, args, name)
            rows.setdefault(name, dict(configs[name], runs_step_s=[]))["runs_step_s"].append(step)
            print(f"[mapping] round {rnd} {name}: {step:.3f} s/step", file=sys.stderr, flush=True)
    for row in rows.values():
        row["measured_step_s"] = statistics.median(row["runs_step_s"])
    speed = {}
    for other in ("uniform", "default"):
        speed[f"measured_vs_{other}"] = {
            "measured": rows[other]["measured_step_s"] / rows["measured"]["measured_step_s"],
            "predicted": rows[other]["predicted_step_s"] / rows["measured"]["predicted_step_s"],
        }
    with open(links.side_paths(out)[0]) as fh:
        link_report = json.load(fh)["measurement"]
    return {
        "question": "measured speedup of the mapping searched on measured links vs uniform-link and default plans",
        "model": args.model,
        "cluster": {
            "nodes": args.nodes,
            "ranks_per_node": 1,
            "fast_mbit": args.fast_mbit,
            "slow_mbit": args.slow_mbit,
            "slow": f"n0-n1 at {args.slow_mbit:g} mbit, others {args.fast_mbit:g}",
            "measured_link_bytes_per_s": link_report["parallel_bandwidth"],
        },
        "config": {k: v for k, v in vars(args).items() if k != "work"},
        "configs": rows,
        "speedups": speed,
        "seconds": time.perf_counter() - t0,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["tiny-llama", "tiny-gpt2", "llama-20m"], default="tiny-llama")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--fast-mbit", type=float, default=100.0)
    p.add_argument("--slow-mbit", type=float, default=25.0)
    p.add_argument("--probe-bytes", default="2MiB", help="probe --links --message-bytes")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="runs of each config, interleaved")
    p.add_argument(
        "--no-block-overhead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="predict with the probed device but no fixed per-block cost (default: on)",
    )
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--quick", action="store_true", help="fewer steps, one round")
    p.add_argument("--out", default=os.path.join(RESULTS, "mapping"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 6, 1
    # SIGTERM unwinds like Ctrl-C: the namespaces are removed and the launchers stop their ranks
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    reason = netem.available()
    if reason is not None:
        print(f"benchmarks/mapping.py: cannot build an emulated cluster: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="memtier-mapping-") as work:
        args.work = work
        result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    plot(result, args.out + ".png")
    for name, row in result["configs"].items():
        print(f"{name:9s} nodes {row['nodes_of_blocks']}: measured {row['measured_step_s']:.3f} s/step, "
              f"predicted {row['predicted_step_s']:.3f} s/step")  # fmt: skip
    for k, v in result["speedups"].items():
        print(f"{k}: measured {v['measured']:.2f}x, predicted {v['predicted']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
