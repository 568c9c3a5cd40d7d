"""LoRA: which parameters train, and what freezing the rest changes in memory and compute.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Sec. 4.1) freezes every base
weight and adds, on each target linear of weight (out x in), two trainable factors A (r x in) and B
(out x r): r * (in + out) parameters (PEFT's `LoraConfig(r, target_modules)`; lora_dropout 0 is an
identity, so the adapter's input is the linear's own input). Frozen weights need no gradient and no
optimizer state, and their backward needs only the input gradient (one GEMM instead of two).

What autograd saves per token of a Llama-like block changes too (counted from transformers' modules with
PEFT's LoRA layers; checked against the meta-device trace of `planner.trace` in tests/planner/test_lora.py):
each RMSNorm's normalised tensor is saved only for its weight's gradient (-h per norm), a frozen linear
saves no input, so the attention projections' input (h) is kept only when q/k/v carry an adapter, the MLP's
input (h) only when gate/up do, the down projection's input (f) only when it does; each adapter keeps its
r-wide A output. (The first block also skips its first norm, its input needing no gradient; not counted.)
"""

from __future__ import annotations

import math

from planner.errors import SpecError
from planner.model import LLAMA_LIKE, ModelSpec
from planner.workload import Workload

# PEFT's module names (transformers' Llama-like families) -> `ModelSpec.layer_param_shapes` names
TARGET_SHAPES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


def check_lora(model: ModelSpec, workload: Workload) -> None:
    """A LoRA workload the cost models can count: a Llama-like dense family, known targets, AdamW or SGD
    with unquantized states (the optimizer sees only the adapters)."""
    if not workload.lora:
        return
    if model.family not in LLAMA_LIKE or model.is_moe or model.fused_qkv:
        raise SpecError(
            f"LoRA is modelled for dense Llama-like families with separate q/k/v projections, not "
            f"{model.family!r}",
            field="lora_rank",
        )
    unknown = [t for t in workload.lora_targets if t not in TARGET_SHAPES]
    if unknown or not workload.lora_targets:
        raise SpecError(
            f"unknown LoRA target(s) {unknown or '(none)'}; expected some of {', '.join(TARGET_SHAPES)}",
            field="lora_targets",
        )
    if workload.optimizer.kind not in ("adamw", "sgd") or workload.optimizer.state_bits:
        raise SpecError(
            f"LoRA is planned with full-precision AdamW or SGD on the adapters, not "
            f"{workload.optimizer.kind} with {workload.optimizer.state_bits}-bit states",
            field="optimizer",
        )


def _target_shapes(model: ModelSpec, workload: Workload) -> list[tuple[int, int]]:
    """(out, in) of each adapted linear of one block."""
    shapes = dict(model.layer_param_shapes())
    names = {TARGET_SHAPES[t] for t in workload.lora_targets}
    return [(shapes[n][0], shapes[n][1]) for n in sorted(names) if n in shapes]


def lora_block_params(model: ModelSpec, workload: Workload) -> int:
    """Adapter parameters of one block: r * (in + out) per target linear (A: r x in, B: out x r)."""
    if not workload.lora:
        return 0
    return sum(workload.lora_rank * (i + o) for o, i in _target_shapes(model, workload))


def lora_largest_tensor(model: ModelSpec, workload: Workload) -> int:
    """Elements of the largest adapter factor (the optimizer step's largest temporary)."""
    return max((workload.lora_rank * max(i, o) for o, i in _target_shapes(model, workload)), default=0)


def trainable_params(model: ModelSpec, workload: Workload, layers: int | None = None) -> int:
    """Parameters that get gradients and optimizer state: the adapters of `layers` blocks (all by default),
    or every parameter in full fine-tuning."""
    n = model.num_layers if layers is None else layers
    return lora_block_params(model, workload) * n if workload.lora else model.params


def saved_elems_change(model: ModelSpec, workload: Workload) -> tuple[float, float]:
    """Change of a block's saved elements per token under LoRA (see the module docstring), as (replicated,
    sharded) under tensor parallelism: the hidden-wide tensors stay whole, the ffn-wide input of the down
    projection and the adapters' outputs are counted as sharded."""
    if not workload.lora:
        return 0.0, 0.0
    h, f, r = model.hidden_size, model.ffn_hidden_size, workload.lora_rank
    targets = {TARGET_SHAPES[t] for t in workload.lora_targets}
    # normalised tensors: only the frozen norm weights' gradients need them
    replicated = -model.norms_per_block * h
    replicated -= 0 if targets & {"q", "k", "v"} else h  # attention projections' input
    replicated -= 0 if targets & {"gate", "up"} else h  # MLP's input
    sharded = -(0 if "down" in targets else f) + r * len(targets)  # down projection's input; A outputs
    return replicated, sharded


def frozen_weight_grad_flops(model: ModelSpec, workload: Workload, tokens: int) -> float:
    """Backward FLOPs a LoRA step skips per block over `tokens` tokens: the weight-gradient GEMM of every
    frozen linear, 2 * tokens * weights (the backward of a trained linear is 2x its forward: input and
    weight gradients; frozen, 1x), less the adapters' own (forward 2 * tokens * r * (in + out), backward
    twice that: 6 per adapter parameter and token in all, as for any trained weight)."""
    if not workload.lora:
        return 0.0
    h = model.hidden_size
    proj = h * (model.q_size + 2 * model.kv_size) + model.q_size * h
    mlp = (3 if model.gated_mlp else 2) * model.ffn_hidden_size * h
    return 2.0 * tokens * (proj + mlp) - 6.0 * tokens * lora_block_params(model, workload)


def lora_summary(model: ModelSpec, workload: Workload) -> dict[str, int | float]:
    """Trainable parameters and their share, for the plan's notes and `memtier estimate`."""
    n = trainable_params(model, workload)
    return {"trainable_params": n, "trainable_share": n / model.params if model.params else math.nan}
