"""`memtier estimate`: load and validate the specs, then report the cost models' breakdown."""

from __future__ import annotations

import argparse
from typing import Any

from launch.specs import cluster_from_arg, model_from_arg
from planner.units import fmt_bytes, fmt_count, fmt_rate


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = model_from_arg(args.model)
    cluster = cluster_from_arg(args.cluster, args.nodes)
    return {"params": model.params, "model": model.summary(), "cluster": cluster.summary()}


def render(result: dict[str, Any]) -> str:
    m, c = result["model"], result["cluster"]
    lines = [
        f"model   {m['name']} ({m['family']}): {fmt_count(m['params'])} parameters ({m['params']:,} exact)",
        f"        {m['layers']} layers, hidden {m['hidden']}, heads {m['heads']} (kv {m['kv_heads']}, dim {m['head_dim']}),"
        f" ffn {m['ffn']}, vocab {m['vocab']}{', tied embeddings' if m['tied_embeddings'] else ''}",
        f"cluster {c['name']}: {c['nodes']} node(s) x {c['devices_per_node']} {c['device']}"
        f" ({fmt_bytes(c['device_memory_bytes'])} each), {c['world_size']} devices",
        f"        links: intra-node {fmt_rate(c['intra_node_bandwidth'])}, inter-node {fmt_rate(c['inter_node_bandwidth'])},"
        f" {c['link_overrides']} per-link override(s)",
    ]
    for t in c["host_tiers"]:
        lines.append(
            f"        host {t['kind']:5s} {fmt_bytes(t['capacity_bytes']):>10s}"
            f"  read {fmt_rate(t['read_bw'])}  write {fmt_rate(t['write_bw'])}"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    raise NotImplementedError("--plot arrives with the cost models (issue 3)")
