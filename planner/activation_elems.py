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


def token_coefficients(
    model: ModelSpec, workload: Workload, *, cpu_kernels: bool = False
) -> TokenCoefficients:
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
      gpt2 (LayerNorm, fused qkv, GELU-tanh): 7h + 4 + (q + 2kv) + 5f + a, or with the math kernel the
        softmax a*s instead of a;
      gpt_neox (parallel residual, partial rotary): 5h + 4 + (q + 2kv) + 2f + a;
      dropout, any HF family: see `_with_dropout` (`cpu_kernels`: the ops take torch's CPU paths);
      gpt (Megatron, Korthikanti et al. 2022 eq. 2 in 16-bit): 34 s b h -> 10h replicated
        (LayerNorms, inputs, dropout masks) + 24h sharded, + 5 a s with unfused attention.
    """
    h, q, kv, f, a = model.hidden_size, model.q_size, model.kv_size, model.ffn_hidden_size, model.num_heads
    flash = fused_attention(model, workload, cpu_kernels=cpu_kernels)
    if model.family in LLAMA_LIKE:
        c = _llama_like_coefficients(model, workload, flash=flash)
    elif model.family == "falcon":
        c = _falcon_coefficients(model)
    elif model.family == "gpt2":
        c = TokenCoefficients(
            replicated=7 * h + 4,
            sharded=q + 2 * kv + 5 * f + (a if flash else 0),
            per_sequence=0 if flash else a,
        )
    elif model.family == "gpt_neox":
        rot = model.head_dim // 4
        c = TokenCoefficients(
            replicated=5 * h + 4,
            sharded=q + 2 * kv + 2 * f + (a if flash else 0),
            per_sequence=0 if flash else a,
            fixed=2 * rot,
        )
    else:
        # Megatron GPT, Korthikanti et al. 2022 eq. 2 and Sec. 4.2: 34sbh bytes (16-bit, 1-byte
        # dropout masks included) of which 10sbh stay whole under tp and 24sbh shard; in 2-byte
        # elements per token: 5h + 12h. The unfused attention adds 5as^2b bytes = 2.5as elements.
        return TokenCoefficients(replicated=5 * h, sharded=12 * h, per_sequence=0 if flash else 2.5 * a)
    return _with_dropout(model, workload, c, flash=flash, cpu_kernels=cpu_kernels)


def fused_attention(model: ModelSpec, workload: Workload, *, cpu_kernels: bool = False) -> bool:
    """Whether the attention runs a fused kernel that keeps nothing s x s. Not with Gemma 2's tanh
    soft-capping (eager), nor SDPA with attention dropout on a CPU: CUDA's flash and memory-efficient kernels
    draw the mask inside, torch's CPU flash kernel takes no dropout and the math kernel runs."""
    if model.family in LLAMA_LIKE and model.attn_logit_softcap:
        return False
    return workload.flash_attention and not (model.attn_dropout and cpu_kernels)


def saved_after_attention_elems(model: ModelSpec, workload: Workload) -> float:
    """Saved elements per token of what a block runs after its attention core: released by the time the
    core's backward runs. Llama-like: the MLP, the later norms and the MLP's input, the output projection's
    input (q); GPT-2: the MLP (5f), its LayerNorm and input, the output projection's input; the parallel
    blocks (GPT-NeoX, Falcon) only their MLP."""
    h, q, f = model.hidden_size, model.q_size, model.ffn_hidden_size
    if model.family in LLAMA_LIKE:
        return _moe_mlp_elems(model, workload) + (model.norms_per_block - 1) * (2 * h + 1) + h + q
    return {"gpt2": 5 * f + 2 * h + 2 + q, "gpt_neox": 2 * f, "falcon": 2 * f}.get(model.family, 0.0)


def attention_backward_per_sequence(
    model: ModelSpec, workload: Workload, *, cpu_kernels: bool = False
) -> float:
    """s x s elements per token per key an unfused attention's backward holds beside the block's saved tensors
    (0 with a fused kernel): the softmax's incoming gradient and the one its backward makes (2a; in fp32 where
    the softmax runs in fp32, Llama-like eager). With attention dropout one of them takes the place of the
    dropped probabilities, released once the matmul's backward ran (a). MemTracker, CPU fp32, 2 blocks,
    b4 s512, full recompute: Gemma 2 (eager, soft-capped) peaks 16 MiB = one (4, 4, 512, 512) fp32 tensor
    above the MLP phase; GPT-2 with its 0.1 dropout peaks in the MLP phase."""
    if fused_attention(model, workload, cpu_kernels=cpu_kernels):
        return 0.0
    a = model.num_heads * (FP32 / workload.dtype_bytes if model.family in LLAMA_LIKE else 1)
    return a if model.attn_dropout else 2 * a


def hidden_dropout_sites(model: ModelSpec) -> int:
    """Dropouts on a block's sublayer outputs: attention's and the MLP's (GPT-2's resid_pdrop, GPT-NeoX's
    hidden_dropout, Phi-3's resid_pdrop), one on the summed output of Falcon's parallel block."""
    if not model.hidden_dropout:
        return 0
    return 1 if model.family == "falcon" and model.parallel_block else 2


def dropout_mask_bytes(workload: Workload, *, cpu_kernels: bool) -> int:
    """Bytes per element of a kept dropout mask: CUDA's fused native_dropout keeps booleans; on a CPU
    torch's dropout multiplies by a noise tensor of the input's dtype and keeps that (aten `_dropout`)."""
    return workload.dtype_bytes if cpu_kernels else 1


def _with_dropout(
    model: ModelSpec, workload: Workload, c: TokenCoefficients, *, flash: bool, cpu_kernels: bool
) -> TokenCoefficients:
    """`c` plus what dropout keeps: each sublayer-output dropout its mask (h per token), and with attention
    dropout outside a fused kernel the mask and the dropped probabilities beside the softmax (a s each).
    Traced on GPT-2 (CPU, fp32, 0.1 everywhere): 7h + 4 + 2h + (q + 2kv) + 5f + 3 a s per token."""
    h, a, b = model.hidden_size, model.num_heads, workload.dtype_bytes
    mask = dropout_mask_bytes(workload, cpu_kernels=cpu_kernels)
    sites = hidden_dropout_sites(model)
    replicated, mask_bytes = c.replicated, c.mask_bytes_per_token
    if mask == b:  # (kept in the working dtype: counted as elements)
        replicated += sites * h
    else:
        mask_bytes += sites * h * mask
    per_sequence = c.per_sequence
    if model.attn_dropout and not flash:
        per_sequence += a * mask / b + a
        if model.family == "falcon":  # (its fused SDPA keeps no softmax; the math kernel does)
            per_sequence += a
    return TokenCoefficients(
        replicated=replicated,
        sharded=c.sharded,
        per_sequence=per_sequence,
        fixed=c.fixed,
        mask_bytes_per_token=mask_bytes,
    )


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


def shared_block_inputs_bytes(model: ModelSpec, workload: Workload, *, micro_batch: int, cp: int = 1) -> int:
    """What every block gets besides its hidden states, made once per micro-batch: the rotary cos/sin tables
    (1, s, d_head) and, for eager attention, the (b, 1, s, s) additive masks (transformers' masking_utils.
    eager_mask; SDPA gets none: is_causal), one per kind of layer (Gemma 2: full and sliding), in the working
    dtype. Blocks do not save them; recomputed blocks keep them as forward inputs until their backward
    (MemTracker, CPU fp32, Gemma 2 b2 s256: two masks of 0.5 MiB; Llama s512: 128 KiB of tables)."""
    seq = workload.seq_len / cp
    rope = 2 * seq * model.head_dim if model.position == "rope" else 0
    masks = 0.0
    if model.family in LLAMA_LIKE and not (workload.flash_attention and not model.attn_logit_softcap):
        masks = (
            (2 if 0 < model.sliding_layers < model.num_layers else 1) * micro_batch * seq * workload.seq_len
        )
    return int((rope + masks) * workload.dtype_bytes)


def embedding_dropout_bytes(
    model: ModelSpec, workload: Workload, *, micro_batch: int, cp: int = 1, cpu_kernels: bool = False
) -> int:
    """The embedding dropout's mask (GPT-2's embd_pdrop, GPT-NeoX's hidden_dropout), per micro-batch."""
    if not model.embd_dropout:
        return 0
    mask = dropout_mask_bytes(workload, cpu_kernels=cpu_kernels)
    return int(micro_batch * workload.seq_len / cp * model.hidden_size * mask)


def final_bytes(model: ModelSpec, workload: Workload, *, micro_batch: int, cp: int = 1) -> int:
    """Saved by the final norm (input, normalised, output) per micro-batch."""
    tokens = micro_batch * workload.seq_len / cp
    # (frozen under LoRA: the normalised tensor is not kept for the weight's gradient)
    return int(tokens * (2 if workload.lora else 3) * model.hidden_size * workload.dtype_bytes)
