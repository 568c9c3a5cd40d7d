"""Shared test helpers: real HF models built from ModelSpecs (random init, no downloads)."""

from __future__ import annotations

import torch
import transformers

from planner.model import ModelSpec, to_hf_config_dict


def hf_model(spec: ModelSpec, *, seed: int = 0, attn: str | None = None, dropout: float = 0.0):
    d = to_hf_config_dict(spec, dropout=dropout)
    model_type = d.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **d)
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def measure_step_peak(model, optimizer, ids, *, steps: int = 1) -> dict[str, int]:
    """Peak live bytes of a training step (forward, backward, optimizer step), by category.

    The first step runs untracked so the optimizer state exists, as in steady state.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(steps):
            step()
    snap = tracker.get_tracker_snapshot("peak")
    per_dev = next(iter(snap.values()))
    return {str(k).split(".")[-1]: int(v) for k, v in per_dev.items()}


def vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    inside = False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")
