"""The offloaded optimizer's state in and out: torch's AdamW state dict, and the streamed checkpoint file.

``state_dict``/``load_state_dict`` use torch's per-parameter AdamW format (a torch AdamW state dict loads here
and vice versa, plus ``"master"`` for non-fp32 parameters), gathered from every tier one subgroup at a time.
``save_checkpoint``/``load_checkpoint`` stream the state subgroup by subgroup to one file with
write-then-rename (the file format: ``offload.optimizer_checkpoint``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from offload.optimizer.layout import EXP_AVG, EXP_AVG_SQ, MASTER, STATE_ROWS, Slot, rows
from offload.optimizer.params import gather_params, scatter_params
from offload.optimizer.residency import StateResidency
from offload.optimizer.settings import OptimizerOffloadError, validate_groups
from offload.optimizer_checkpoint import CheckpointError, read_checkpoint, write_checkpoint

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_header",
    "load_checkpoint",
    "load_state_dict",
    "packed_groups",
    "save_checkpoint",
    "state_dict",
]

logger = logging.getLogger("memtier.offload.optimizer")

CHECKPOINT_FORMAT = "memtier-optimizer-state"


def packed_groups(param_groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups as torch's state dicts keep them: their settings, parameters numbered in order."""
    out, start = [], 0
    for g in param_groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        packed["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        out.append(packed)
    return out


def _max_numel(slots: Sequence[Slot]) -> int:
    return max((s.layout.numel for s in slots), default=0)


# ---- torch's state dict --------------------------------------------------------------------------------------


def state_dict(
    states: StateResidency, params: Sequence[nn.Parameter], param_groups: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """torch.optim.AdamW's format: per-parameter ``step``/``exp_avg``/``exp_avg_sq`` (+ ``master`` when the
    parameter is not fp32), gathered from every tier (NVMe included), one subgroup at a time."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for slot in states.slots:
        lay = slot.layout
        if not any(slot.steps):
            continue
        host = states.load_state(slot, torch.empty(STATE_ROWS, lay.numel, dtype=torch.float32))
        for k, pid in enumerate(lay.params):
            step = slot.steps[k]
            if step == 0:
                continue  # no state yet, as torch's AdamW before a parameter's first update
            p = params[pid]
            off, n = lay.offsets[k], lay.numels[k]
            entry = {
                "step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": host[EXP_AVG, off : off + n].view(p.shape).clone(),
                "exp_avg_sq": host[EXP_AVG_SQ, off : off + n].view(p.shape).clone(),
            }
            if p.dtype != torch.float32:
                entry["master"] = host[MASTER, off : off + n].view(p.shape).clone()
            state[pid] = entry
    return {"state": state, "param_groups": packed_groups(param_groups)}


def _saved_state(
    saved: dict[str, Any], param_groups: Sequence[dict[str, Any]], n_params: int
) -> dict[int, dict[str, Any]]:
    """The per-parameter entries of a state dict by this optimizer's parameter index, after checking that its
    groups match ours; our groups take its settings."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(param_groups):
        raise OptimizerOffloadError(
            f"has {len(groups) if isinstance(groups, list) else groups!r} groups, the optimizer has "
            f"{len(param_groups)}",
            field="state_dict.param_groups",
        )
    for g, (mine, theirs) in enumerate(zip(param_groups, groups)):
        if len(theirs.get("params", ())) != len(mine["params"]):
            raise OptimizerOffloadError(
                f"has {len(theirs.get('params', ()))} parameters, the optimizer's group has {len(mine['params'])}",
                field=f"state_dict.param_groups[{g}].params",
            )
    saved_ids = [pid for g in groups for pid in g["params"]]
    by_saved = dict(zip(saved_ids, range(n_params)))
    state = {by_saved[k]: v for k, v in saved.get("state", {}).items() if k in by_saved}
    for mine, theirs in zip(param_groups, groups):
        for key, value in theirs.items():
            if key == "params":
                continue
            mine[key] = tuple(value) if key == "betas" else value
    return state


def _fill_rows(
    slot: Slot, out: torch.Tensor, state: dict[int, dict[str, Any]], params: Sequence[nn.Parameter]
) -> list[float]:
    """The saved entries of a subgroup's parameters into its [3, n] rows; their step counts."""
    lay = slot.layout
    steps = [0.0] * len(lay.params)
    for k, pid in enumerate(lay.params):
        entry = state.get(pid)
        if not entry:
            continue
        p = params[pid]
        off, n = lay.offsets[k], lay.numels[k]
        for key, row in (("master", MASTER), ("exp_avg", EXP_AVG), ("exp_avg_sq", EXP_AVG_SQ)):
            value = entry.get(key)
            if value is None:
                continue
            if value.numel() != n:
                raise OptimizerOffloadError(
                    f"has {value.numel()} elements, parameter {pid} has {n} ({tuple(p.shape)})",
                    field=f"state_dict.state[{pid}].{key}",
                )
            out[row, off : off + n].copy_(value.reshape(-1))
        steps[k] = float(entry.get("step", 0))
    return steps


def load_state_dict(
    states: StateResidency,
    params: Sequence[nn.Parameter],
    param_groups: Sequence[dict[str, Any]],
    saved: dict[str, Any],
) -> None:
    """Load torch's AdamW format (ours or torch.optim.AdamW's); the state goes to each subgroup's tier."""
    state = _saved_state(saved, param_groups, len(params))
    validate_groups(param_groups)  # they took the saved settings
    buf = torch.empty(STATE_ROWS * _max_numel(states.slots), dtype=torch.float32)
    with torch.no_grad():
        for slot in states.slots:
            out = rows(buf, slot.layout.numel)
            gather_params(params, slot.layout, out[MASTER])
            out[EXP_AVG:].zero_()
            slot.steps = _fill_rows(slot, out, state, params)
            states.store_state(slot, out)
    states.synchronize()


# ---- checkpoint file -----------------------------------------------------------------------------------------


def checkpoint_header(
    states: StateResidency,
    params: Sequence[nn.Parameter],
    param_groups: Sequence[dict[str, Any]],
    *,
    subgroup_size: int,
    cpu_kernel: str,
    iteration: int,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "param_groups": [_jsonable_group(g) for g in packed_groups(param_groups)],
        "params": [{"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")} for p in params],
        "subgroup_size": subgroup_size,
        "subgroups": [
            {
                "index": s.layout.index,
                "params": list(s.layout.params),
                "numel": s.layout.numel,
                "steps": list(s.steps),
                "tier": s.tier,
            }
            for s in states.slots
        ],
        "cpu_kernel": cpu_kernel,
        "iteration": iteration,
    }


def save_checkpoint(path: str, header: dict[str, Any], states: StateResidency) -> None:
    """Stream every subgroup's state (from whichever tier) to ``path``, written then renamed into place."""
    flat = torch.empty(STATE_ROWS * _max_numel(states.slots), dtype=torch.float32)

    def blocks() -> Iterator[torch.Tensor]:
        for slot in states.slots:
            yield states.load_state(slot, rows(flat, slot.layout.numel))

    write_checkpoint(path, header, blocks())
    logger.info("optimizer state of %d subgroups saved to %s", len(states.slots), path)


def _check_header(path: str, header: dict[str, Any], n_blocks: int, mine: dict[str, Any]) -> None:
    """The file's header describes the same parameters and subgroups as ``mine`` (this optimizer's)."""
    if header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"format {header.get('format')!r} is not {CHECKPOINT_FORMAT!r}", source=path, field="format"
        )
    if header.get("params") != mine["params"]:
        raise CheckpointError(
            f"parameters differ: the file has {len(header.get('params', []))}, the optimizer "
            f"{len(mine['params'])} (or their shapes/dtypes differ)",
            source=path,
            field="params",
        )
    theirs = header.get("subgroups", [])
    n_slots = len(mine["subgroups"])
    if n_blocks != n_slots or len(theirs) != n_slots:
        raise CheckpointError(
            f"has {len(theirs)} subgroups, the optimizer {n_slots} (subgroup_size "
            f"{header.get('subgroup_size')} vs {mine['subgroup_size']}); load it with the same plan",
            source=path,
            field="subgroups",
        )
    for i, (a, b) in enumerate(zip(theirs, mine["subgroups"])):
        if a.get("params") != b["params"] or a.get("numel") != b["numel"]:
            raise CheckpointError(
                "covers other parameters than this optimizer's", source=path, field=f"subgroups[{i}]"
            )
    if header.get("cpu_kernel") != mine["cpu_kernel"]:
        logger.warning(
            "checkpoint %s was written with the %s kernel, resuming with %s: not bit-identical",
            path,
            header.get("cpu_kernel"),
            mine["cpu_kernel"],
        )


def load_checkpoint(
    path: str,
    states: StateResidency,
    params: Sequence[nn.Parameter],
    param_groups: Sequence[dict[str, Any]],
    *,
    mine: dict[str, Any],
    restore_params: bool,
) -> int:
    """Load a checkpoint written by ``save_checkpoint`` for the same parameters and subgroups (``mine``: this
    optimizer's ``checkpoint_header``); the iteration it was saved at.

    With ``restore_params`` the model parameters are set from the saved fp32 master weights (so a model
    restored from its own checkpoint agrees with them exactly).
    """
    header, n_blocks, read = read_checkpoint(path)
    _check_header(path, header, n_blocks, mine)
    for mine_g, saved in zip(param_groups, header["param_groups"]):
        for key, value in saved.items():
            if key != "params":
                mine_g[key] = tuple(value) if key == "betas" else value
    flat = torch.empty(STATE_ROWS * _max_numel(states.slots), dtype=torch.float32)
    with torch.no_grad():
        for slot, meta in zip(states.slots, header.get("subgroups", [])):
            out = rows(flat, slot.layout.numel)
            read(slot.layout.index, out)
            slot.steps = [float(x) for x in meta["steps"]]
            if restore_params:
                scatter_params(params, slot.layout, out[MASTER])
            # NOTE: when the parameters are the master weights (fp32 on a CPU device, or device-resident
            # state), restore_params=False keeps the model's parameters as the master weights
            states.store_state(slot, out)
    states.synchronize()
    return int(header.get("iteration", 0))


def _jsonable_group(group: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in group.items():
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else value.tolist()
        elif isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # not representable; the group keeps its current value on load
        out[key] = value
    return out
