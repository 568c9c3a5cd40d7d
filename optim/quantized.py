"""8-bit Adam moments for the subspace optimizers: bitsandbytes' blockwise quantization.

Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": each moment is stored as one uint8 code
per element into a 256-entry dynamic code-book (signed for the first moment, unsigned for the second), with
one fp32 absolute maximum per 256-element block; moments under 4096 elements are not quantized (here they keep
the parameter's dtype, as without ``state_bits``; bitsandbytes keeps them in fp32). These are
bitsandbytes' ``Optimizer2State`` defaults (``min_8bit_size=4096``, block size 256), what
:func:`optim.per_param.low_bit_adamw` runs for AdamW and what ``planner.optimizer_state.LOW_BIT_FORMATS``
counts. The update is bitsandbytes' own 8-bit Adam kernel (``optimizer_update_8bit_blockwise``); for a
low-rank moment it runs on a zero tensor of the projected shape with ``lr=1``, which leaves the negated
normalised Adam step there to be projected back (galore-torch's ``GaLoreAdamW8bit`` does the same with
``p.data``). Its arithmetic is torch.optim.AdamW's: eps added to the bias-corrected ``sqrt(v)``.

State keys (tensors only, so ``state_dict()`` round-trips): ``exp_avg``/``exp_avg_sq`` (uint8 codes, the
shape of the moment), ``absmax1``/``absmax2`` (fp32, one per block), ``qmap1``/``qmap2`` (the code-books).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from optim.errors import OptimizerConfigError

STATE_BITS: tuple[int, ...] = (0, 8)
BLOCK = 256  # elements per fp32 absmax (bitsandbytes' blockwise optimizers)
MIN_8BIT_ELEMENTS = 4096  # smaller moments stay fp32 (bitsandbytes' min_8bit_size)
CPU_CHUNK_ELEMENTS = 256 * BLOCK  # 64 Ki elements (256 KiB of fp32) per call on the CPU, block-aligned


def _functional() -> Any:
    try:
        import bitsandbytes.functional as bnb_functional
    except Exception as e:  # an import that fails on this machine's CUDA / CPU build
        raise OptimizerConfigError(
            "state_bits", f"8-bit optimizer states need bitsandbytes, which does not load here: {e}"
        ) from None
    return bnb_functional


def require() -> None:
    """OptimizerConfigError (field ``state_bits``) unless bitsandbytes loads here."""
    _functional()


def quantizes(numel: int, state_bits: int) -> bool:
    """Whether a moment of ``numel`` elements is stored in 8 bits under ``state_bits``."""
    return state_bits == 8 and numel >= MIN_8BIT_ELEMENTS


def _ensure_quantized_moments(state: dict[str, Any], like: torch.Tensor) -> None:
    if "exp_avg" in state and state["exp_avg"].dtype == torch.uint8:
        return
    bnb_functional = _functional()
    blocks = -(-like.numel() // BLOCK)
    state["exp_avg"] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
    state["exp_avg_sq"] = torch.zeros(like.shape, dtype=torch.uint8, device=like.device)
    state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
    state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=like.device)
    state["qmap1"] = bnb_functional.create_dynamic_map(signed=True).to(like.device)
    state["qmap2"] = bnb_functional.create_dynamic_map(signed=False).to(like.device)


def adam_step_8bit_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step on ``param`` with 8-bit moments in ``state`` (created at the first call).

    ``param`` (contiguous), ``grad`` and the moments have the same number of elements; weight decay is
    decoupled and applied before the update, as in torch.optim.AdamW.

    On the CPU the update runs in chunks of :data:`CPU_CHUNK_ELEMENTS`: bitsandbytes' CPU backend
    dequantizes both moments and copies the gradient into fp32 tensors of the whole input (measured: RSS
    about 38 MiB above MemTracker's peak, which does not see inside the op, for an 8192 x 256 embedding, i.e.
    5 fp32 copies), and its blocks are independent, so block-aligned chunks give the same bits with those
    temporaries bounded by the chunk. CUDA's kernel updates in place, in one call.
    """
    _ensure_quantized_moments(state, param)
    _update_8bit_blockwise(
        "adam", param, grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], state,
        betas=(beta1, beta2, 0.0), alpha=0.0, eps=eps, step=int(step), lr=lr, weight_decay=weight_decay,
    )  # fmt: skip


def _update_8bit_blockwise(
    name: str,
    param: torch.Tensor,
    grad: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    state: dict[str, Any],
    *,
    betas: tuple[float, float, float],
    alpha: float,
    eps: float,
    step: int,
    lr: float,
    weight_decay: float,
    skip_zeros: bool = False,
) -> None:
    """bitsandbytes' blockwise 8-bit update of contiguous ``param`` (moments ``m``, ``v``; ``state`` holds
    the code-books and per-block absmax), in block-aligned chunks of :data:`CPU_CHUNK_ELEMENTS` on the CPU,
    whole on CUDA (see :func:`adam_step_8bit_` for why)."""
    functional = _functional()
    n = param.numel()
    chunk = CPU_CHUNK_ELEMENTS if param.device.type == "cpu" else n
    flat_p, flat_g, flat_m, flat_v = param.view(-1), grad.view(-1), m.view(-1), v.view(-1)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        b0, b1 = start // BLOCK, -(-end // BLOCK)
        functional.optimizer_update_8bit_blockwise(
            name, flat_g[start:end], flat_p[start:end], flat_m[start:end], flat_v[start:end],
            betas[0], betas[1], betas[2], alpha, eps, step, lr, state["qmap1"], state["qmap2"],
            state["absmax1"][b0:b1], state["absmax2"][b0:b1], weight_decay,
            gnorm_scale=1.0, skip_zeros=skip_zeros,
        )  # fmt: skip


def adam_direction_8bit_(
    grad: torch.Tensor, state: dict[str, Any], *, step: float, beta1: float, beta2: float, eps: float
) -> tuple[torch.Tensor, float]:
    """Update 8-bit moments with ``grad``; return ``(d, c)`` with the step ``-lr * c * d``, as
    :func:`optim.updates.adam_direction_` does (``d`` is the negated normalised step, ``c = -1``)."""
    update = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)  # (the kernels want p, g alike)
    adam_step_8bit_(
        update, grad, state, step=step, lr=1.0, beta1=beta1, beta2=beta2, eps=eps, weight_decay=0.0
    )
    return update, -1.0


def restore_codes_(state: dict[str, Any]) -> None:
    """Turn the moments of a loaded 8-bit state back into uint8 codes.

    torch.optim.Optimizer.load_state_dict casts every state tensor but ``step`` to the parameter's dtype; the
    codes (0..255) survive that exactly, so casting back restores them bit for bit.
    """
    if "absmax1" not in state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if state[key].dtype != torch.uint8:
            state[key] = state[key].to(torch.uint8)


def adamw_8bit(params: Any, **settings: Any) -> torch.optim.Optimizer:
    """bitsandbytes' ``AdamW8bit``, with its blockwise 8-bit update run in block-aligned chunks of
    :data:`CPU_CHUNK_ELEMENTS` on the CPU (the same bits: the blocks are independent; see
    :func:`adam_step_8bit_` for the fp32 copies of the whole tensor its CPU backend makes otherwise). On CUDA,
    and for moments kept in fp32 (below bitsandbytes' ``min_8bit_size``), its own update runs."""
    return _chunked_adamw8bit_class()(params, **settings)


@functools.cache
def _chunked_adamw8bit_class() -> Any:
    _functional()  # raises naming state_bits when bitsandbytes does not load
    import bitsandbytes as bnb

    class ChunkedAdamW8bit(bnb.optim.AdamW8bit):  # type: ignore[misc,name-defined]
        def update_step(self, group: dict[str, Any], p: torch.Tensor, gindex: int, pindex: int) -> None:
            state = self.state[p]
            if p.device.type != "cpu" or state["state1"].dtype != torch.uint8:
                return super().update_step(group, p, gindex, pindex)
            # what bitsandbytes' Optimizer2State.update_step does for 8-bit blockwise states, chunked
            grad = p.grad
            assert grad is not None  # bitsandbytes steps only parameters that have a gradient
            p.data = p.data.contiguous()
            p.grad = grad = grad.contiguous()
            config = self.get_config(gindex, pindex, group)
            state["step"] += 1
            betas = config["betas"]
            _update_8bit_blockwise(
                self.optimizer_name, p.data, grad, state["state1"], state["state2"], state,
                betas=(betas[0], betas[1], betas[2] if len(betas) >= 3 else 0.0), alpha=config.get("alpha", 0.0),
                eps=config["eps"], step=state["step"], lr=config["lr"], weight_decay=config["weight_decay"],
                skip_zeros=config["skip_zeros"],
            )  # fmt: skip
            return None

    return ChunkedAdamW8bit
