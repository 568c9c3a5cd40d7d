"""Sizes and lifetimes of the tensors one transformer block allocates in forward + backward.

`trace_block(block, example_input)` runs one forward and one backward of a real
`nn.Module` under a `TorchDispatchMode` and records, for every storage an aten op
allocates, its size and its lifetime in op-index units. The result is the input of
the buffer-reuse solver (`planner.mip.buffers`): the dynamic-storage-allocation
instance of one block, which MEMO (Zhao et al. 2024, arXiv 2407.12117) solves
once and reuses for every identical transformer layer.

Time axis: op `i` is the i-th aten op dispatched (forward first, then backward). A
tensor allocated by op `start` and last alive while op `end - 1` ran has the
half-open lifetime `[start, end)`; two tensors may share bytes iff their lifetimes
are disjoint. An op's output overlaps with its inputs (both live while it runs).

Torch enters the planner only here, and only inside `trace_block` (imported lazily),
so `memtier plan` stays torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from planner.errors import SpecError
from planner.schema import atomic_write_text, build, to_plain

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

TRACE_SCHEMA_VERSION = "1.0"

# What a traced storage is for, read from when it was allocated and freed:
#   temporary: allocated and freed inside the same pass (forward or backward)
#   saved:     allocated in forward, still alive when backward starts (saved for backward)
#   output:    the block's forward output (the next block's input in a real model)
#   gradient:  allocated in backward and alive at the end (parameter and input gradients)
TensorRole = Literal["temporary", "saved", "output", "gradient"]


class TraceError(SpecError):
    """A trace file or a traced module that cannot be used (names the field and file)."""


class LifetimeError(ValueError):
    """A TensorLife whose numbers contradict each other (the message names the fields)."""


@dataclass(frozen=True, kw_only=True)
class TensorLife:
    """One storage allocated while tracing a block: its size and half-open lifetime [start, end)."""

    size_bytes: int = field(metadata={"min": 0})  # bytes of the storage (untyped_storage().nbytes())
    start: int = field(metadata={"min": 0})  # index of the aten op that allocated it
    end: int = field(metadata={"min": 1})  # one past the index of the last op it was alive for
    op: str = ""  # the allocating aten op, e.g. "aten.mm.default"
    role: TensorRole = "temporary"

    def __post_init__(self) -> None:
        if self.end <= self.start:
            # a plain ValueError subclass: planner.schema.build adds the dotted field and file
            raise LifetimeError(f"end({self.end}) must be > start({self.start})")

    def overlaps(self, other: TensorLife) -> bool:
        """True when both are alive at some op index (they cannot share bytes)."""
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True, kw_only=True)
class BlockTrace:
    """A traced block as stored on disk: the lifetimes plus what they were traced from."""

    schema_version: str = TRACE_SCHEMA_VERSION
    tensors: tuple[TensorLife, ...]
    forward_ops: int = field(metadata={"min": 0})  # ops [0, forward_ops) are the forward pass
    total_ops: int = field(metadata={"min": 0})  # ops [forward_ops, total_ops) are the backward pass
    source: dict[str, Any] = field(default_factory=dict)  # free-form description (module, shapes, dtype)


def live_bytes_peak(tensors: Sequence[TensorLife]) -> int:
    """Max over op indices of the bytes alive at that op: a lower bound for any arena holding them."""
    events: dict[int, int] = {}
    for t in tensors:
        events[t.start] = events.get(t.start, 0) + t.size_bytes
        events[t.end] = events.get(t.end, 0) - t.size_bytes
    live = peak = 0
    for i in sorted(events):
        live += events[i]
        peak = max(peak, live)
    return peak


# ---- tracing ------------------------------------------------------------------------------------


def trace_block(
    block: nn.Module,
    example_input: torch.Tensor | Sequence[Any],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
) -> tuple[TensorLife, ...]:
    """Lifetimes of every storage `block` allocates in one forward + backward on `example_input`.

    Floating-point positional inputs are detached and made to require grad (in a model
    they come from the previous block); keyword inputs are passed as they are. The
    backward is seeded with a fixed gradient of ones for every floating-point output.
    Storages that exist before the trace (parameters, buffers, inputs, the seed
    gradient) are not recorded: they do not live in the block's arena.
    """
    return trace_block_full(block, example_input, example_kwargs=example_kwargs).tensors


def trace_block_full(
    block: nn.Module,
    example_input: torch.Tensor | Sequence[Any],
    *,
    example_kwargs: Mapping[str, Any] | None = None,
) -> BlockTrace:
    """`trace_block` plus the forward/backward boundary and a description of what was traced."""
    import torch
    from torch.utils._pytree import tree_leaves

    args_in = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    args = tuple(
        a.detach().clone().requires_grad_(True)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args_in
    )
    kwargs = dict(example_kwargs or {})

    # storages that exist before the trace: never part of the block's arena
    preexisting: set[int] = set()
    for t in [*block.parameters(), *block.buffers(), *tree_leaves((args, kwargs))]:
        if isinstance(t, torch.Tensor):
            preexisting.add(t.untyped_storage().data_ptr())

    # the trace allocates parameter gradients afresh: park the caller's and put them back after
    params = list(block.parameters())
    caller_grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    recorder = _Recorder(preexisting)
    with recorder.mode():
        outputs = block(*args, **kwargs)
        out_tensors = [
            t
            for t in tree_leaves(outputs)
            if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()
        ]
        if not out_tensors:
            raise TraceError("the block returned no tensor that requires grad", field="block")
        recorder.mark_outputs(out_tensors)
        # the seed gradient is made outside the recorded ops: it is the next block's input gradient
        with recorder.paused():
            seeds = [torch.ones_like(t) for t in out_tensors]
            for s in seeds:
                preexisting.add(s.untyped_storage().data_ptr())
        recorder.begin_backward()
        torch.autograd.backward(out_tensors, seeds)
        # ordering: drop our references first, so the output's death is recorded inside the trace
        del outputs, out_tensors, seeds
    trace = recorder.finish()
    for p, g in zip(params, caller_grads):
        p.grad = g
    del args
    return BlockTrace(
        tensors=trace.tensors,
        forward_ops=trace.forward_ops,
        total_ops=trace.total_ops,
        source={
            "module": type(block).__name__,
            "inputs": [list(a.shape) for a in args_in if isinstance(a, torch.Tensor)],
            "dtypes": sorted({str(a.dtype) for a in args_in if isinstance(a, torch.Tensor)}),
            "torch": torch.__version__,
        },
    )


@dataclass
class _Live:
    size_bytes: int
    start: int
    op: str
    ref: Any  # weakref.ref to the storage; its callback records the free
    end: int | None = None
    is_output: bool = False


class _Recorder:
    """Allocation/free events of storages, in op-index units (see the module docstring)."""

    def __init__(self, preexisting: set[int]) -> None:
        self.preexisting = preexisting
        self.n_ops = 0
        self.forward_ops: int | None = None
        self.live: dict[int, _Live] = {}  # storage data_ptr -> record, while the storage is alive
        self.dead: list[_Live] = []
        self.paused_depth = 0
        self.active = True

    def mode(self) -> Any:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        rec = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                if rec.paused_depth:
                    return func(*args, **(kwargs or {}))
                index = rec.n_ops
                rec.n_ops += 1
                out = func(*args, **(kwargs or {}))
                import torch

                for t in tree_leaves(out):
                    if not isinstance(t, torch.Tensor):
                        continue
                    storage = t.untyped_storage()
                    key = storage.data_ptr()
                    nbytes = storage.nbytes()
                    if nbytes == 0 or key in rec.live or key in rec.preexisting:
                        continue  # a view, an in-place result or a storage from before the trace
                    record = _Live(size_bytes=nbytes, start=index, op=str(func), ref=None)
                    # ordering: torch keeps one Python object per live storage (PyObject
                    # preservation), so this weakref dies exactly when the storage is freed,
                    # before the allocator can hand its address to a new storage.
                    record.ref = weakref.ref(storage, rec._freed_callback(key, record))
                    rec.live[key] = record
                return out

        return _Mode()

    def _freed_callback(self, key: int, record: _Live) -> Any:
        def freed(_ref: Any) -> None:
            if not self.active:
                return
            record.end = self.n_ops
            if self.live.get(key) is record:
                del self.live[key]
            self.dead.append(record)

        return freed

    def paused(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def _paused() -> Any:
            self.paused_depth += 1
            try:
                yield
            finally:
                self.paused_depth -= 1

        return _paused()

    def mark_outputs(self, tensors: Sequence[Any]) -> None:
        for t in tensors:
            rec = self.live.get(t.untyped_storage().data_ptr())
            if rec is not None:
                rec.is_output = True

    def begin_backward(self) -> None:
        self.forward_ops = self.n_ops

    def finish(self) -> BlockTrace:
        import gc

        # young reference cycles would otherwise delay frees past the trace (a full collection
        # costs ~0.3 s in a process that imported transformers; autograd graphs hold no old cycles)
        gc.collect(0)
        self.active = False
        total = self.n_ops
        forward_ops = self.forward_ops if self.forward_ops is not None else total
        records = [*self.dead, *self.live.values()]
        lives = []
        for r in records:
            end = total if r.end is None else r.end
            end = max(end, r.start + 1)  # freed before the next op: alive for its own op only
            if r.start < forward_ops:
                if end <= forward_ops:
                    role: TensorRole = "temporary"
                else:
                    role = "output" if r.is_output else "saved"
            else:
                role = "gradient" if r.end is None else "temporary"
            lives.append(TensorLife(size_bytes=r.size_bytes, start=r.start, end=end, op=r.op, role=role))
        lives.sort(key=lambda t: (t.start, t.end, t.size_bytes))
        return BlockTrace(tensors=tuple(lives), forward_ops=forward_ops, total_ops=total)


# ---- JSON on disk ---------------------------------------------------------------------------------


def save_trace(trace: BlockTrace, path: str | os.PathLike[str]) -> None:
    atomic_write_text(path, json.dumps(to_plain(trace), indent=1) + "\n")


def load_trace(path: str | os.PathLike[str]) -> BlockTrace:
    """A BlockTrace from JSON; errors name the file and the dotted field."""
    from planner.schema import load_mapping

    p = os.fspath(path)
    try:
        data = load_mapping(p)
        version = data.get("schema_version")
        if not isinstance(version, str) or version.split(".")[0] != TRACE_SCHEMA_VERSION.split(".")[0]:
            raise SpecError(
                f"unsupported trace schema {version!r} (reads {TRACE_SCHEMA_VERSION})", field="schema_version"
            )
        return build(BlockTrace, data, source=p)
    except SpecError as e:
        raise TraceError(e.message, field=e.field, source=e.source or p, line=e.line) from None
