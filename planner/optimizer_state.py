"""Optimizer-state bytes per parameter: precision (fp32 master or none), the optimizer's moments (AdamW,
SGD, the low-rank GaLore / Natural GaLore / FRUGAL) and quantized (8-/4-bit) moments, tensor by tensor.

`planner.memory` puts these into the ZeRO paper's 2Ψ + 2Ψ + KΨ (Rajbhandari et al. 2020, Sec. 3.1).
"""

from __future__ import annotations

import math

from planner.model import ModelSpec
from planner.workload import Workload

FP32 = 4


def optimizer_state_bytes_per_param(workload: Workload, model: ModelSpec | None = None) -> float:
    """K in the ZeRO paper's 2Ψ + 2Ψ + KΨ, for the workload's optimizer, precision and state bits.

    AdamW keeps two moments (8 B/param in fp32) and, in mixed precision, an fp32 master copy
    (4 B/param): K = 12; in pure 16-bit training the moments are 16-bit and there is no master: K = 4
    (`Workload.precision`). SGD with momentum keeps one moment. GaLore keeps Adam moments of
    the rank-r projection (r x n for an m x n weight, m >= n projected on the left) plus the
    m x r projector (Zhao et al. 2024, Sec. 4); FRUGAL keeps Adam moments on a `density`
    share (Zaitsev et al. 2024). For the low-rank ones, and for quantized moments, the ratio depends on
    shapes, so the model is needed.
    """
    opt = workload.optimizer
    master = FP32 if workload.mixed_precision else 0
    if opt.kind == "sgd":
        return master + workload.state_dtype_bytes
    if opt.kind == "adamw" and not opt.state_bits:
        return master + 2 * workload.state_dtype_bytes
    if model is None:
        raise ValueError(f"optimizer {opt.kind!r} with {opt.state_bits}-bit states needs the model's shapes")
    return master + optimizer_moment_bytes(model, workload) / model.params


# Block-quantized optimizer states: (bytes per element, elements per fp32 scale, fp32 code-book entries per
# moment tensor, smallest tensor quantized). 8-bit: bitsandbytes' blockwise Adam (Dettmers et al. 2022,
# "8-bit Optimizers via Block-wise Quantization"; bitsandbytes.optim.optimizer.Optimizer2State.init_state:
# uint8 state, an fp32 absmax per 256 elements, a 256-entry fp32 qmap, tensors under min_8bit_size = 4096
# elements kept in fp32). 4-bit: torchao's AdamW4bit (torchao/optim/subclass_4bit.py: two codes per byte,
# one scale per 128 elements, a 16-entry code-book); the same 4096-element floor is assumed.
LOW_BIT_FORMATS = {8: (1.0, 256, 256, 4096), 4: (0.5, 128, 16, 4096)}


def moment_tensor_bytes(numel: int, workload: Workload) -> float:
    """Bytes of one optimizer moment of `numel` elements: the state dtype, or block-quantized."""
    bits = workload.optimizer.state_bits
    if not bits or numel < LOW_BIT_FORMATS[bits][3]:
        return numel * (workload.state_dtype_bytes if not bits else FP32)
    per_elem, block, codes, _ = LOW_BIT_FORMATS[bits]
    return numel * per_elem + math.ceil(numel / block) * FP32 + codes * FP32


def _tensor_state_elems(shape: tuple[int, ...], workload: Workload) -> tuple[list[int], int]:
    """(moment tensors' sizes, other state elements: basis, history) of one block tensor."""
    opt = workload.optimizer
    if len(shape) != 2 or opt.kind in ("adamw", "sgd"):
        n = math.prod(shape)
        return ([n] if opt.kind == "sgd" else [n, n]), 0
    m, n = max(shape), min(shape)
    r = min(opt.rank, n)
    if opt.kind == "frugal":
        r = int(math.floor(opt.density * n + 0.5))
        if r >= n:
            return [m * n, m * n], 0
        if r == 0:
            return [], 0
    history = NATURAL_GALORE_HISTORY * r * m if opt.kind == "natural_galore" else 0
    return [r * m, r * m], r * n + history


def optimizer_moment_bytes(model: ModelSpec, workload: Workload) -> float:
    """Optimizer-state bytes of the whole model, tensor by tensor (moments quantized when state_bits is
    set; GaLore's basis and Natural GaLore's history stay in the state dtype, as galore-torch's 8-bit
    GaLoreAdamW8bit keeps its projector in the gradient's dtype)."""
    block = 0.0
    for _, shape in model.layer_param_shapes():
        moments, other = _tensor_state_elems(shape, workload)
        block += sum(moment_tensor_bytes(n, workload) for n in moments) + other * workload.state_dtype_bytes
    rest = 0.0
    for n in (model.embedding_params, model.lm_head_params, model.norm_params):
        if n:
            rest += sum(moment_tensor_bytes(k, workload) for k in _tensor_state_elems((n,), workload)[0])
    return block * model.num_layers + rest


def low_rank_state_elems(model: ModelSpec, workload: Workload) -> float:
    """Optimizer-state elements of GaLore / Natural GaLore / FRUGAL for the whole model.

    The transformer blocks' matrices are projected; vectors (norms, biases), embeddings and the
    head keep full Adam moments (how galore-torch is used: projection on the blocks' linears).
    For an m x n weight with m >= n, GaLore projects the short side: Adam moments of the m x r
    projected gradient plus the n x r basis, 2rm + rn (Zhao et al. 2024, Sec. 4.2); Natural
    GaLore adds a history of s low-rank gradients, s*r*m (Das et al. 2024); FRUGAL keeps the
    same on rank r = density * n, or plain Adam (2mn) when r = n and nothing when r = 0
    (Zmushko et al. 2024). The same arithmetic as `optim.state_bytes.expected_state_bytes`,
    held together by a cross-check test (planner may not import optim).
    """
    opt = workload.optimizer
    elems = 0.0
    for _, shape in model.layer_param_shapes():
        if len(shape) != 2:  # vectors, and experts' 3-D tensors (not nn.Linear: plain Adam moments)
            elems += 2 * math.prod(shape)
            continue
        m, n = max(shape), min(shape)
        if opt.kind == "frugal":
            r = int(math.floor(opt.density * n + 0.5))
            elems += 2 * m * n if r >= n else (0 if r == 0 else 2 * r * m + r * n)
            continue
        r = min(opt.rank, n)
        elems += 2 * r * m + r * n
        if opt.kind == "natural_galore":
            elems += NATURAL_GALORE_HISTORY * r * m
    elems *= model.num_layers
    other = model.embedding_params + model.lm_head_params + model.norm_params
    return elems + 2 * other


# Natural GaLore's stored low-rank gradients (optim.NaturalGaLoreAdamW's default history_size)
NATURAL_GALORE_HISTORY = 10
