"""Seconds of one transformer block's forward on a device: a roofline per kind of kernel.

Where the device's `roofline` is set (the GPU presets, whose `efficiency` is a GEMM efficiency), a block's
forward is costed as the kernels it runs (the roofline model, Williams et al. 2009: a kernel takes its FLOPs
at the compute rate or its bytes at the memory bandwidth):

  GEMMs       the q/k/v/o projections and the MLP: FLOPs / (peak x efficiency), compute-bound at training
              shapes (arithmetic intensity in the hundreds of FLOP/byte, above an A100's 153 = 312 TFLOP/s /
              2.04 TB/s and an H100's 295).
  attention   the score and context matmuls (`planner.flops.layer_forward_flops`, full s x s). A fused kernel
              under the causal mask skips the key blocks wholly above the diagonal: half the FLOPs it is
              counted with (Dao 2023, FlashAttention-2, Sec. 3.1.1). Its backward recomputes the scores and
              probabilities from the saved row statistics instead of reading them: 5 matmuls against the
              forward's 2, 2.5x the forward's FLOPs (Dao 2023, Sec. 4.1, which counts FLOP/s that way), so a
              fused kernel's forward + backward is 3.5x its forward where the other kernels' is 3x
              (`BlockTime.backward_extra_s`). Unfused, the two batched GEMMs run all s x s (the mask is
              applied after) and their s x s output is counted below, with the softmax.
  memory-bound operators  norms, bias + activation, residual adds, dropout masks, rotary, and without a fused
              attention the s x s scores (written by QK^T, read and written by the softmax and the dropout,
              read by the context GEMM): bytes / memory bandwidth. Per token of the forward, in elements:
                norms           2h each (read, write)                      x norms_per_block
                residual adds   3h each (read two, write one)               x 2
                activation      2f (bias + GeLU fused), 3f gated (SwiGLU: read gate and up, write)
                rotary          2(q + kv) (read, write q and k)
                dropout masks   1 byte per element of each dropped tensor (the sublayer outputs, 2h; the
                                attention probabilities, a s)
                unfused scores  a s x (1 QK^T write + 2 softmax + 2 dropout + 1 context read)
              Megatron-LM fuses bias + GeLU, bias + dropout + add and scale + mask + softmax (Shoeybi et al.
              2019; Narayanan et al. 2021, Sec. 4.2), which these counts assume. The backward moves about
              twice the forward's bytes (reads the saved input and the output gradient, writes the input
              gradient), so a forward + backward moves 3x, as it runs 3x the FLOPs.

Without `roofline` (a probed device, whose `efficiency` was fitted on whole blocks, norms and attention
included: `launch.measure.probe`), a block's forward is its FLOPs / (peak x efficiency), as before.
"""

from __future__ import annotations

from typing import NamedTuple

from planner.activation_elems import fused_attention
from planner.cluster import DeviceSpec
from planner.flops import attended_keys, layer_forward_flops
from planner.model import ModelSpec
from planner.workload import Workload


def attention_core_flops(model: ModelSpec, tokens: int, seq_len: int) -> float:
    """FLOPs of the score and context matmuls of one block's forward (`planner.flops`: full s x s)."""
    return 2.0 * 2.0 * tokens * attended_keys(model, seq_len) * model.q_size


def memory_bound_bytes(
    model: ModelSpec,
    workload: Workload,
    tokens: int,
    *,
    tp: int = 1,
    sp: bool = True,
    attention_only: bool = False,
) -> float:
    """Bytes the memory-bound operators of one block's forward move over `tokens` tokens on one of `tp`
    tensor-parallel ranks (see the module docstring). The norms, residual adds and their dropout run on
    the whole hidden state on every rank without sequence parallelism, on 1/tp of it with (Korthikanti et
    al. 2022, Sec. 4.2.2). `attention_only`: the s x s part alone (what selective recompute runs again)."""
    h, f, q, kv, a = model.hidden_size, model.ffn_hidden_size, model.q_size, model.kv_size, model.num_heads
    d = workload.dtype_bytes
    scores = 0.0
    if not fused_attention(model, workload):
        keys = attended_keys(model, workload.seq_len)
        dropout = model.attn_dropout > 0
        scores = a * keys * ((4 + (2 if dropout else 0)) * d + (1 if dropout else 0))
    if attention_only:
        return tokens * scores / tp
    replicated = (2 * model.norms_per_block + 2 * 3) * h * d + (2 * h if model.hidden_dropout > 0 else 0)
    sharded = (3 if model.gated_mlp else 2) * f * d + (2 * (q + kv) * d if model.position == "rope" else 0)
    return tokens * (replicated / (tp if sp else 1) + (sharded + scores) / tp)


class BlockTime(NamedTuple):
    """One block's modelled seconds (`block_forward_time`)."""

    forward_s: float  # its forward
    attention_s: float  # its attention core alone: what selective recompute runs again (0 without roofline)
    # what its backward takes beyond twice the forward: a fused attention kernel's backward recomputes the
    # scores, 2.5x its forward's FLOPs (Dao 2023, FlashAttention-2, Sec. 4.1); 0 without a fused kernel or
    # without `roofline` (a probed block's time has it)
    backward_extra_s: float


def block_forward_time(
    model: ModelSpec,
    device: DeviceSpec,
    workload: Workload,
    tokens: int,
    *,
    tp: int = 1,
    cp: int = 1,
    sp: bool = True,
) -> BlockTime:
    """One block's forward over `tokens` tokens split over tp x cp ranks, its attention core alone, and what
    its backward takes beyond twice the forward (`BlockTime`)."""
    # compiled blocks: the probed compiled/eager time of a reference block (`DeviceSpec.compile_factors`)
    rate = (
        device.flops(workload.dtype)
        * device.efficiency
        / device.compile_factors(workload.compile, workload.compile_memory_budget)[1]
    )
    flops = layer_forward_flops(model, tokens, workload.seq_len) / (tp * cp)
    if not device.roofline:
        return BlockTime(flops / rate, 0.0, 0.0)
    attn = attention_core_flops(model, tokens, workload.seq_len) / (tp * cp)
    fused = fused_attention(model, workload)
    # a fused causal kernel runs half the counted score/context FLOPs at its own efficiency (module docstring)
    fused_s = 0.5 * attn / _fused_attention_rate(device, workload)
    core_s = fused_s if fused else attn / rate
    bw = device.memory_bandwidth
    attn_s = (
        core_s + memory_bound_bytes(model, workload, tokens // cp, tp=tp, sp=sp, attention_only=True) / bw
    )
    rest = (flops - attn) / rate + memory_bound_bytes(model, workload, tokens // cp, tp=tp, sp=sp) / bw
    return BlockTime(rest + core_s, attn_s, (2.5 - 2.0) * fused_s if fused else 0.0)


def _fused_attention_rate(device: DeviceSpec, workload: Workload) -> float:
    # a fused attention kernel runs at its own efficiency (module docstring)
    return device.flops(workload.dtype) * (device.attention_efficiency or device.efficiency)
