"""Activation elements per token of one transformer block, family by family (the memory model's input).

What autograd saves for backward in one block, counted from the implementation the model runs
(transformers' modules for the HF families, enumerated op by op and checked against the meta-device trace
of `planner.trace`), or for Megatron-style GPTs from Korthikanti et al. 2022, eq. 2. `planner.memory`
turns these coefficients into bytes per micro-batch under tensor, sequence and context parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.model import LLAMA_LIKE, ModelSpec
from planner.optimizer_state import FP32
from planner.workload import Workload


@dataclass(frozen=True)
class TokenCoefficients:
    """Elements saved for backward per token of one block, split by how they shard.

    `replicated` stays whole under tensor parallelism (divided by tp only with sequence
    parallelism), `sharded` divides by tp, `per_sequence` is per token times the sequence
    length (the s x s attention matrices of an unfused kernel), `fixed` is per block
    (not per token: rotary tables).
    """

    replicated: float
    sharded: float
    per_sequence: float = 0.0
    fixed: float = 0.0
    mask_bytes_per_token: float = 0.0  # dropout masks (1 byte per element)


def token_coefficients(model: ModelSpec, workload: Workload, *, dropout: bool = False) -> TokenCoefficients:
    """Saved elements per token of one block, for the implementation this family runs.

    Enumerated from transformers' modules (autograd's saved tensors, unique storages; checked against the
    meta-device trace, `planner.trace`, in tests/planner/test_families.py):
      Llama-like families (`planner.model.LLAMA_LIKE`: rotary, RMSNorm, SDPA, gated MLP), by feature —
        norms: each RMSNorm its input and normalised tensor and the inverse RMS (2h + 1), plus the inputs
        of the attention and MLP projections (2h): Llama 6h + 2, Gemma's four norms 10h + 4;
        attention (SDPA flash): q, k, v, its output and the log-sum-exp, 2q + 2kv + a; eager (no flash, or
        Gemma 2's tanh soft-capping, which SDPA cannot run) keeps the fp32 softmax (a s; with a 16-bit dtype
        also its cast copy), the tanh of soft-capping (a s) and GQA's repeated k and v (q each); a fused q/k/v projection (Phi-3) keeps its output as v's storage
        (+q measured); QK-norm per head (Qwen3, Gemma 3) 2q + 2kv + a + kv_heads, over all heads (OLMo 2)
        2q + 2kv + 2; MLP 4f (gate, up, activation, product), with experts see `_moe_mlp_elems`;
        rotary cos/sin 2*s*d_head per block;
      falcon (LayerNorm h + 2 each, fused qkv, GELU 2f, the float mask s per token);
      gpt2 (LayerNorm, fused qkv, GELU-tanh): 7h + 4 + (q + 2kv) + 5f + a, or with attention
        dropout (math kernel) 3*a*s instead of a;
      gpt_neox (parallel residual, partial rotary): 5h + 4 + (q + 2kv) + 2f + a;
      gpt (Megatron, Korthikanti et al. 2022 eq. 2 in 16-bit): 34 s b h -> 10h replicated
        (LayerNorms, inputs, dropout masks) + 24h sharded, + 5 a s with unfused attention.
    """
    h, q, kv, f, a = model.hidden_size, model.q_size, model.kv_size, model.ffn_hidden_size, model.num_heads
    flash = workload.flash_attention and not dropout
    if model.family in LLAMA_LIKE:
        return _llama_like_coefficients(model, workload, flash=flash and not model.attn_logit_softcap)
    if model.family == "falcon":
        return _falcon_coefficients(model)
    if model.family == "gpt2":
        return TokenCoefficients(
            replicated=7 * h + 4,
            sharded=q + 2 * kv + 5 * f + (a if flash else 0),
            per_sequence=0 if flash else 3 * a,
        )
    if model.family == "gpt_neox":
        rot = model.head_dim // 4
        return TokenCoefficients(replicated=5 * h + 4, sharded=q + 2 * kv + 2 * f + a, fixed=2 * rot)
    # Megatron GPT, Korthikanti et al. 2022 eq. 2 and Sec. 4.2: 34sbh bytes (16-bit, 1-byte
    # dropout masks included) of which 10sbh stay whole under tp and 24sbh shard; in 2-byte
    # elements per token: 5h + 12h. The unfused attention adds 5as^2b bytes = 2.5as elements.
    return TokenCoefficients(replicated=5 * h, sharded=12 * h, per_sequence=0 if flash else 2.5 * a)


def _expanded_kv(model: ModelSpec) -> int:
    """Width of k (or v) as the attention kernel keeps it: grouped heads repeated to every query head
    (eager attention, Falcon), a single head broadcast without a copy."""
    grouped = 1 < model.num_kv_heads < model.num_heads
    return model.q_size if grouped else model.kv_size


def _llama_like_coefficients(model: ModelSpec, workload: Workload, *, flash: bool) -> TokenCoefficients:
    h, q, kv, a = model.hidden_size, model.q_size, model.kv_size, model.num_heads
    # norms (2h + 1 each) and the inputs of the attention and MLP projections
    replicated = model.norms_per_block * (2 * h + 1) + 2 * h
    if flash:  # q, k, v, output, log-sum-exp
        attention = 2 * q + 2 * kv + a
    else:  # q, the repeated k and v, the output; the softmax (and the tanh of soft-capping) per key
        attention = 2 * q + 2 * _expanded_kv(model)
    if model.fused_qkv:
        attention += q
    if model.qk_norm == "head":
        attention += 2 * q + 2 * kv + a + model.num_kv_heads
    elif model.qk_norm == "full":
        attention += 2 * q + 2 * kv + 2
    # eager: the softmax, in fp32 (and its copy cast back to a 16-bit dtype), and the tanh of soft-capping
    b = workload.dtype_bytes
    softmax = a * FP32 / b + (a if b != FP32 else 0)
    per_seq = 0.0 if flash else softmax + (a if model.attn_logit_softcap else 0)
    return TokenCoefficients(
        replicated=replicated,
        sharded=attention + _moe_mlp_elems(model, workload),
        per_sequence=per_seq,
        fixed=2 * model.head_dim,
    )


def _moe_mlp_elems(model: ModelSpec, workload: Workload) -> float:
    """Saved elements per token of the MLP: 4f dense (gate, up, activation, product). With experts
    (transformers' grouped experts: tokens sorted by expert, one grouped matmul per projection), per routed
    (token, expert) pair its gathered input and weighted output (2h), the expert's 4f and its routing weight
    and sort index; per token the router's softmax (fp32, E) and top-k indices (int64); a shared expert
    (Qwen2-MoE) as a dense gated MLP plus its output and sigmoid gate (h + 1)."""
    f = model.ffn_hidden_size
    if not model.is_moe:
        return 4 * f
    b = workload.dtype_bytes
    k, e = model.experts_per_token, model.num_experts
    routed = k * (2 * model.hidden_size + 4 * f + 1 + 8 / b)
    router = e * 4 / b + k * 8 / b
    fs = model.shared_expert_ffn_size
    shared = (4 * fs + model.hidden_size + 1) if fs else 0
    return routed + router + shared


def _falcon_coefficients(model: ModelSpec) -> TokenCoefficients:
    """Falcon: LayerNorms (input, mean, rstd: h + 2) and the projections' inputs (one shared in the parallel
    block behind one LayerNorm), fused qkv, SDPA with a float mask (one element per key), GELU MLP (2f).
    The new decoder architecture (two LayerNorms in parallel) keeps one q-wide tensor less."""
    h, q, a, f = model.hidden_size, model.q_size, model.num_heads, model.ffn_hidden_size
    new_arch = model.parallel_block and model.norms_per_block == 2
    replicated = model.norms_per_block * (h + 2) + (h if model.norms_per_block == 1 else 2 * h)
    attention = 2 * q + 2 * _expanded_kv(model) + a - (q if new_arch else 0)
    return TokenCoefficients(
        replicated=replicated, sharded=attention + 2 * f, per_sequence=1, fixed=2 * model.head_dim
    )
