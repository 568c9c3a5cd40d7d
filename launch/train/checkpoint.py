"""Checkpoints that are never half-written, and exact resume.

A checkpoint is written into a temporary directory and renamed into place once every rank's files and the
meta file (written last) are on disk, so a checkpoint directory holds no checkpoint or a complete one.
Resuming restores model, optimizer, every rank's RNG state and the data position.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from launch.train.distributed import Dist, barrier

CKPT_PREFIX = "step-"
CKPT_TMP_PREFIX = ".tmp-"
META = "meta.json"


class Checkpointable(Protocol):
    def save(self, tmp: str) -> None: ...
    def load(self, path: str, *, convert: bool = False) -> None: ...


def complete_checkpoints(ckpt_dir: str) -> list[str]:
    """Checkpoint directories with their meta file (written last), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = sorted(n for n in os.listdir(ckpt_dir) if n.startswith(CKPT_PREFIX))
    return [os.path.join(ckpt_dir, n) for n in names if os.path.isfile(os.path.join(ckpt_dir, n, META))]


def remove_partial_checkpoints(ckpt_dir: str) -> list[str]:
    """Delete temporary directories left by a save that never finished (a killed run)."""
    removed = []
    if os.path.isdir(ckpt_dir):
        for n in os.listdir(ckpt_dir):
            if n.startswith(CKPT_TMP_PREFIX):
                shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)
                removed.append(n)
    return removed


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj: Any, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plan_digest(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def _mismatch(
    name: str, saved: torch.Tensor, shape: torch.Size, dtype: torch.dtype, convert: bool
) -> str | None:
    if saved.shape != shape:
        return f"{name}: saved with shape {tuple(saved.shape)}, the run has {tuple(shape)}"
    if saved.dtype != dtype and not convert:
        return (
            f"{name}: saved as {saved.dtype}, the run has {dtype} (--convert-checkpoint loads it converted)"
        )
    return None


def check_model_state(saved: dict[str, Any], model: torch.nn.Module, *, convert: bool) -> list[str]:
    """What in a saved model state does not fit the live model: shapes always, dtypes unless `convert`
    (torch's load_state_dict would copy a bf16 checkpoint into fp32 weights without a word)."""
    live = model.state_dict()
    out = []
    for name, tensor in saved.items():
        if name in live and isinstance(tensor, torch.Tensor):
            bad = _mismatch(name, tensor, live[name].shape, live[name].dtype, convert)
            if bad:
                out.append(bad)
    return out


def check_optimizer_state(saved: dict[str, Any], optimizer: Any, *, convert: bool) -> list[str]:
    """Per-parameter optimizer state (torch's format: state indexed by the parameters' order in
    param_groups) against the live parameters: moments in the parameter's dtype for torch's optimizers, fp32
    for memtier's offloaded AdamW (its moments and master copy are fp32 whatever the parameters are)."""
    params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    fp32_state = type(optimizer).__name__ == "OffloadedAdamW"
    out = []
    for index, entry in saved.get("state", {}).items():
        if not isinstance(index, int) or index >= len(params) or not isinstance(entry, dict):
            continue
        p = params[index]
        for key in ("exp_avg", "exp_avg_sq", "master"):
            tensor = entry.get(key)
            if isinstance(tensor, torch.Tensor):
                dtype = torch.float32 if fp32_state or key == "master" else p.dtype
                bad = _mismatch(f"optimizer state[{index}].{key}", tensor, p.shape, dtype, convert)
                if bad:
                    out.append(bad)
    return out


def refuse_mismatches(problems: list[str], path: str) -> None:
    from launch.train.config import TrainConfigError

    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise TrainConfigError("; ".join(problems[:3]) + more, field="--ckpt-dir", source=path)


@dataclass(frozen=True)
class Position:
    step: int = 0
    data_position: int = 0


def resume(engine: Checkpointable, d: Dist, ckpt_dir: str, *, fresh: bool, convert: bool = False) -> Position:
    """Clear unfinished saves, then load the latest complete checkpoint (unless `fresh`)."""
    from launch.train.config import TrainConfigError

    if d.main:
        os.makedirs(ckpt_dir, exist_ok=True)
        removed = remove_partial_checkpoints(ckpt_dir)
        if removed:
            print(f"[train] removed unfinished checkpoint(s): {', '.join(removed)}", file=sys.stderr)
    barrier(d)
    found = [] if fresh else complete_checkpoints(ckpt_dir)
    if not found:
        return Position()
    path = found[-1]
    with open(os.path.join(path, META)) as fh:
        meta = json.load(fh)
    if meta["world_size"] != d.world:
        raise TrainConfigError(
            f"checkpoint was written by {meta['world_size']} ranks, this run has {d.world}",
            field="--ckpt-dir",
            source=path,
        )
    engine.load(path, convert=convert)
    set_rng_state(torch.load(os.path.join(path, f"rng-rank{d.rank}.pt"), weights_only=False))
    pos = Position(int(meta["step"]), int(meta["data_position"]))
    if d.main:
        print(
            f"[train] resumed from {path}: step {pos.step}, data position {pos.data_position}",
            file=sys.stderr,
        )
    return pos


def _publish(tmp: str, final: str, ckpt_dir: str, meta: dict[str, Any]) -> None:
    """Rank 0: the meta file last, then an atomic rename (readers see no checkpoint or a complete one)."""
    with open(os.path.join(tmp, META), "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(ckpt_dir)


def save_checkpoint(
    engine: Checkpointable, d: Dist, ckpt_dir: str, pos: Position, meta: dict[str, Any]
) -> None:
    """Every rank writes its part into a temporary directory; rank 0 publishes it once all are on disk."""
    name = f"{CKPT_PREFIX}{pos.step:07d}"
    final = os.path.join(ckpt_dir, name)
    tmp = os.path.join(ckpt_dir, f"{CKPT_TMP_PREFIX}{name}")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(d)  # the directory exists before any rank writes into it
    try:
        engine.save(tmp)
        save_file(rng_state(), os.path.join(tmp, f"rng-rank{d.rank}.pt"))
        barrier(d)  # every rank's files are on disk before the meta file makes the checkpoint complete
        if d.main:
            full = {"step": pos.step, "data_position": pos.data_position, "world_size": d.world, **meta}
            _publish(tmp, final, ckpt_dir, {**full, "time": time.time()})
        barrier(d)
    except BaseException:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
