"""The offloaded optimizer's checkpoint file: a JSON header, raw fp32 blocks, a JSON trailer; no pickle.

Layout (little-endian)::

    b"MTOPTST1"  u64 header_len  header (UTF-8 JSON)  zeros to a 4096-byte boundary
    block 0 (raw bytes, padded with zeros to 4096)  block 1  ...
    trailer (UTF-8 JSON: {"blocks": [{"offset", "nbytes", "crc32"}, ...]})  u64 trailer_len  b"MTOPTEND"

Blocks are streamed one at a time (the state of one subgroup: at most one subgroup is in memory), so a
checkpoint of NVMe-resident state never materialises the whole state. The file is written to a temporary
name in the same directory, fsynced, then renamed over the target (write-then-rename): a crash during the
save leaves the previous checkpoint intact, and a reader never sees a half-written file. Each block carries a
CRC32 checked on load; a truncated or corrupted file raises ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from planner.errors import SpecError

__all__ = ["CheckpointError", "read_checkpoint", "write_checkpoint"]

MAGIC = b"MTOPTST1"
END_MAGIC = b"MTOPTEND"
ALIGN = 4096
_U64 = struct.Struct("<Q")


class CheckpointError(SpecError):
    """A checkpoint file that cannot be read back (the message names the file and what is wrong)."""


def _pad(n: int) -> int:
    return (-n) % ALIGN


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data


def write_checkpoint(
    path: str | os.PathLike[str], header: dict[str, Any], blocks: Iterable[torch.Tensor]
) -> None:
    """Write ``header`` and the tensors ``blocks`` yields (one at a time) to ``path``, atomically.

    ``blocks`` is consumed lazily: each tensor may be a reused staging buffer, overwritten after the next
    ``next()``; its bytes have been written by then.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    head = json.dumps(header, sort_keys=True).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(_U64.pack(len(head)))
            f.write(head)
            f.write(b"\0" * _pad(f.tell()))
            table = []
            for block in blocks:
                data = _bytes_of(block)
                offset = f.tell()
                f.write(data)
                f.write(b"\0" * _pad(len(data)))
                table.append({"offset": offset, "nbytes": len(data), "crc32": zlib.crc32(data)})
            trailer = json.dumps({"blocks": table}).encode()
            f.write(trailer)
            f.write(_U64.pack(len(trailer)))
            f.write(END_MAGIC)
            f.flush()
            # Ordering: the data is on disk before the rename makes it the checkpoint, and the rename is on
            # disk (directory fsync) before this function returns.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], int, Callable[[int, torch.Tensor], torch.Tensor]]:
    """(header, number of blocks, ``read(i, out)``) of a checkpoint; ``read`` fills the CPU tensor ``out``
    (contiguous, the block's size) with block ``i`` after checking its CRC32, and returns it."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read the checkpoint: {exc.strerror}", source=path) from exc
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise CheckpointError("not a memtier optimizer checkpoint (bad magic)", source=path)
        (head_len,) = _U64.unpack(f.read(_U64.size))
        if head_len > size:
            raise CheckpointError(f"header length {head_len} exceeds the file size {size}", source=path)
        try:
            header = json.loads(f.read(head_len))
        except ValueError as exc:
            raise CheckpointError(f"header is not valid JSON: {exc}", source=path) from exc
        tail = len(END_MAGIC) + _U64.size
        if size < tail:
            raise CheckpointError("truncated: no trailer", source=path)
        f.seek(size - tail)
        (trailer_len,) = _U64.unpack(f.read(_U64.size))
        if f.read(len(END_MAGIC)) != END_MAGIC or trailer_len > size - tail:
            raise CheckpointError(
                "truncated or corrupted: bad trailer (was the save interrupted?)", source=path
            )
        f.seek(size - tail - trailer_len)
        try:
            table = json.loads(f.read(trailer_len))["blocks"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"trailer is not valid: {exc}", source=path) from exc

    def read(i: int, out: torch.Tensor) -> torch.Tensor:
        entry = table[i]
        nbytes = int(entry["nbytes"])
        if out.device.type != "cpu" or not out.is_contiguous() or out.numel() * out.element_size() != nbytes:
            raise CheckpointError(
                f"block {i}: destination of {out.numel() * out.element_size()} bytes, block has {nbytes}",
                source=path,
            )
        view = out.reshape(-1).view(torch.uint8).numpy().data
        with open(path, "rb") as f:
            f.seek(int(entry["offset"]))
            got = f.readinto(view)
        if got != nbytes:
            raise CheckpointError(f"block {i}: read {got} of {nbytes} bytes (truncated file)", source=path)
        crc = zlib.crc32(view)
        if crc != int(entry["crc32"]):
            raise CheckpointError(
                f"block {i}: CRC32 mismatch ({crc:#010x} != {entry['crc32']:#010x})", source=path
            )
        return out

    return header, len(table), read
