"""Starting from weights on disk: a model built on the meta device, filled group by group from a checkpoint.

A model too big for memory cannot be built whole and then moved out. `offload.apply(..., weights=PATH)` takes a
model whose parameters are on the meta device (`accelerate.init_empty_weights()`, or `torch.device("meta")`
with real buffers) and a safetensors file: each group's parameters are read straight into its flat buffer
(`pread` at the tensor's offset; the header is the format's JSON, https://github.com/huggingface/safetensors)
and the page cache of what was read is dropped (`posix_fadvise(DONTNEED)`), so the checkpoint never sits in
memory whole, neither in the process nor in the cache.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from offload.state.groups import Group, StateError

__all__ = ["SafetensorsReader", "materialize_meta"]

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}  # fmt: skip


class SafetensorsReader:
    """Reads named tensors of one safetensors file into caller buffers, without mapping the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise StateError(
                f"{self.path}: cannot open the weights ({exc.strerror})", field="weights"
            ) from None
        try:
            head = os.pread(self._fd, 8, 0)
            if len(head) != 8:
                raise StateError(f"{self.path}: not a safetensors file (too short)", field="weights")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(self._fd).st_size
            if n > min(size - 8, 100 << 20):
                raise StateError(f"{self.path}: not a safetensors file (header size {n})", field="weights")
            try:
                header = json.loads(os.pread(self._fd, n, 8))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise StateError(
                    f"{self.path}: unreadable safetensors header ({exc})", field="weights"
                ) from None
        except BaseException:
            os.close(self._fd)
            raise
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self._base = 8 + n

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, on the CPU, the tensor's shape; any floating dtype) with tensor ``name``."""
        entry = self.entries.get(name)
        if entry is None:
            raise StateError(f"{self.path}: no tensor {name!r} in the weights", field="weights")
        dtype = _DTYPES.get(entry["dtype"])
        shape = tuple(entry["shape"])
        if dtype is None or shape != tuple(out.shape):
            raise StateError(
                f"{self.path}: {name} is {entry['dtype']} {list(shape)}, the model has {list(out.shape)}",
                field="weights",
            )
        start, end = entry["data_offsets"]
        dst = out if dtype == out.dtype else torch.empty(shape, dtype=dtype)
        nbytes = dst.numel() * dst.element_size()
        # the tensor's own memory as a writable buffer (contiguous CPU memory, alive while `dst` is)
        view = (
            memoryview((ctypes.c_char * nbytes).from_address(dst.data_ptr())).cast("B")
            if nbytes
            else memoryview(b"")
        )
        if len(view) != end - start:
            raise StateError(
                f"{self.path}: {name}: {end - start} bytes stored for {len(view)}", field="weights"
            )
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], self._base + start + done)
            if got <= 0:
                raise StateError(f"{self.path}: {name}: the file ends early", field="weights")
            done += got
        os.posix_fadvise(self._fd, self._base + start, end - start, os.POSIX_FADV_DONTNEED)
        if dst is not out:
            out.copy_(dst)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def materialize_meta(
    model: nn.Module, optimizer: Any, groups: Sequence[Group], device: torch.device, dtype: torch.dtype
) -> None:
    """Replace every meta parameter by an empty one on ``device`` (same name, ``requires_grad``), in the model,
    the optimizer's param_groups and the groups' slots; the slots keep the shapes."""
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            q = new.get(id(p))
            if q is None:
                q = new[id(p)] = nn.Parameter(
                    torch.empty(0, dtype=dtype, device=device), requires_grad=p.requires_grad
                )
            module._parameters[name] = q
    if not new:
        return
    if optimizer is not None:
        for g in optimizer.param_groups:
            g["params"] = [new.get(id(p), p) for p in g["params"]]
    for g in groups:
        for s in g.slots:
            s.param = new.get(id(s.param), s.param)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise StateError(f"parameters still on the meta device: {', '.join(left[:3])}", field="model")
