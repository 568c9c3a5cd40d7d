"""Loss without logits: chunked linear cross-entropy.

The logits of a causal LM (tokens x vocabulary, upcast to fp32 for the loss) are often the largest single
buffer of a training step: 128K vocabulary x 8K tokens x 4 bytes = 4 GiB per micro-batch. Following "Cut Your
Losses in Large-Vocabulary Language Models" (Wijmans et al. 2024, arXiv:2411.09009), this module computes the
loss and its gradients from the final hidden states and the output-embedding weight without ever holding all
logits: they are formed one tile of `chunk_size` tokens (optionally x `vocab_block` vocabulary rows) at a
time, with the log-sum-exp accumulated online over vocabulary blocks (Milakov & Gimelshein 2018, "Online
normalizer calculation for softmax"). Ignored tokens (label -100) are skipped, not computed.

Two ways to get the gradients (`mode`), both exact and both holding one tile at a time:
- "recompute" (Cut Cross-Entropy's scheme): forward keeps only the per-token log-sum-exp (tokens x 4 bytes);
  backward recomputes each tile's logits to produce the hidden-state and weight gradients. Matmul work is
  8 T H V flops against the standard path's 6 (one more forward matmul).
- "precompute" (Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989): forward
  forms the gradients while each tile's logits are at hand and backward only scales them by the upstream
  gradient: 6 T H V flops, but the weight- and hidden-sized gradient buffers exist from forward on rather
  than from backward on. Needs whole vocabulary rows per tile (no `vocab_block`) and one backward per forward.

- `linear_cross_entropy(hidden, weight, labels, ...)`: the function (a `torch.autograd.Function` inside).
- `install_chunked_loss(model, chunk_size=...)`: swaps it in for the LM head + loss of an unmodified Hugging
  Face causal-LM model; returns a handle with `.remove()`.
- `logits_bytes(...)`, `standard_loss_peak_bytes(...)`, `chunked_loss_peak_bytes(...)`: the memory each path
  holds, the arithmetic the planner's memory model mirrors.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offload import hf_loss
from offload.loss_errors import ChunkedLossError, UnsupportedModelError

IGNORE_INDEX = -100
Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum")
Mode = Literal["recompute", "precompute"]
MODES: tuple[str, ...] = ("recompute", "precompute")
# Chosen by measurement (benchmarks/loss.py; benchmarks/results/loss.json): on 2 CPU threads shared with other
# jobs, a training step of a head-dominated Llama (vocab 32000, 2048 tokens) took 0.86-0.99x the standard
# path's CPU time with "precompute" and 0.99-1.03x with "recompute" (its extra logits matmul), at the same
# measured peak. On an accelerator the extra matmul is a third more LM-head flops (8 vs 6 T H V), so
# precompute is the default; recompute is there for vocabulary blocks and for graphs backwarded twice.
DEFAULT_MODE: Mode = "precompute"

# Tokens per chunk, chosen by the chunk sweep (benchmarks/results/loss_chunk_sweep.json): 64- and 128-token
# chunks were 25-60% slower than 1024 (thin tile matmuls, more loop trips), 256-2048 flat within noise. 1024
# sits in the flat part with a 4x margin from where the rise starts; at 128K vocabulary its fp32 tile is
# 0.5 GiB, an eighth of the 4 GiB logits.
DEFAULT_CHUNK_TOKENS = 1024


# --------------------------------------------------------------------------------------------------------
# Memory model (the planner mirrors these formulas in planner/memory.py; keep both in step).
# --------------------------------------------------------------------------------------------------------


def logits_bytes(tokens: int, vocab: int, dtype_bytes: int) -> int:
    """Bytes of one tokens x vocab logits tensor."""
    return tokens * vocab * dtype_bytes


def standard_loss_peak_bytes(*, tokens: int, vocab: int, dtype_bytes: int, logits_held: bool = True) -> int:
    """Loss-head bytes live at the peak of the standard path (lm_head -> .float() -> cross_entropy).

    The peak is inside cross-entropy's backward (log-softmax backward), where these are live: the fp32
    log-softmax that cross-entropy saved, two fp32 gradient buffers (d loss / d log-softmax and d loss /
    d logits) and, if the caller still holds the model output (`outputs = model(...)` kept in scope through
    `outputs.loss.backward()`), the model-dtype logits in `outputs.logits`; autograd itself saves neither
    the logits nor their fp32 upcast, which is freed when the loss function returns (its forward peak,
    b + 2 * 4 bytes per element, is lower):
        standard = [logits_held] * logits(T, V, b) + 3 * logits(T, V, 4)
    Measured with torch.distributed._tools.mem_tracker, fp32 and bf16 (tests/offload/test_loss.py).
    """
    held = logits_bytes(tokens, vocab, dtype_bytes) if logits_held else 0
    return held + 3 * logits_bytes(tokens, vocab, 4)


def chunked_loss_peak_bytes(
    *,
    tokens: int,
    vocab: int,
    dtype_bytes: int,
    chunk_size: int,
    vocab_block: int | None = None,
    hidden: int = 0,
) -> int:
    """Loss-head bytes live at the peak of the chunked path (this module), either mode.

    One tile of c = min(chunk_size, tokens) tokens x v = min(vocab_block or vocab, vocab) vocabulary rows is
    live at a time: its fp32 logits (turned into their gradient in place) plus, when the model dtype is not
    fp32, one model-dtype tile (the matmul output in forward, the gradient cast in backward); the per-token
    log-sum-exp kept from forward to backward; and, when `hidden` is given, the d loss / d weight and
    d loss / d hidden buffers that are filled while tiles are live (in backward for "recompute", in forward
    for "precompute"), plus a (c, hidden) fp32 accumulator per token chunk when the vocabulary is blocked:
        chunked = logits(c, v, 4) + [b != 4] * logits(c, v, b) + 4 * T
                  + (V + T) * hidden * b + [v < V] * 4 * c * hidden
    The standard path's weight gradient appears after its peak, so the planner, which counts parameter
    gradients on their own, may leave `hidden` at 0.
    """
    c = min(chunk_size, tokens)
    v = min(vocab_block or vocab, vocab)
    tile = logits_bytes(c, v, 4) + (logits_bytes(c, v, dtype_bytes) if dtype_bytes != 4 else 0)
    grads = (vocab + tokens) * hidden * dtype_bytes + (4 * c * hidden if v < vocab else 0)
    return tile + 4 * tokens + grads


# --------------------------------------------------------------------------------------------------------
# The function.
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Options:
    chunk_size: int  # tokens per tile
    vocab_block: int | None  # vocabulary rows per tile; None: the whole vocabulary in one tile
    reduction: str  # "mean" over non-ignored tokens, or "sum"
    label_smoothing: float  # epsilon of torch.nn.functional.cross_entropy's label_smoothing
    z_loss_weight: float  # weight of the PaLM z-loss, w * logsumexp^2 per token (Chowdhery et al. 2022, 5)
    mode: str  # "recompute" (logits again in backward) or "precompute" (gradients formed in forward)


def _tile_logits(h: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int) -> Tensor:
    """fp32 logits of one tile: h @ weight[v0:v1].T (+ bias), as F.linear computes them, then upcast."""
    w = weight[v0:v1]
    z = h @ w.t() if bias is None else torch.addmm(bias[v0:v1], h, w.t())
    return z.to(_acc_dtype(z.dtype))  # the same tensor when already fp32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax arithmetic dtype: fp32 for fp32/bf16/fp16 (HF upcasts logits with .float()), fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _vocab_bounds(vocab: int, opts: _Options) -> list[tuple[int, int]]:
    block = opts.vocab_block or vocab
    return [(v0, min(v0 + block, vocab)) for v0 in range(0, vocab, block)]


def _row_stats_(z: Tensor, y: Tensor, opts: _Options) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token log-sum-exp, loss and softmax normaliser of a tile holding whole rows of logits.

    Consumes z: on return it holds exp(z - rowmax), so that softmax = z / normaliser. Every step is in place
    (torch.logsumexp would allocate a tile-sized exp(z - max) temporary).
    """
    target = z.gather(1, y.unsqueeze(1)).squeeze(1)
    logit_sum = z.sum(dim=1) if opts.label_smoothing else None
    row_max = z.amax(dim=1)
    normaliser = z.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
    lse = row_max + torch.log(normaliser)
    return lse, _token_loss(lse, target, logit_sum, z.shape[1], opts), normaliser


def _token_loss(lse: Tensor, target: Tensor, logit_sum: Tensor | None, vocab: int, opts: _Options) -> Tensor:
    # cross-entropy with label smoothing eps, as torch.nn.functional.cross_entropy defines it:
    # (1 - eps) * (lse - z_y) + eps * (lse - mean_j z_j); plus the z-loss w * lse^2 (PaLM)
    loss = lse - target
    if logit_sum is not None:
        eps = opts.label_smoothing
        loss = (1.0 - eps) * loss + eps * (lse - logit_sum / vocab)
    if opts.z_loss_weight:
        loss = loss + opts.z_loss_weight * lse.square()
    return loss


def _forward_tile_stats(
    h: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, opts: _Options
) -> tuple[Tensor, Tensor]:
    """Per-token log-sum-exp and loss of one token chunk, over all vocabulary blocks (online log-sum-exp)."""
    vocab = weight.shape[0]
    bounds = _vocab_bounds(vocab, opts)
    if len(bounds) == 1:
        lse, loss, _ = _row_stats_(_tile_logits(h, weight, bias, 0, vocab), y, opts)
        return lse, loss
    rows = h.shape[0]
    acc = _acc_dtype(h.dtype)
    run_max = torch.full((rows,), float("-inf"), dtype=acc, device=h.device)
    run_sum = torch.zeros(rows, dtype=acc, device=h.device)
    target = torch.zeros(rows, dtype=acc, device=h.device)
    logit_sum = torch.zeros(rows, dtype=acc, device=h.device) if opts.label_smoothing else None
    for v0, v1 in bounds:
        z = _tile_logits(h, weight, bias, v0, v1)
        in_block = (y >= v0) & (y < v1)
        local = (y - v0).clamp(0, v1 - v0 - 1)
        target = torch.where(in_block, z.gather(1, local.unsqueeze(1)).squeeze(1), target)
        if logit_sum is not None:
            logit_sum = logit_sum + z.sum(dim=1)
        # online log-sum-exp: rescale the running sum to the new running max (Milakov & Gimelshein 2018)
        new_max = torch.maximum(run_max, z.amax(dim=1))
        run_sum = run_sum * torch.exp(run_max - new_max) + z.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1)
        run_max = new_max
        del z
    lse = run_max + torch.log(run_sum)
    return lse, _token_loss(lse, target, logit_sum, vocab, opts)


def _logit_grad_(
    z: Tensor,
    y_local: Tensor,
    in_block: Tensor | None,
    lse: Tensor,
    scale: Tensor,
    vocab: int,
    opts: _Options,
    *,
    normaliser: Tensor | None = None,
) -> Tensor:
    """Turn a tile into d loss / d logits, in place.

    z holds fp32 logits (normaliser None) or exp(logits - rowmax) with its row sums in `normaliser` (what
    _row_stats_ leaves). d/dz_j of the per-token loss = (1 + 2 w lse) * softmax_j - (1 - eps) * [j == y]
    - eps / V, times `scale` (the upstream gradient, over the valid-token count for mean reduction).
    """
    coeff = scale * (1.0 + 2.0 * opts.z_loss_weight * lse) if opts.z_loss_weight else scale.expand_as(lse)
    if normaliser is None:
        z.sub_(lse.unsqueeze(1)).exp_()  # softmax
    else:
        coeff = coeff / normaliser
    z.mul_(coeff.unsqueeze(1))
    hit = -(1.0 - opts.label_smoothing) * scale.expand(y_local.shape[0])
    if in_block is not None:
        hit = torch.where(in_block, hit, torch.zeros_like(hit))
    z.scatter_add_(1, y_local.unsqueeze(1), hit.unsqueeze(1))
    if opts.label_smoothing:
        z.sub_(scale * (opts.label_smoothing / vocab))
    return z


class _GradAccumulator:
    """d loss / d (hidden, weight, bias), filled tile by tile from each tile's logit gradient."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, ...]) -> None:
        need_h, need_w, need_b = needs[:3]
        self.weight = weight
        self.bias_dtype = bias.dtype if bias is not None else None
        self.grad_h = torch.zeros_like(hidden) if need_h else None
        self.grad_w = torch.zeros_like(weight) if need_w else None
        acc = _acc_dtype(hidden.dtype)
        self.grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        self.acc = acc

    def add_tile(self, gz: Tensor, h: Tensor, v0: int, v1: int, gh: Tensor | None) -> Tensor | None:
        """Accumulate one tile (gz: fp32 d loss / d logits of h's rows x vocabulary v0..v1).

        Returns this tile's d loss / d h when `gh` is None (one vocabulary block), else adds it into `gh`.
        """
        if self.grad_b is not None:
            self.grad_b[v0:v1] += gz.sum(dim=0)
        gz = gz.to(self.weight.dtype)  # as the standard path: the logits' grad reaches F.linear in its dtype
        if self.grad_w is not None:
            self.grad_w[v0:v1].addmm_(gz.t(), h)
        if self.grad_h is None:
            return None
        if gh is None:
            return gz @ self.weight[v0:v1]
        gh.add_(gz @ self.weight[v0:v1])  # accumulate over vocabulary blocks in fp32
        return None

    def results(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        grad_b = self.grad_b.to(self.bias_dtype) if self.grad_b is not None and self.bias_dtype else None
        return self.grad_h, self.grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = CE(h[rows] @ W.T + b, y[rows]) tile by tile.

    mode "recompute" saves only the per-token log-sum-exp and recomputes every tile's logits in backward
    (Cut Cross-Entropy's scheme: 8 N H V matmul flops instead of the standard 6). Mode "precompute" forms
    the gradients in forward, while each tile's logits are at hand, and holds them until backward only
    scales them by the upstream gradient (the scheme of Liger-Kernel's fused linear cross-entropy,
    Hsu et al. 2024): 6 N H V flops like the standard path, but gradient-sized buffers (weight-sized plus
    hidden-sized) live from forward to backward. Precompute needs one vocabulary block (the log-sum-exp of a
    row must be complete before its gradient exists).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,  # (N, H): all tokens
        weight: Tensor,  # (V, H)
        bias: Tensor | None,  # (V,)
        labels: Tensor,  # (N,) int64: class per token (ignored ones are skipped through `rows`)
        rows: Tensor | None,  # (n_valid,) indices of non-ignored tokens; None: every token counts
        n_valid: int,
        opts: _Options,
    ) -> Tensor:
        acc = _acc_dtype(hidden.dtype)
        vocab = weight.shape[0]
        precompute = opts.mode == "precompute" and any(ctx.needs_input_grad[:3])
        lse_all = torch.empty(0 if precompute else n_valid, dtype=acc, device=hidden.device)
        grads = _GradAccumulator(hidden, weight, bias, ctx.needs_input_grad) if precompute else None
        # upstream gradient 1 (backward rescales), over the valid-token count for mean reduction
        unit = torch.ones((), dtype=acc, device=hidden.device)
        scale = unit / n_valid if opts.reduction == "mean" and n_valid else unit
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        for c0 in range(0, n_valid, opts.chunk_size):
            c1 = min(c0 + opts.chunk_size, n_valid)
            h, y = _chunk_rows(hidden, labels, rows, c0, c1)
            if grads is None:
                lse, loss = _forward_tile_stats(h, y, weight, bias, opts)
                lse_all[c0:c1] = lse
            else:
                z = _tile_logits(h, weight, bias, 0, vocab)
                lse, loss, normaliser = _row_stats_(z, y, opts)
                gz = _logit_grad_(
                    z, y, None, lse, scale, vocab, opts, normaliser=normaliser
                )  # in z's storage
                _put_rows(grads.grad_h, rows, c0, c1, grads.add_tile(gz, h, 0, vocab, None))
                del z, gz
            loss_sum += loss.sum()
        ctx.opts = opts
        ctx.n_valid = n_valid
        ctx.precomputed = precompute
        if grads is not None:
            ctx.grads = grads.results()  # intermediate results, not inputs: held on ctx until backward
        else:
            ctx.grads = None
            ctx.save_for_backward(hidden, weight, bias, labels, rows, lse_all)
        if opts.reduction == "mean":
            return loss_sum / n_valid  # nan when every token is ignored, as F.cross_entropy
        return loss_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.precomputed:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_cross_entropy(mode='precompute') supports one backward per forward (gradients "
                    "are scaled in place); use mode='recompute' to backward through it again (retain_graph)"
                )
            precomputed, ctx.grads = ctx.grads, None  # drop ctx's reference so autograd may steal the buffers
            return (
                *(g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in precomputed),
                None,
                None,
                None,
                None,
            )
        hidden, weight, bias, labels, rows, lse_all = ctx.saved_tensors
        opts: _Options = ctx.opts
        n_valid: int = ctx.n_valid
        vocab = weight.shape[0]
        grads = _GradAccumulator(hidden, weight, bias, ctx.needs_input_grad)
        scale = grad_out.to(grads.acc)
        if opts.reduction == "mean":
            scale = scale / n_valid
        bounds = _vocab_bounds(vocab, opts)
        for c0 in range(0, n_valid, opts.chunk_size):
            c1 = min(c0 + opts.chunk_size, n_valid)
            h, y = _chunk_rows(hidden, labels, rows, c0, c1)
            lse = lse_all[c0:c1]
            one_block = len(bounds) == 1
            gh = (
                None
                if one_block or grads.grad_h is None
                else torch.zeros(h.shape, dtype=grads.acc, device=h.device)
            )
            for v0, v1 in bounds:
                # recompute this tile's logits (never stored), then overwrite them with their gradient
                z = _tile_logits(h, weight, bias, v0, v1)
                if one_block:
                    y_local, in_block = y, None
                else:
                    in_block = (y >= v0) & (y < v1)
                    y_local = (y - v0).clamp(0, v1 - v0 - 1)
                gz = _logit_grad_(z, y_local, in_block, lse, scale, vocab, opts)
                _put_rows(grads.grad_h, rows, c0, c1, grads.add_tile(gz, h, v0, v1, gh))
                del z, gz
            if gh is not None:
                _put_rows(grads.grad_h, rows, c0, c1, gh.to(hidden.dtype))
        return (*grads.results(), None, None, None, None)


def _chunk_rows(
    hidden: Tensor, labels: Tensor, rows: Tensor | None, c0: int, c1: int
) -> tuple[Tensor, Tensor]:
    """Hidden states and labels of valid tokens c0..c1 (a view when every token is valid, else a gather)."""
    if rows is None:
        return hidden[c0:c1], labels[c0:c1]
    sel = rows[c0:c1]
    return hidden.index_select(0, sel), labels.index_select(0, sel)


def _put_rows(grad: Tensor | None, rows: Tensor | None, c0: int, c1: int, value: Tensor | None) -> None:
    if grad is None or value is None:
        return
    if rows is None:
        grad[c0:c1] = value
    else:
        grad.index_copy_(0, rows[c0:c1], value)


def _positive_int(value: object, field: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ChunkedLossError(f"must be a positive int, got {value!r}", field=field)


def resolve_mode(mode: str | None, vocab_block: int | None) -> Mode:
    """The mode to run: as given, else DEFAULT_MODE, or "recompute" when vocabulary blocks are asked for."""
    if mode is None:
        return "recompute" if vocab_block is not None else DEFAULT_MODE
    if mode not in MODES:
        raise ChunkedLossError(f"must be one of {MODES}, got {mode!r}", field="mode")
    return mode  # type: ignore[return-value]


def _check_options(
    *,
    chunk_size: int,
    vocab_block: int | None,
    reduction: str,
    label_smoothing: float,
    z_loss_weight: float,
    mode: str,
) -> None:
    _positive_int(chunk_size, "chunk_size")
    _positive_int(vocab_block, "vocab_block", allow_none=True)
    if reduction not in REDUCTIONS:
        raise ChunkedLossError(f"must be one of {REDUCTIONS}, got {reduction!r}", field="reduction")
    if mode not in MODES:
        raise ChunkedLossError(f"must be one of {MODES}, got {mode!r}", field="mode")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ChunkedLossError(f"must be in [0, 1], got {label_smoothing!r}", field="label_smoothing")
    if z_loss_weight < 0.0:
        raise ChunkedLossError(f"must be >= 0, got {z_loss_weight!r}", field="z_loss_weight")
    if mode == "precompute" and vocab_block is not None:
        raise ChunkedLossError(
            "mode 'precompute' needs whole vocabulary rows per tile: leave it None", field="vocab_block"
        )


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
    vocab_block: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift: bool = True,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    mode: Mode | None = None,
) -> Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `labels`, without materialising the logits.

    hidden: (..., H) final hidden states; weight: (V, H) output embedding (tied or not); bias: (V,) or None;
    labels: (...) class ids, `ignore_index` where no loss is taken. With `shift=True` (HF's ForCausalLMLoss)
    position t is scored against labels[..., t + 1] and the last position of each sequence is ignored.
    reduction "mean" divides by the number of non-ignored tokens (nan when there are none, like
    F.cross_entropy); "sum" does not. label_smoothing follows F.cross_entropy; z_loss_weight adds
    w * logsumexp(logits)^2 per token (PaLM, Chowdhery et al. 2022). The loss is fp32 (fp64 for fp64 inputs),
    like HF's upcast path; `mode` is "recompute" or "precompute" (module docstring), by default DEFAULT_MODE,
    or "recompute" when `vocab_block` is set.

    Under autocast the inputs are cast to the autocast dtype first, as F.linear would be.
    """
    mode = resolve_mode(mode, vocab_block)
    _check_options(
        chunk_size=chunk_size,
        vocab_block=vocab_block,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight,
        mode=mode,
    )
    if hidden.dim() < 2:
        raise ChunkedLossError(f"must be (..., hidden), got shape {tuple(hidden.shape)}", field="hidden")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ChunkedLossError(
            f"must be (vocab, {hidden.shape[-1]}) to match hidden, got shape {tuple(weight.shape)}",
            field="weight",
        )
    vocab = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ChunkedLossError(f"must be ({vocab},), got shape {tuple(bias.shape)}", field="bias")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ChunkedLossError(
            f"shape {tuple(labels.shape)} != hidden's leading shape {tuple(hidden.shape[:-1])}",
            field="labels",
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ChunkedLossError(f"must be an integer tensor, got {labels.dtype}", field="labels")

    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ChunkedLossError(
            f"dtype {hidden.dtype} differs from weight's {weight.dtype}"
            + ("" if bias is None else f" / bias's {bias.dtype}"),
            field="hidden",
        )

    labels = labels.to(hidden.device, torch.long)
    if shift:
        # HF ForCausalLMLoss: pad with ignore_index, drop the first label (tokens < n predict n)
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1)
    valid = flat_y != ignore_index
    out_of_range = valid & ((flat_y < 0) | (flat_y >= vocab))
    n_valid, n_bad = (int(v) for v in torch.stack([valid.sum(), out_of_range.sum()]).tolist())
    if n_bad:
        bad = flat_y[out_of_range][0].item()
        raise ChunkedLossError(
            f"{n_bad} label(s) outside [0, {vocab}) and != {ignore_index}, e.g. {bad}", field="labels"
        )
    rows = None if n_valid == flat_y.numel() else valid.nonzero().squeeze(1)
    opts = _Options(
        chunk_size=chunk_size,
        vocab_block=vocab_block,
        reduction=reduction,
        label_smoothing=float(label_smoothing),
        z_loss_weight=float(z_loss_weight),
        mode=mode,
    )
    with torch.autocast(device_type, enabled=False):
        loss = _LinearCrossEntropy.apply(flat_h, weight, bias, flat_y, rows, n_valid, opts)
    return loss


# --------------------------------------------------------------------------------------------------------
# The installer for Hugging Face causal-LM models.
# --------------------------------------------------------------------------------------------------------

_INSTALLED: weakref.WeakKeyDictionary[nn.Module, ChunkedLossHandle] = weakref.WeakKeyDictionary()


class ChunkedLossHandle:
    """What `install_chunked_loss` returns; `.remove()` restores the model's own head and loss."""

    def __init__(
        self,
        model: nn.Module,
        lm_head: nn.Linear,
        *,
        chunk_size: int,
        vocab_block: int | None,
        label_smoothing: float,
        z_loss_weight: float,
        mode: Mode,
    ) -> None:
        self.model = model
        self.lm_head = lm_head
        self.chunk_size = chunk_size
        self.vocab_block = vocab_block
        self.label_smoothing = label_smoothing
        self.z_loss_weight = z_loss_weight
        self.mode = mode
        self.calls = 0  # forwards whose loss the chunked path computed
        self._armed = False  # between the model's pre-hook and its forward hook of a call with labels
        self._hidden: Tensor | None = None  # what lm_head returned in place of logits during this call
        self._removers: list[Any] = []
        self._signature = inspect.signature(model.forward)

    @property
    def installed(self) -> bool:
        return bool(self._removers)

    def remove(self) -> None:
        """Undo the installation (idempotent); the module tree and state_dict were never changed."""
        while self._removers:
            self._removers.pop()()
        _INSTALLED.pop(self.model, None)

    # -- hooks, in the order they run within one `model(...)` call --------------------------------------

    def _pre_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Runs before the model's forward body: arm the head swap only for calls that pass labels, so
        # inference (no labels) gets ordinary logits.
        labels = kwargs.get("labels")
        if labels is None and args:  # labels passed by position
            try:
                labels = self._signature.bind_partial(*args, **kwargs).arguments.get("labels")
            except TypeError:
                labels = None
        self._armed = labels is not None
        self._hidden = None

    def _head_forward(self, original: Any, hidden: Tensor) -> Tensor:
        # Runs inside the model's forward body, before its loss_function: when armed, hand the hidden
        # states on instead of logits; the patched loss_function recognises them by identity.
        if not self._armed:
            return original(hidden)
        self._hidden = hidden
        return hidden

    def _loss(
        self,
        previous: Any,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if not self._armed:
            return previous(
                logits,
                labels,
                vocab_size=vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        if not hf_loss.is_head_passthrough(logits, self._hidden):
            raise UnsupportedModelError(
                f"{type(self.model).__name__} changes the lm_head output before its loss (e.g. logit "
                "soft-capping or scaling); the chunked loss cannot stand in for it",
                field="model",
            )
        weight = self.lm_head.weight
        if weight.numel() == 0:
            # DeepSpeed ZeRO-3 released the head's partitioned weight after its forward
            raise UnsupportedModelError(
                "lm_head.weight is empty when the loss runs (a ZeRO-3 partitioned parameter, gathered only "
                "inside lm_head's forward); plan the standard loss for ZeRO-3",
                field="model.lm_head",
            )
        bias = getattr(self.lm_head, "bias", None)
        loss = linear_cross_entropy(
            logits,
            weight,
            labels if shift_labels is None else shift_labels,
            bias=bias,
            chunk_size=self.chunk_size,
            vocab_block=self.vocab_block,
            ignore_index=ignore_index,
            shift=shift_labels is None,
            reduction="mean" if num_items_in_batch is None else "sum",
            label_smoothing=self.label_smoothing,
            z_loss_weight=self.z_loss_weight,
            mode=self.mode,
        )
        if num_items_in_batch is not None:
            # HF fixed_cross_entropy: sum over tokens / number of items in the (accumulated) batch
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        self.calls += 1
        return loss

    def _post_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        # Runs after the forward body, also when it raised (always_call=True), so a failed call never leaves
        # the head swapped for the next (inference) call.
        self._armed = False
        hidden, self._hidden = self._hidden, None
        if hidden is None or output is None:
            return None
        return hf_loss.drop_logits(output, hidden)


def install_chunked_loss(
    model: nn.Module,
    *,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
    vocab_block: int | None = None,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    mode: Mode | None = None,
) -> ChunkedLossHandle:
    """Compute `model(input_ids, labels=labels).loss` of an HF causal LM with `linear_cross_entropy`.

    Works on unmodified transformers causal-LM models whose forward is `logits = self.lm_head(hidden)` then
    `self.loss_function(logits, labels, ...)` (LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel, Mistral,
    ...). The module tree is untouched (state_dict keys unchanged): a forward pre-hook and forward hook on the
    model plus instance-level overrides of `lm_head.forward` and `model.loss_function`, all undone by
    `handle.remove()`. Calls without labels (inference, generate) return ordinary logits. A model that
    changes the logits between head and loss (soft-capping) raises UnsupportedModelError on its first call.
    A PEFT-wrapped model (`PeftModel`) gets the loss on the causal LM it wraps (`hf_loss.causal_lm_of`).
    HF's `num_items_in_batch` (sum / items) and `shift_labels` keywords are honoured.
    """
    mode = resolve_mode(mode, vocab_block)
    _check_options(
        chunk_size=chunk_size,
        vocab_block=vocab_block,
        reduction="mean",
        label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight,
        mode=mode,
    )
    if model in _INSTALLED:
        raise ChunkedLossError(
            "already has a chunked loss installed; remove() the first handle", field="model"
        )
    # a PEFT model (PeftModelForCausalLM -> LoraModel -> the causal LM): the hooks go on the causal LM inside,
    # whose forward computes the loss (PEFT calls it as a module, so its hooks run)
    model = hf_loss.causal_lm_of(model)
    lm_head = hf_loss.find_lm_head(model)
    previous_loss = hf_loss.default_causal_lm_loss(model)
    handle = ChunkedLossHandle(
        model,
        lm_head,
        chunk_size=chunk_size,
        vocab_block=vocab_block,
        label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight,
        mode=mode,
    )

    # NOTE: while a call with labels runs, lm_head returns its input (the hidden states) instead of logits and
    # the model's loss_function computes the chunked loss from them; the forward hook then removes them from
    # the output, so `outputs.logits` is None for calls with labels (no tokens x vocab tensor is ever made).
    # With return_dict=False the tuple therefore has no logits entry (HF's to_tuple drops None fields). This
    # holds for evaluation calls with labels too: code that wants both loss and logits (e.g. HF Trainer's
    # compute_metrics) must call without labels or remove() the handle first.
    handle._removers.append(hf_loss.override_forward(lm_head, handle._head_forward))
    handle._removers.append(
        hf_loss.override_loss_function(model, lambda *a, **k: handle._loss(previous_loss, *a, **k))
    )
    handle._removers.append(model.register_forward_pre_hook(handle._pre_forward, with_kwargs=True).remove)
    handle._removers.append(model.register_forward_hook(handle._post_forward, always_call=True).remove)
    _INSTALLED[model] = handle
    return handle
