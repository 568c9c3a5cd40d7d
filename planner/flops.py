"""FLOPs of a training step.

Matmul FLOPs are counted exactly per projection (2 FLOPs per multiply-add) so GQA,
gated MLPs and untied heads are right; the attention score and context matmuls
add 2 * 2 * s^2 * q_size per layer per sequence forward (causal masking is not
subtracted, as in Narayanan et al. 2021, eq. 3, whose total
96 B s l h^2 (1 + s/(6h) + V/(16 l h)) this reduces to for a GPT with ffn = 4h).
A mixture of experts counts the experts a token is routed to (top-k), the shared expert and the
router, not all experts (Fedus et al. 2022, Sec. 2: FLOPs per token follow the active parameters);
a sliding-window layer attends over min(s, window) keys (Beltagy et al. 2020, Sec. 3.1), averaged
over the layers that use the window. Backward is twice the forward (Narayanan et al. 2021, Sec. 5.1); a fully
recomputed layer runs its forward once more (HFU counts it, MFU does not:
Korthikanti et al. 2022, Appendix A).
"""

from __future__ import annotations

from planner.model import ModelSpec


def layer_forward_flops(model: ModelSpec, tokens: int, seq_len: int) -> float:
    """Forward FLOPs of one transformer block over `tokens` tokens in sequences of `seq_len`."""
    h = model.hidden_size
    proj = h * (model.q_size + 2 * model.kv_size) + model.q_size * h  # q, k, v, o
    matmul = 2.0 * tokens * (proj + mlp_matmul_params(model))
    # QK^T and attention x V: 2 matmuls of (s x d_head) by (d_head x s) per head
    attention = 2.0 * 2.0 * tokens * attended_keys(model, seq_len) * model.q_size
    return matmul + attention


def mlp_matmul_params(model: ModelSpec) -> int:
    """Weights of the MLP matmuls one token runs through: the dense MLP, or the top-k experts, the shared
    expert (and its gate) and the router (h x experts)."""
    h, n_mat = model.hidden_size, (3 if model.gated_mlp else 2)
    if not model.is_moe:
        return n_mat * h * model.ffn_hidden_size
    experts = model.experts_per_token * n_mat * h * model.ffn_hidden_size
    return experts + n_mat * h * model.shared_expert_ffn_size + model.router_params


def attended_keys(model: ModelSpec, seq_len: int) -> float:
    """Keys each query attends to, averaged over the layers: min(s, window) in the sliding-window ones."""
    if not model.sliding_window or not model.sliding_layers:
        return float(seq_len)
    windowed = model.sliding_layers * min(seq_len, model.sliding_window)
    return (windowed + (model.num_layers - model.sliding_layers) * seq_len) / model.num_layers


def head_forward_flops(model: ModelSpec, tokens: int) -> float:
    """The LM head (logits) forward: one (tokens x h) by (h x V) matmul."""
    return 2.0 * tokens * model.hidden_size * model.vocab_size


def model_flops_per_step(model: ModelSpec, tokens: int, seq_len: int) -> float:
    """Model FLOPs (forward + backward = 3x forward) of one optimizer step over `tokens` tokens."""
    fwd = model.num_layers * layer_forward_flops(model, tokens, seq_len) + head_forward_flops(model, tokens)
    return 3.0 * fwd


def hardware_flops_per_step(
    model: ModelSpec, tokens: int, seq_len: int, *, recomputed_layers: float = 0.0
) -> float:
    """Model FLOPs plus the extra forward of `recomputed_layers` (may be fractional) blocks."""
    extra = recomputed_layers * layer_forward_flops(model, tokens, seq_len)
    return model_flops_per_step(model, tokens, seq_len) + extra


def narayanan_flops_per_step(model: ModelSpec, batch: int, seq_len: int) -> float:
    """Narayanan et al. 2021, eq. 3 (no recompute term): 72 B s l h^2 (1 + s/(6h) + V/(12 l h)).

    Their eq. counts 4 passes (with recompute); without recompute it is 3/4 of it.
    Valid only for GPT-style blocks (ffn = 4h, MHA); kept to cross-check the exact count.
    """
    b, s, ell, h, v = batch, seq_len, model.num_layers, model.hidden_size, model.vocab_size
    return 72.0 * b * s * ell * h * h * (1 + s / (6 * h) + v / (12 * ell * h))
