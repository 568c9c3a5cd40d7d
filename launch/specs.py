"""Turning command-line names into specs (the one place `local` is resolved)."""

from __future__ import annotations

from planner.cluster import ClusterSpec
from planner.model import ModelSpec
from planner.presets import resolve_cluster, resolve_model


def cluster_from_arg(name: str, nodes: int | None = None) -> ClusterSpec:
    if name == "local":
        from launch.probe import local_cluster

        cluster = local_cluster()
        return cluster.with_nodes(nodes) if nodes is not None else cluster
    return resolve_cluster(name, nodes=nodes)


def model_from_arg(name: str) -> ModelSpec:
    return resolve_model(name)
