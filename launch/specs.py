"""Turning command-line names into specs (the one place `local` is resolved)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from planner.cluster import ClusterSpec
from planner.errors import SpecError
from planner.model import ModelSpec
from planner.presets import MODEL_PRESETS, resolve_cluster, resolve_model


def cluster_from_arg(name: str, nodes: int | None = None) -> ClusterSpec:
    if name == "local":
        from launch.measure.probe import local_cluster

        cluster = local_cluster()
        return cluster.with_nodes(nodes) if nodes is not None else cluster
    return resolve_cluster(name, nodes=nodes)


def is_factory(name: str) -> bool:
    """`FILE.py:FUNC` or `package.module:FUNC`: a function that builds the model (an nn.Module)."""
    return name not in MODEL_PRESETS and ":" in name and not name.endswith(".json")


def build_module(ref: str) -> Any:
    """Call the factory `ref` under the meta device: the model's shapes, none of its memory."""
    import torch

    where, _, func = ref.rpartition(":")
    if not where or not func.isidentifier():
        raise SpecError(f"expected FILE.py:FUNCTION or package.module:FUNCTION, got {ref!r}", field="model")
    try:
        if where.endswith(".py") or os.sep in where:
            if not os.path.exists(where):
                raise SpecError("file not found", source=where, field="model")
            spec = importlib.util.spec_from_file_location(f"memtier_model_{abs(hash(where))}", where)
            if spec is None or spec.loader is None:
                raise SpecError("not a Python file", source=where, field="model")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as exc:
        raise SpecError(f"cannot import {where!r}: {exc}", field="model") from exc
    factory = getattr(module, func, None)
    if not callable(factory):
        raise SpecError(f"{where!r} has no function {func!r}", field="model")
    with torch.device("meta"):
        model = factory()
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module", field="model")
    return model


def module_for_spec(spec: ModelSpec) -> Any:
    """The transformers model a ModelSpec describes, on the meta device (random-init shapes only)."""
    import torch
    import transformers

    from planner.model import to_hf_config_dict

    d = to_hf_config_dict(spec)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def model_from_arg(name: str) -> ModelSpec:
    """A preset, an HF config.json, or a factory building a transformers causal LM (read from its config)."""
    if is_factory(name):
        from planner.trace import model_spec_of

        return model_spec_of(build_module(name), name=name.rpartition(":")[2])
    return resolve_model(name)
