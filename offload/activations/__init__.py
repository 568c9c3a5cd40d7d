"""Activation swap and recompute, per transformer block, on an unmodified model.

A plan gives every transformer block an `ActivationPolicy`. The runtime realises it as follows (the
planner's memory model is written to these semantics):

recompute (`recompute_fraction` == 1)
    The block's forward runs under a non-reentrant `torch.utils.checkpoint` with the RNG state preserved
    (dropout masks are redrawn identically in backward). Only its inputs stay on the device. A fractional
    `recompute_fraction` is rejected (`PolicyError` naming the layer): recompute is realised per block.
swap (`swap_fraction` = s > 0, the rest kept)
    The block's forward runs inside `torch.autograd.graph.saved_tensors_hooks`. Every saved activation
    with a token dimension has its first `swap_tokens(s, n)` = floor(s*n + 0.5) of its n tokens copied to
    the tier and the rest kept as a fresh compact copy (a kept slice that is a view would pin the whole
    original storage and save nothing). The token dimension is a dim whose size equals the block's
    sequence length (read from the block input; the dim after batch is preferred), or else one of size
    batch*seq (the (batch*seq, hidden) views a Linear saves; their leading rows are swapped). A saved
    tensor without one (or whose strides overlap, e.g. an expanded tensor) is swapped whole if s >= 0.5
    and kept otherwise. In backward, unpacking any tensor of block l fetches all of block l's swapped
    tensors and prefetches those of the swapped block before it (one layer ahead).
keep
    Nothing is installed.

Parameters, buffers, casts/views of parameters (autocast's bf16 weight copy) and leaf tensors that
require grad are never swapped (a Linear saves its weight, sometimes as a transposed view: the storage is
compared, not the tensor). One storage saved by several ops of a block (x feeding the q, k and v
projections) is packed once and shared on unpack. Unpacked tensors have exactly the original size,
stride and dtype, and their storage offset modulo `ALIGN_BYTES` (so kernels see the same alignment and

The package, one module per concept:

- `policy`: `BlockPolicy` (the runtime form of a plan's `ActivationPolicy`), `PolicyError`, `swap_tokens`;
- `layout`: a saved tensor's layout (token dim, storage extent, alignment) and which tensors are swapped;
- `engine`: `SwapEngine`, which packs saved tensors, puts them to tier stores and fetches them back
  (its docstring states the asynchrony and ordering guarantees);
- `hooks`: `install_block_hooks`, the per-block forward wrapping (recompute, swap, KV-cache dropping);
- `compiled`: `BlockCompiler`, the same decisions on `torch.compile`d blocks (`offload.apply(compile_blocks=...)`),
  and `profile_compiled_blocks` (the saved tensors the compiled blocks keep, for the planner);
- `profile`: `profile_block(s)` and `predict_activation_peak_bytes`, for checking the planner's costs.
"""

from __future__ import annotations

from offload.activations.compiled import BlockCompiler, CompiledBlock, CompileOptions, profile_compiled_blocks
from offload.activations.engine import SwapEngine, SwapStats
from offload.activations.hooks import BlockHooks, install_block_hooks
from offload.activations.layout import ALIGN_BYTES
from offload.activations.policy import BlockPolicy, PolicyError, swap_tokens
from offload.activations.profile import (
    BlockProfile,
    predict_activation_peak_bytes,
    profile_block,
    profile_blocks,
)

__all__ = [
    "ALIGN_BYTES",
    "BlockCompiler",
    "BlockHooks",
    "BlockPolicy",
    "BlockProfile",
    "CompileOptions",
    "CompiledBlock",
    "PolicyError",
    "SwapEngine",
    "SwapStats",
    "install_block_hooks",
    "predict_activation_peak_bytes",
    "profile_block",
    "profile_blocks",
    "profile_compiled_blocks",
    "swap_tokens",
]
