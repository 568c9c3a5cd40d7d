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
so `memtier plan` stays torch-free. `block_lifetimes(model, workload, ...)` is the
torch-free counterpart `memtier plan` uses: the same instance derived from the
ModelSpec's shapes by replaying the block's op sequence (HF's Llama / GPT-2 decoder
layers) and its autograd backward on paper (see "analytic lifetimes" below).
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

    from planner.model import ModelSpec
    from planner.workload import Workload

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


# ---- analytic lifetimes (no torch) ----------------------------------------------------------------

FP32_BYTES = 4


@dataclass(frozen=True)
class _Node:
    """One forward op of the block on paper: what it allocates, reads and saves for backward."""

    op: str
    out_bytes: int
    inputs: tuple[int, ...]  # tensor ids read (all require grad); BLOCK_INPUT is the block's input
    saves: tuple[int, ...] = ()  # tensor ids autograd keeps for this op's backward
    saves_out: bool = False  # the op's own output is saved too (rsqrt, softmax, attention output)
    extra_bytes: int = 0  # a second output that is only saved (flash attention's log-sum-exp)
    weight_grad_bytes: int = 0  # the parameter gradient this op's backward allocates


_BLOCK_INPUT = -1  # the block's input hidden states: allocated before the block, not in its arena


class _Tape:
    """Forward ops in order; `replay` derives forward + backward lifetimes from them."""

    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.sizes: dict[int, int] = {}
        self.extra_of: dict[int, int] = {}  # node output id -> id of its extra output

    def op(
        self,
        op: str,
        out_bytes: int,
        *inputs: int,
        saves: tuple[int, ...] = (),
        saves_out: bool = False,
        extra_bytes: int = 0,
        weight_grad_bytes: int = 0,
    ) -> int:
        node_id = len(self.nodes)
        self.nodes.append(
            _Node(op, int(out_bytes), inputs, saves, saves_out, int(extra_bytes), int(weight_grad_bytes))
        )
        self.sizes[node_id] = int(out_bytes)
        return node_id

    def replay(self, input_bytes: int) -> BlockTrace:
        """Lifetimes in op-index units, as `trace_block_full` records them (same roles).

        Forward: op i allocates its output (and extra output) and reads its inputs. Backward,
        in reverse: each op reads the gradient of its output and what it saved, allocates one
        gradient per input (a second gradient reaching the same tensor is summed by an add, as
        autograd accumulates fan-out) and its parameter's gradient. A tensor dies after its
        last read; gradients of parameters and of the block's input live to the end.
        """
        start: dict[object, int] = {}
        last: dict[object, int] = {}
        size: dict[object, int] = {}
        name: dict[object, str] = {}
        index = 0

        def alloc(key: object, nbytes: int, op: str) -> None:
            start[key], last[key], size[key], name[key] = index, index, nbytes, op

        def use(key: object) -> None:
            if key in start:
                last[key] = max(last[key], index)

        for k, node in enumerate(self.nodes):
            for i in node.inputs:
                use(i)
            alloc(k, node.out_bytes, node.op)
            if node.extra_bytes:
                alloc(("extra", k), node.extra_bytes, node.op)
            index += 1
        forward_ops = index
        output = len(self.nodes) - 1
        keep_to_end: set[object] = {output}
        grad: dict[int, object] = {output: "seed"}  # the seed gradient exists before the trace
        for k in reversed(range(len(self.nodes))):
            node = self.nodes[k]
            g = grad.pop(k, None)
            if g is None:
                continue  # nothing flows back through this op
            use(g)
            for s in node.saves:
                use(s)
            if node.saves_out:
                use(k)
            if node.extra_bytes:
                use(("extra", k))
            for i in dict.fromkeys(node.inputs):
                new = ("grad", k, i)
                alloc(new, self.sizes.get(i, input_bytes), f"{node.op}_backward")
                use(g)
                index += 1
                if i in grad:  # fan-out: autograd sums the contributions
                    acc = ("sum", k, i)
                    use(grad[i])
                    use(new)
                    alloc(acc, self.sizes.get(i, input_bytes), "add")
                    index += 1
                    grad[i] = acc
                else:
                    grad[i] = new
            if node.weight_grad_bytes:
                weight_grad = ("weight_grad", k)
                alloc(weight_grad, node.weight_grad_bytes, f"{node.op}_backward")
                keep_to_end.add(weight_grad)
                use(g)
                index += 1
        total = max(index, forward_ops + 1)
        if _BLOCK_INPUT in grad:
            keep_to_end.add(grad[_BLOCK_INPUT])
        lives = []
        for key, s0 in start.items():
            end = total if key in keep_to_end else last[key] + 1
            if size[key] <= 0:
                continue
            if s0 < forward_ops:
                role: TensorRole = (
                    "temporary" if end <= forward_ops else ("output" if key == output else "saved")
                )
            else:
                role = "gradient" if key in keep_to_end else "temporary"
            lives.append(TensorLife(size_bytes=size[key], start=s0, end=end, op=name[key], role=role))
        lives.sort(key=lambda t: (t.start, t.end, t.size_bytes))
        return BlockTrace(tensors=tuple(lives), forward_ops=forward_ops, total_ops=total)


def block_lifetimes(
    model: ModelSpec,
    workload: Workload,
    *,
    micro_batch: int,
    tp: int = 1,
    sp: bool = False,
    cp: int = 1,
) -> BlockTrace:
    """The tensors one block allocates in forward + backward, from the ModelSpec's shapes alone.

    The op sequence is HF transformers' decoder layer for the family (Llama/Mistral/Qwen2:
    RMSNorm with an fp32 upcast in mixed precision, q/k/v projections, rotary, attention,
    SwiGLU; GPT-2/GPT/NeoX: LayerNorm, fused qkv, attention, GELU MLP, GPT-2's tanh GELU
    written out, NeoX's parallel residual), replayed with its autograd backward (`_Tape`).
    Attention is SDPA's flash kernel (saves q, k, v, its output and the log-sum-exp) with
    `workload.flash_attention`, else the eager path (scores, softmax, as
    `transformers`' eager_attention_forward). Per device: tokens are micro_batch * seq / cp,
    head/ffn widths divide by tp, norm and residual tensors by tp too with sequence
    parallelism (the all-gather before the projections is not modelled). For the stored
    trace's configuration (fp32, eager Llama) the saved bytes equal the traced ones exactly
    (tests/planner/test_plan_buffers.py).
    """
    for name, value in (("micro_batch", micro_batch), ("tp", tp), ("cp", cp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TraceError(f"must be an integer >= 1, got {value!r}", field=name)
    ops = _LayerOps(model, workload, micro_batch=micro_batch, tp=tp, sp=sp, cp=cp)
    from planner.model import LLAMA_LIKE

    # (the newer Llama-like families, experts included, replay Llama's tape: their extra norms and
    # routed copies are not in it)
    if model.family in LLAMA_LIKE:
        _llama_layer(ops, model)
    else:
        _gpt_layer(ops, model)
    trace = ops.tape.replay(input_bytes=ops.rows * ops.h * ops.b)
    return BlockTrace(
        tensors=trace.tensors,
        forward_ops=trace.forward_ops,
        total_ops=trace.total_ops,
        source={
            "analytic": model.family,
            "model": model.name,
            "micro_batch": micro_batch,
            "seq_len": workload.seq_len,
            "dtype": workload.dtype,
            "flash_attention": workload.flash_attention,
            "tp": tp,
            "sp": sp,
            "cp": cp,
        },
    )


class _LayerOps:
    """The building blocks of a decoder layer, recorded on a `_Tape` with one device's shapes."""

    def __init__(
        self, model: ModelSpec, workload: Workload, *, micro_batch: int, tp: int, sp: bool, cp: int
    ) -> None:
        self.tape = _Tape()
        self.b = workload.dtype_bytes  # bytes per element of the model dtype
        self.tokens = micro_batch * workload.seq_len // cp  # query tokens on this device
        # tokens of the norm / residual tensors (split across tp with sequence parallelism)
        self.rows = self.tokens // tp if sp and tp > 1 else self.tokens
        self.h = model.hidden_size  # hidden width
        self.q, self.kv = model.q_size // tp, model.kv_size // tp  # query / key-value widths on this device
        # MLP width and attention heads on this device
        self.f, self.heads = model.ffn_hidden_size // tp, max(1, model.num_heads // tp)
        self.seq_len = workload.seq_len  # keys every local query attends to
        self.flash_attention = workload.flash_attention  # SDPA's flash kernel, else the eager path

    def rms_norm(self, inp: int) -> int:
        tape, rows, h, b = self.tape, self.rows, self.h, self.b
        # HF LlamaRMSNorm: x.to(fp32); x * rsqrt(mean(x^2) + eps); weight * x.to(dtype)
        up = tape.op("_to_copy", rows * h * FP32_BYTES, inp) if b != FP32_BYTES else inp
        sq = tape.op("pow", rows * h * FP32_BYTES, up, saves=(up,))
        mean = tape.op("mean", rows * FP32_BYTES, sq)
        eps = tape.op("add", rows * FP32_BYTES, mean)
        rs = tape.op("rsqrt", rows * FP32_BYTES, eps, saves_out=True)
        n32 = tape.op("mul", rows * h * FP32_BYTES, up, rs, saves=(up, rs))
        n = tape.op("_to_copy", rows * h * b, n32) if b != FP32_BYTES else n32
        return tape.op("mul", rows * h * b, n, saves=(n,), weight_grad_bytes=h * b)

    def layer_norm(self, inp: int) -> int:
        # aten.native_layer_norm: saves its input, mean and rstd (fp32, one per row)
        return self.tape.op(
            "native_layer_norm",
            self.rows * self.h * self.b,
            inp,
            saves=(inp,),
            extra_bytes=2 * self.rows * FP32_BYTES,
            weight_grad_bytes=2 * self.h * self.b,
        )

    def linear(self, inp: int, d_in: int, d_out: int, out_rows: int, bias: bool) -> int:
        return self.tape.op(
            "addmm" if bias else "mm",
            out_rows * d_out * self.b,
            inp,
            saves=(inp,),
            weight_grad_bytes=(d_in * d_out + (d_out if bias else 0)) * self.b,
        )

    def rotary(self, t: int, width: int) -> int:
        tape, tokens, b = self.tape, self.tokens, self.b
        # HF apply_rotary_pos_emb: t * cos + rotate_half(t) * sin (cos, sin: no grad, not saved)
        c = tape.op("mul", tokens * width * b, t)
        neg = tape.op("neg", tokens * width // 2 * b, t)
        rot = tape.op("cat", tokens * width * b, neg)
        s = tape.op("mul", tokens * width * b, rot)
        return tape.op("add", tokens * width * b, c, s)

    def attention(self, qt: int, kt: int, vt: int) -> int:
        tape, tokens, q, b = self.tape, self.tokens, self.q, self.b
        if self.flash_attention:
            # SDPA flash: saves q, k, v, its output and the log-sum-exp (fp32, per head and token)
            return tape.op(
                "_scaled_dot_product_flash_attention",
                tokens * q * b,
                qt,
                kt,
                vt,
                saves=tuple(dict.fromkeys((qt, kt, vt))),
                saves_out=True,
                extra_bytes=tokens * self.heads * FP32_BYTES,
            )
        # eager: contiguous (k, v repeated to every query head) copies, scores, softmax, context
        qc = tape.op("clone", tokens * q * b, qt)
        kc = tape.op("clone", tokens * q * b, kt)
        vc = tape.op("clone", tokens * q * b, vt)
        scores_bytes = tokens * self.heads * self.seq_len * b  # local queries x all keys
        sc = tape.op("bmm", scores_bytes, qc, kc, saves=(qc, kc))
        scaled = tape.op("mul", scores_bytes, sc)
        masked = tape.op("add", scores_bytes, scaled)
        probs = tape.op("_softmax", scores_bytes, masked, saves_out=True)
        ctx = tape.op("bmm", tokens * q * b, probs, vc, saves=(probs, vc))
        return tape.op("clone", tokens * q * b, ctx)


def _llama_layer(ops: _LayerOps, model: ModelSpec) -> None:
    """HF's Llama / Mistral / Qwen2 decoder layer: RMSNorm, q/k/v, rotary, attention, SwiGLU."""
    tape, b, h, q, kv, f = ops.tape, ops.b, ops.h, ops.q, ops.kv, ops.f
    tokens, rows, x = ops.tokens, ops.rows, _BLOCK_INPUT
    y1 = ops.rms_norm(x)
    qt = ops.linear(y1, h, q, tokens, model.qkv_bias)
    kt = ops.linear(y1, h, kv, tokens, model.qkv_bias)
    vt = ops.linear(y1, h, kv, tokens, model.qkv_bias)
    ctx = ops.attention(ops.rotary(qt, q), ops.rotary(kt, kv), vt)
    o = ops.linear(ctx, q, h, rows, model.attn_out_bias)
    h1 = tape.op("add", rows * h * b, x, o)
    y2 = ops.rms_norm(h1)
    gate = ops.linear(y2, h, f, tokens, model.mlp_bias)
    act = tape.op("silu", tokens * f * b, gate, saves=(gate,))
    up = ops.linear(y2, h, f, tokens, model.mlp_bias)
    prod = tape.op("mul", tokens * f * b, act, up, saves=(act, up))
    down = ops.linear(prod, f, h, rows, model.mlp_bias)
    tape.op("add", rows * h * b, h1, down)


def _gpt_layer(ops: _LayerOps, model: ModelSpec) -> None:
    """HF's GPT-2 / GPT / NeoX block: LayerNorm, fused qkv, attention, GELU MLP (NeoX: parallel residual)."""
    tape, b, h, q, kv, f = ops.tape, ops.b, ops.h, ops.q, ops.kv, ops.f
    tokens, rows, x = ops.tokens, ops.rows, _BLOCK_INPUT
    y1 = ops.layer_norm(x)
    qkv = ops.linear(y1, h, q + 2 * kv, tokens, model.qkv_bias)
    ctx = ops.attention(qkv, qkv, qkv)  # q, k, v are views of one fused projection
    o = ops.linear(ctx, q, h, rows, model.attn_out_bias)
    h1 = tape.op("add", rows * h * b, x, o)
    y2 = ops.layer_norm(x if model.family == "gpt_neox" else h1)  # NeoX: parallel residual
    fc = ops.linear(y2, h, f, tokens, model.mlp_bias)
    if model.family == "gpt2":
        # gelu_new: 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), op by op
        cube = tape.op("pow", tokens * f * b, fc, saves=(fc,))
        scaled = tape.op("mul", tokens * f * b, cube)
        inner = tape.op("add", tokens * f * b, fc, scaled)
        arg = tape.op("mul", tokens * f * b, inner)
        th = tape.op("tanh", tokens * f * b, arg, saves_out=True)
        one = tape.op("add", tokens * f * b, th)
        half = tape.op("mul", tokens * f * b, fc)
        act = tape.op("mul", tokens * f * b, half, one, saves=(half, one))
    else:
        act = tape.op("gelu", tokens * f * b, fc, saves=(fc,))
    down = ops.linear(act, f, h, rows, model.mlp_bias)
    tape.op("add", rows * h * b, h1, down)


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
