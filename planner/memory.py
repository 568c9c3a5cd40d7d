"""Memory cost model: bytes per device of a training step, by category and by tier.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, Sec. 3.1 and 5):
mixed-precision Adam holds 2Ψ (16-bit params) + 2Ψ (16-bit grads) + KΨ (fp32 master
weights, momentum, variance: K = 12); stage 1 partitions the K term over the
data-parallel group, stage 2 also the gradients, stage 3 also the parameters. K follows the
workload's memory modes (`planner.optimizer_state`: fp32 master or pure 16-bit, quantized moments);
layer-wise updates (`Workload.layerwise`) step and free each gradient in backward.

Activations are the tensors autograd saves for backward, counted per token of a
block from the implementation the model runs (transformers' modules for the HF
families, enumerated op by op), or for Megatron-style GPTs from Korthikanti et al.
2022, eq. 2: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, with tensor and
sequence parallelism dividing as in their Sec. 4.2.

The step's peak is the largest of its phases (each block's forward, the loss, each
block's backward, the end of backward, the optimizer step), not a sum of everything
ever allocated. The forward and backward sweeps follow the runtime's schedule
(offload.activations: a swap's source alive until its copy is done, one swapped block
fetched ahead in backward) with the backward temporaries and the gradients alive at
each block measured with torch's MemTracker (see `backward_temp_bytes`,
`gradients_during_backward`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from planner.activation_elems import TokenCoefficients as TokenCoefficients  # re-exported
from planner.activation_elems import (
    attention_backward_per_sequence,
    embedding_dropout_bytes,
    final_bytes,
    saved_after_attention_elems,
    shared_block_inputs_bytes,
    token_coefficients,
)
from planner.cluster import ClusterSpec
from planner.lora import lora_block_params, lora_largest_tensor, saved_elems_change
from planner.model import ModelSpec
from planner.optimizer_state import FP32, optimizer_state_bytes_per_param
from planner.optimizer_state import low_rank_state_elems as low_rank_state_elems  # re-exported
from planner.plan import ActivationPolicy, Layout
from planner.workload import Workload

Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True, kw_only=True)
class Offload:
    """What lives off the device: optimizer state (ZeRO-Offload) and parameters (ZeRO-Infinity)."""

    optimizer: bool = False
    params: bool = False
    tier: Literal["dram", "cxl", "nvme"] = "dram"


@dataclass(frozen=True, kw_only=True)
class MemoryOptions:
    recompute: Recompute = "none"
    offload: Offload = field(default_factory=Offload)
    policies: tuple[ActivationPolicy, ...] = ()  # per-layer swap/recompute; overrides `recompute`
    loss_chunk_tokens: int = 0  # chunked linear cross-entropy: 0 = standard loss
    fragmentation: float = 0.0  # allocator allowance as a share of the peak (calibratable)
    bucket_bytes: int = 0  # ZeRO reduce / all-gather buckets; 0 = DeepSpeed's default 5e8 elements
    # how the optimizer step runs: torch's AdamW is "foreach" on accelerators (temporaries
    # as large as one moment), "single_tensor" on CPU (two temporaries of the largest
    # tensor: sqrt and the division), "fused" (none)
    optimizer_impl: Literal["foreach", "single_tensor", "fused"] = "foreach"
    # a block's swap-out finishes early in the next block's forward (its copy takes well under a block's
    # compute: `swap_out_is_early`), so its source is released before that block's activations build up;
    # False: the copy may run to the end of the next block's forward (and past the loss for the last block)
    swap_out_early: bool = False
    # (parameters, gradients) bytes a streamed model state holds on the device (`planner.model_state`:
    # resident groups, the block pool, one group's gradient); None: the state is not streamed
    stream_state_bytes: tuple[int, int] | None = None
    # the ops take torch's CPU kernels (a CPU device; `planner.estimate` sets it from the cluster): dropout
    # keeps working-dtype masks and SDPA with attention dropout keeps the s x s tensors (`_with_dropout`)
    cpu_kernels: bool = False
    compile_saved_ratio: float = 1.0  # compiled blocks: this share of eager's saved bytes (`DeviceSpec`)

    @classmethod
    def on(cls, cluster: ClusterSpec, workload: Workload, **kw: Any) -> MemoryOptions:
        """`kw` with what the device's kernels save (`DeviceSpec.kernel_options`) where `kw` does not say."""
        return cls(**{**cluster.device.kernel_options(workload), **kw})


@dataclass(frozen=True, kw_only=True)
class ModelStates:
    """Per-device bytes of the model states (ZeRO paper accounting)."""

    parameters: int
    gradients: int
    optimizer_states: int  # fp32 master copy (mixed precision) + optimizer moments

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Per-device peak of a step, by category (bytes), and what lives in each host tier."""

    parameters: int
    gradients: int
    optimizer_states: int
    activations: int  # saved for backward at the peak, all in-flight micro-batches
    buffers: int  # logits and loss, communication buckets, transient workspace, fragmentation
    peak_phase: str
    host_bytes: dict[str, int] = field(default_factory=dict)  # tier -> bytes per device offloaded there
    detail: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states + self.activations + self.buffers

    def by_category(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "activations": self.activations,
            "buffers": self.buffers,
            "total": self.total,
        }

    def by_tier(self) -> dict[str, int]:
        return {"device": self.total, **self.host_bytes}


# ---- parameters per device ---------------------------------------------------------------


def stage_layer_counts(model: ModelSpec, pp: int, stage_layers: tuple[int, ...] = ()) -> tuple[int, ...]:
    if stage_layers:
        return stage_layers
    base, extra = divmod(model.num_layers, pp)
    return tuple(base + (1 if i < extra else 0) for i in range(pp))


def block_device_params(model: ModelSpec, tp: int) -> float:
    """Parameters of one transformer block on one device: matmuls (experts included) sharded by tp, the
    norms whole."""
    vector = model.block_vector_params
    return (model.layer_params - vector) / tp + vector


def device_params(model: ModelSpec, layout: Layout, stage: int = 0) -> int:
    """Parameters held by one device of pipeline `stage` (before ZeRO-3 partitioning).

    Tensor parallelism shards the block matmuls, and the embedding/head when vocab-parallel
    (`Layout.vocab_parallel`: Megatron; memtier's trainer keeps them whole); norms are
    replicated. The first stage holds the embedding, the last the head and final
    norm (with pp == 1 one device holds both).
    """
    tp, pp, vocab = layout.tp, layout.pp, layout.vocab_shards
    layers = stage_layer_counts(model, pp, layout.stage_layers)[stage]
    total = layers * block_device_params(model, tp)
    if stage == 0:
        total += model.embedding_params / vocab
    if stage == pp - 1:
        total += model.norm_params
        if model.lm_head_params or pp > 1:
            # an untied head, or a tied one that the last stage keeps a copy of
            total += model.vocab_size * model.hidden_size / vocab
    return int(math.ceil(total))


def model_states(model: ModelSpec, workload: Workload, layout: Layout, stage: int = 0) -> ModelStates:
    """Per-device parameter, gradient and optimizer-state bytes under ZeRO stage 0..3; with LoRA the frozen
    base weights plus the adapters, and gradients and optimizer state of the adapters only."""
    psi = device_params(model, layout, stage)
    trained = trainable_device_params(model, workload, layout, stage)
    d = workload.dtype_bytes
    dp, z = layout.dp * layout.cp, layout.zero_stage
    k = optimizer_state_bytes_per_param(workload, model)
    params = (psi + (trained if workload.lora else 0)) * d / (dp if z >= 3 else 1)
    grads = trained * d / (dp if z >= 2 else 1)
    opt = trained * k / (dp if z >= 1 else 1)
    return ModelStates(parameters=int(params), gradients=int(grads), optimizer_states=int(opt))


def trainable_device_params(model: ModelSpec, workload: Workload, layout: Layout, stage: int = 0) -> int:
    """Parameters of pipeline `stage` that get gradients and optimizer state on one device: all of them, or
    with LoRA the adapters of its blocks (`planner.lora`; sharded with the matmuls under tp)."""
    if not workload.lora:
        return device_params(model, layout, stage)
    layers = stage_layer_counts(model, layout.pp, layout.stage_layers)[stage]
    return math.ceil(layers * lora_block_params(model, workload) / layout.tp)


# ---- activations ----------------------------------------------------------------------------


def block_saved_bytes(
    model: ModelSpec,
    workload: Workload,
    *,
    micro_batch: int,
    tp: int = 1,
    sp: bool = False,
    cp: int = 1,
    cpu_kernels: bool = False,
    compile_saved_ratio: float = 1.0,
) -> int:
    """Bytes one block saves for backward for one micro-batch on one device (no recompute); a compiled block's
    are `compile_saved_ratio` of them (`MemoryOptions.compile_saved_ratio`), never below its input."""
    c = token_coefficients(model, workload, cpu_kernels=cpu_kernels)
    tokens = micro_batch * workload.seq_len / cp
    lora_rep, lora_shard = saved_elems_change(model, workload)  # (frozen weights keep less; 0 without LoRA)
    rep = (c.replicated + lora_rep) / (tp if sp else 1)
    # the s x s attention terms: per token, times the sequence each token attends over
    shard = (c.sharded + lora_shard + c.per_sequence * workload.seq_len) / tp
    # an unfused attention's s x s terms are per token x (local) sequence length
    elems = tokens * (rep + shard) + c.fixed * workload.seq_len / cp
    eager = int(elems * workload.dtype_bytes + tokens * c.mask_bytes_per_token)
    if compile_saved_ratio == 1.0:
        return eager
    inp = block_input_bytes(model, workload, micro_batch=micro_batch, tp=tp, sp=sp, cp=cp)
    return max(inp, int(eager * compile_saved_ratio))


def block_input_bytes(
    model: ModelSpec, workload: Workload, *, micro_batch: int, tp: int = 1, sp: bool = False, cp: int = 1
) -> int:
    """What a fully recomputed block keeps: its input hidden states (Korthikanti: 2sbh)."""
    tokens = micro_batch * workload.seq_len / cp
    return int(tokens * model.hidden_size / (tp if sp else 1) * workload.dtype_bytes)


def logits_bytes(model: ModelSpec, workload: Workload, *, micro_batch: int, tp: int = 1, cp: int = 1) -> int:
    """One copy of the logits, upcast to fp32 for the loss (tokens x vocab / tp x 4 B)."""
    tokens = micro_batch * workload.seq_len / cp
    return int(tokens * model.vocab_size / tp * FP32)


def loss_peak_bytes(
    model: ModelSpec, workload: Workload, *, micro_batch: int, tp: int = 1, cp: int = 1, chunk_tokens: int = 0
) -> tuple[int, int]:
    """(forward, backward) transient bytes of the LM head + loss.

    Standard path (PyTorch cross_entropy = log_softmax + nll_loss): forward holds the logits
    and the saved log-softmax output (2 copies; with 16-bit logits one more for the upcast);
    backward through the loss holds the saved log-softmax, its incoming gradient and the
    logits gradient (3 copies); final-logit soft-capping one more in each. Chunked linear cross-entropy (Wijmans et al. 2024) holds one
    chunk's logits and their gradient instead.
    """
    one = logits_bytes(model, workload, micro_batch=micro_batch, tp=tp, cp=cp)
    if chunk_tokens:
        # offload.loss (precompute mode): one chunk's fp32 logits (and its 16-bit copy), the
        # per-token log-sum-exp, and the weight and hidden gradients it forms while the
        # chunk's logits are at hand: c*V*4 + [b != 4]*c*V*b + 4T + (V + T)*H*b
        tokens = micro_batch * workload.seq_len / cp
        c = min(chunk_tokens, tokens)
        v, h, b = model.vocab_size / tp, model.hidden_size, workload.dtype_bytes
        # (a frozen head, LoRA: no weight gradient, V*H*b less)
        weight_grad = 0 if workload.lora else v * h * b
        chunked = c * v * FP32 + (c * v * b if b != FP32 else 0) + 4 * tokens + weight_grad + tokens * h * b
        return int(chunked), int(chunked)
    upcast = one // 2 if workload.dtype_bytes == 2 else 0
    # final-logit soft-capping (Gemma 2: cap * tanh(logits / cap)) keeps the tanh output for backward
    cap = one if model.final_logit_softcap else 0
    return 2 * one + upcast + cap, 3 * one + cap


def backward_temp_bytes(
    model: ModelSpec,
    workload: Workload,
    *,
    micro_batch: int,
    tp: int = 1,
    sp: bool = False,
    cp: int = 1,
    cpu_kernels: bool = False,
) -> int:
    """Transient bytes of one block's backward besides its saved tensors and weight gradients.

    The largest come in the MLP's backward: two tokens x ffn/tp activation gradients alive together (the
    gradient of the down projection's input and the one the activation's backward makes from it), while
    the gradient of the block's output (tokens x hidden) is alive throughout. Measured with torch's
    MemTracker (offload.activations.profile_block: peak during a block's backward above the live bytes
    before it), fp32: llama-34m (h 512, ffn 1376, seq 512) 4128 / 3440 / 3096 elements per token at batch
    1 / 2 / 4, i.e. 2 x ffn per token + ffn x hidden (the down projection's weight gradient, counted with
    the gradients); the same on h 64 / ffn 176 and h 128 / ffn 352 Llamas. An unfused attention's backward
    comes after the MLP's, whose saved tensors (and the later norms') are released by then, and holds its
    s x s gradients (`attention_backward_per_sequence`): the larger of the two phases.
    """
    tokens = micro_batch * workload.seq_len / cp
    out = model.hidden_size / (tp if sp else 1)
    # with experts: the ffn-wide gradients of each token's k routed copies and of the shared expert
    ffn = model.ffn_hidden_size
    if model.is_moe:
        ffn = model.experts_per_token * ffn + model.shared_expert_ffn_size
    scores = attention_backward_per_sequence(model, workload, cpu_kernels=cpu_kernels) * workload.seq_len
    attention = out + (scores - saved_after_attention_elems(model, workload)) / tp
    return int(tokens * max(2 * ffn / tp + out, attention) * workload.dtype_bytes)


def swap_out_is_early(swap_bytes: float, write_bps: float, block_forward_s: float) -> bool:
    """`MemoryOptions.swap_out_early`: the copy of a block's swapped bytes takes at most a quarter of the
    next block's forward (a host copy at memory bandwidth on a CPU device; a fast host link)."""
    return write_bps > 0 and swap_bytes / write_bps <= 0.25 * block_forward_s


def forward_sweep(
    resident: list[float], swapped: list[float], *, saved: int, early: bool = False
) -> tuple[float, float]:
    """(bytes at the worst block of the forward, bytes of the last block still in flight at the loss).

    A swapped block's copies to the tier run behind the next block's forward (offload.activations: after
    block l's forward the runtime waits for the copies submitted before l started), and until its copy
    completes the block's original tensors stay alive (the swapped tokens are a view of them) beside the
    compact copy of its kept tokens: block l-1 holds saved + resident[l-1] while block l's forward makes
    its own saved tensors. The last block's copies are waited for after the model's forward, which in an
    HF causal LM includes the loss: they are in flight there. With `early` the copy is done (and the
    source released at the runtime's next pack) before block l's own activations build up: block l-1's
    original then meets only block l's first tensors, and the loss finds the last block already out.
    """
    worst, below = 0.0, 0.0
    for l in range(len(resident)):
        in_flight = saved if l > 0 and swapped[l - 1] > 0 and not early else 0.0
        worst = max(worst, below + in_flight + saved)
        below += resident[l]
    return worst, (float(saved) if swapped and swapped[-1] > 0 and not early else 0.0)


def backward_sweep(
    resident: list[float],
    swapped: list[float],
    *,
    saved: int,
    temp: int,
    grads_at: list[float],
    prefetch: list[bool] | None = None,
) -> tuple[float, int, float]:
    """(bytes, block, prefetched bytes) at the worst block of the backward sweep, blocks last to first.

    While block l runs its backward (offload.activations' semantics, `predict_activation_peak_bytes`):
    blocks before l still hold their resident shares (`resident[j]`, j < l), block l's saved tensors are
    all materialised (kept, fetched back or recomputed: `saved`), its backward temporaries (`temp`) and
    the gradients alive then (`grads_at[l]`) exist, and the swapped share of the closest swapped block
    j < l is already being prefetched when some swapped block at or after l exists (the runtime fetches
    one swapped block ahead, started by the backward of the next swapped block) — unless that block's
    policy turns prefetch off (`prefetch[j]` False, ActivationPolicy.prefetch).
    """
    worst, at, pre = 0.0, 0, 0.0
    below = 0.0
    for l in range(len(resident)):
        before = [j for j in range(l) if swapped[j] > 0]
        ahead = before and any(x > 0 for x in swapped[l:]) and (prefetch is None or prefetch[before[-1]])
        fetched = swapped[before[-1]] if ahead else 0.0
        here = below + saved + temp + fetched + grads_at[l]
        if here > worst:
            worst, at, pre = here, l, fetched
        below += resident[l]
    return worst, at, pre


def gradients_during_backward(
    model: ModelSpec, workload: Workload, layout: Layout, options: MemoryOptions, *, stage: int = 0
) -> list[float]:
    """Gradient bytes alive while each block of `stage` runs its backward (set_to_none before backward).

    With accumulation, all of them (kept through the micro-batches). Otherwise the down projection's
    weight gradient, made by the time the block's MLP backward peaks (see `backward_temp_bytes`), plus:
    with the optimizer offloaded, nothing more (ZeRO-Offload; memtier's OffloadedAdamW hands each
    parameter to the CPU update as its gradient completes when nothing clips: MemTracker saw exactly that
    one gradient at llama-34m's swap-all peak) and with layer-wise updates (`Workload.layerwise`: each
    gradient stepped and freed in its hook); on the device, the head's and the later blocks' (done).
    """
    grads = model_states(model, workload, layout, stage).gradients
    layers = stage_layer_counts(model, layout.pp, layout.stage_layers)[stage]
    if layout.grad_accum > 1:
        return [float(grads)] * layers
    psi = max(1, device_params(model, layout, stage))
    layer_grad = block_grad_bytes(model, workload, layout, grads, stage)  # one block's share of `grads`
    if workload.lora:  # the adapters' gradients: this block's and the later blocks' (tiny)
        return [layer_grad * (layers - l) for l in range(layers)]
    head_grad = grads - layer_grad * layers if stage == layout.pp - 1 else 0.0
    # (experts: transformers keeps every expert's down projection in one tensor, and one gradient)
    down_grad = (
        grads * model.hidden_size * model.ffn_hidden_size * max(1, model.num_experts) / layout.tp / psi
    )
    if options.offload.optimizer or workload.layerwise:
        return [down_grad] * layers
    return [down_grad + head_grad + layer_grad * (layers - 1 - l) for l in range(layers)]


def block_grad_bytes(model: ModelSpec, workload: Workload, layout: Layout, grads: float, stage: int) -> float:
    """One block's share of the stage's gradient bytes `grads`."""
    if workload.lora:
        return grads / max(1, stage_layer_counts(model, layout.pp, layout.stage_layers)[stage])
    return grads * block_device_params(model, layout.tp) / max(1, device_params(model, layout, stage))


def gradients_consumed_in_backward(layout: Layout, offload: Offload, *, layerwise: bool = False) -> bool:
    """An offloaded optimizer takes each gradient off the device as it completes (ZeRO-Offload; memtier's
    OffloadedAdamW), and layer-wise updates step and free it in its hook (GaLore, Zhao et al. 2024,
    Sec. 4.3), unless accumulation keeps the gradients through later micro-batches."""
    return (offload.optimizer or layerwise) and layout.grad_accum == 1


def in_flight_microbatches(layout: Layout, stage: int) -> float:
    """1F1B: stage k holds up to pp - k micro-batches' activations (Narayanan et al. 2021, Sec. 2.2).

    Interleaved over v chunks per device, stage k runs 2 (p - k - 1) + (v - 1) p chunk forwards before its
    first backward (Megatron-LM's interleaved schedule), so it holds that plus one chunk's activations, each
    1/v of the stage's layers: p + (p - 1 - 2k) / v micro-batches of them. For the first stage that is
    1 + (p - 1) / (p v) times the plain schedule's p (Korthikanti et al. 2022, Sec. 4.2.3).
    """
    p, v = layout.pp, layout.virtual_stages
    if p == 1:
        return 1
    held: float = p - stage if v == 1 else (2 * (p - stage - 1) + (v - 1) * p + 1) / v
    return min(held, layout.grad_accum)


@dataclass(frozen=True, kw_only=True)
class _Blocks:
    """One pipeline stage's blocks under their activation policies, for one micro-batch."""

    first: int  # index of the stage's first block
    saved: int  # bytes one block saves for backward (no recompute)
    inp: int  # bytes a recomputed block keeps: its input
    resident: list[float]  # per block: bytes held between its forward and backward
    swapped: list[float]  # per block: bytes sent to the tier
    prefetch: list[
        bool
    ]  # per block: its swapped share is fetched one block ahead (ActivationPolicy.prefetch)
    transient: int  # a recomputed or fetched-back block's activations during its backward
    recomputes: bool = False  # some block recomputes: the step keeps every block's forward inputs

    @property
    def resident_bytes(self) -> float:
        return sum(self.resident)


def _stage_blocks(
    model: ModelSpec, workload: Workload, layout: Layout, options: MemoryOptions, stage: int
) -> _Blocks:
    """Per-block resident and swapped bytes of pipeline `stage` under each layer's policy."""
    mb, tp, cp, sp = layout.micro_batch, layout.tp, layout.cp, layout.sequence_parallel
    counts = stage_layer_counts(model, layout.pp, layout.stage_layers)
    first = sum(counts[:stage])
    saved = block_saved_bytes(
        model, workload, micro_batch=mb, tp=tp, sp=sp, cp=cp, cpu_kernels=options.cpu_kernels,
        compile_saved_ratio=options.compile_saved_ratio,
    )  # fmt: skip
    inp = block_input_bytes(model, workload, micro_batch=mb, tp=tp, sp=sp, cp=cp)
    policies = {p.layer: p for p in options.policies}
    resident: list[float] = []
    swapped: list[float] = []
    transient, recomputes = 0, False
    for i in range(first, first + counts[stage]):
        pol = policies.get(i)
        if pol is None:
            pol = ActivationPolicy(
                layer=i,
                keep_fraction=0.0 if options.recompute == "full" else 1.0,
                recompute_fraction=1.0 if options.recompute == "full" else 0.0,
            )
        if options.recompute == "selective" and pol.layer not in policies:
            # Korthikanti et al. 2022 selective recompute: drop the attention core (s x s terms)
            c = token_coefficients(model, workload, cpu_kernels=options.cpu_kernels)
            tokens = mb * workload.seq_len / cp
            resident.append(
                saved - int(tokens * c.per_sequence * workload.seq_len / tp * workload.dtype_bytes)
            )
            swapped.append(0.0)
            continue
        resident.append(pol.keep_fraction * saved + pol.recompute_fraction * inp)
        recomputes = recomputes or pol.recompute_fraction > 0
        swapped.append(pol.swap_fraction * saved)
        if pol.recompute_fraction > 0 or pol.swap_fraction > 0:
            transient = max(transient, saved)  # recomputed or fetched back: one block at a time
    prefetch = [policies[i].prefetch if i in policies else True for i in range(first, first + counts[stage])]
    return _Blocks(
        first=first,
        saved=saved,
        inp=inp,
        resident=resident,
        swapped=swapped,
        prefetch=prefetch,
        transient=transient,
        recomputes=recomputes,
    )


def _largest_mlp_tensor(model: ModelSpec) -> int:
    """Elements of the MLP's largest weight: a projection, or with experts the 3-D tensor of every expert's
    fused gate and up projections (transformers' MoE layout)."""
    f, h = model.ffn_hidden_size, model.hidden_size
    if not model.is_moe:
        return f * h
    return model.num_experts * (2 if model.gated_mlp else 1) * f * h


def _step_buffers(
    model: ModelSpec, workload: Workload, layout: Layout, options: MemoryOptions, stage: int
) -> tuple[int, int, int]:
    """(ZeRO buckets, optimizer-step temporaries, the embedding's backward) bytes of pipeline `stage`."""
    # ZeRO communication buckets (DeepSpeed default reduce/allgather bucket 5e8 elements),
    # only when gradients are partitioned or reduced in buckets
    bucket = 0
    if layout.zero_stage >= 1 and layout.dp > 1:
        bucket = options.bucket_bytes or int(
            min(5e8, trainable_device_params(model, workload, layout, stage)) * workload.dtype_bytes
        )
    # optimizer-step temporaries (see MemoryOptions.optimizer_impl), on the device when
    # the step runs there
    tp = layout.tp
    largest = max(model.vocab_size * model.hidden_size / layout.vocab_shards, _largest_mlp_tensor(model) / tp)
    if workload.lora:
        largest = lora_largest_tensor(model, workload) / tp
    opt_tmp = 0
    sb = workload.state_dtype_bytes
    if not options.offload.optimizer and not workload.optimizer.state_bits:
        # (a quantized step updates its blocks in place: bitsandbytes' 8-bit kernels; MemTracker saw no
        # temporary of a tensor's size on the CPU)
        if options.optimizer_impl == "single_tensor" or workload.layerwise:
            # (a layer-wise step updates one tensor at a time: sqrt and the division of its moment; optim's
            # low-rank optimizers divide in place, one temporary: optim.updates.adamw_step_)
            opt_tmp = int((1 if workload.optimizer.low_rank else 2) * largest * sb)
        elif options.optimizer_impl == "foreach":
            trained = trainable_device_params(model, workload, layout, stage)
            opt_tmp = int(trained * sb / (layout.dp if layout.zero_stage else 1))
    # the embedding's backward materialises a dense vocab x hidden gradient (and, tied to
    # the head, adds it to the head's gradient through one more buffer) while the other
    # gradients already exist: the end of backward
    emb_tmp = 0
    if stage == 0 and not workload.lora:  # (a frozen embedding has no gradient)
        emb_tmp = int(
            (2 if model.tied_embeddings else 1)
            * model.vocab_size
            * model.hidden_size
            / tp
            * workload.dtype_bytes
        )
    return bucket, opt_tmp, emb_tmp


def _outside_blocks(
    model: ModelSpec, workload: Workload, layout: Layout, options: MemoryOptions, stage: int, recomputes: bool
) -> tuple[int, int, int]:
    """Bytes per micro-batch of pipeline `stage` outside its blocks: (kept from its forward to its backward:
    the final norm's, the embedding dropout's mask and the shared block inputs that recomputed blocks
    keep; the shared block inputs, alive through the forward (`shared_block_inputs_bytes`); the part of
    them kept)."""
    mb, cp = layout.micro_batch, layout.cp
    kept = final_bytes(model, workload, micro_batch=mb, cp=cp) if stage == layout.pp - 1 else 0
    if stage == 0:
        kept += embedding_dropout_bytes(
            model, workload, micro_batch=mb, cp=cp, cpu_kernels=options.cpu_kernels
        )
    shared = shared_block_inputs_bytes(model, workload, micro_batch=mb, cp=cp)
    recomputed = shared if recomputes else 0
    return kept + recomputed, shared, recomputed


def _split_peak(
    phase: str,
    peak: int,
    *,
    params: int,
    opt: int,
    grads: int,
    activations: int,
    last_in_flight: float,
    sweep_grads: int,
    temp: int,
    accumulating: bool,
    consumed_in_backward: bool,
) -> tuple[int, int, int]:
    """(gradients, activations, buffers) of the peak phase's bytes, besides parameters and optimizer state."""
    in_grads = grads if phase in ("optimizer", "backward_end") or accumulating else 0
    if consumed_in_backward and phase in ("optimizer", "backward_end"):
        in_grads = 0  # (the one block's gradient at the end of backward counts as a buffer)
    in_acts = activations if phase in ("forward", "backward", "head_step") else 0
    if phase == "block_backward":
        in_grads = sweep_grads
        in_acts = peak - params - opt - in_grads - temp
    elif phase == "block_forward":
        in_acts = peak - params - opt - in_grads
    elif phase == "forward":
        in_acts = activations + int(last_in_flight)
    return in_grads, in_acts, peak - params - opt - in_grads - in_acts


def _states_on_device(
    model: ModelSpec, workload: Workload, layout: Layout, offload: Offload, stage: int
) -> tuple[int, int, int, dict[str, int]]:
    """(parameters, gradients, optimizer states) on the device, and what the offload puts in host tiers."""
    states = model_states(model, workload, layout, stage)
    host: dict[str, int] = {}
    params, grads, opt = states.parameters, states.gradients, states.optimizer_states
    if offload.optimizer:
        host[offload.tier] = host.get(offload.tier, 0) + opt
        opt = 0
    if offload.params:
        host[offload.tier] = host.get(offload.tier, 0) + params
        params = 0
    return params, grads, opt, host


def _step_end_phases(
    model: ModelSpec,
    workload: Workload,
    layout: Layout,
    options: MemoryOptions,
    stage: int,
    *,
    states: tuple[int, int, int],
    activations: int,
    layer_grad: int,
    emb_tmp: int,
    opt_tmp: int,
    bucket: int,
) -> dict[str, int]:
    """The end of backward and the optimizer step (and, layer-wise, the head's step) of pipeline `stage`."""
    params, opt, grads = states
    consumed = gradients_consumed_in_backward(layout, options.offload, layerwise=workload.layerwise)
    # layer-wise on the device: each parameter's step (and its temporaries) runs inside backward
    stepped = workload.layerwise and consumed and not options.offload.optimizer
    # an untied embedding's gradient is `emb_tmp` until its backward ends (counted once, not in `grads` too)
    untied_embedding_grad = 0 if model.tied_embeddings or stage else emb_tmp
    phases = {
        # an offloaded optimizer has consumed the other gradients by then (and steps off the device)
        "backward_end": params
        + opt
        + (layer_grad if consumed else grads - untied_embedding_grad)
        + emb_tmp
        + (opt_tmp if stepped else 0),
        "optimizer": params + (0 if consumed else grads) + opt + bucket + (0 if stepped else opt_tmp),
    }
    if stepped and stage == layout.pp - 1 and model.lm_head_params and not workload.lora:
        # layer-wise: the untied head is stepped first in backward, every block's activations still held
        head_grad = model.lm_head_params / layout.vocab_shards * workload.dtype_bytes
        phases["head_step"] = int(params + opt + activations + head_grad + opt_tmp)
    return phases


def _streamed(
    model: ModelSpec, workload: Workload, layout: Layout, options: MemoryOptions
) -> MemoryBreakdown:
    """A streamed model state (`planner.model_state`): the rest of the step as with parameters and optimizer
    off the device over one micro-batch (each gradient leaves as backward makes it, so accumulation holds
    none on the device), plus the state's own device bytes (`MemoryOptions.stream_state_bytes`)."""
    assert options.stream_state_bytes is not None
    params, grads = options.stream_state_bytes
    lone = dataclasses.replace(layout, grad_accum=1)
    off = Offload(optimizer=True, params=True)
    rest = estimate_memory(
        model, workload, lone, dataclasses.replace(options, stream_state_bytes=None, offload=off)
    )
    other = rest.total - rest.parameters - rest.gradients - rest.optimizer_states
    return MemoryBreakdown(
        parameters=params,
        gradients=grads,
        optimizer_states=0,
        activations=rest.activations,
        buffers=other - rest.activations,
        peak_phase=rest.peak_phase,
        detail={**rest.detail, "stream_device_params_bytes": params, "stream_device_grads_bytes": grads},
    )


def _worst_stage(
    model: ModelSpec, workload: Workload, layout: Layout, options: MemoryOptions
) -> MemoryBreakdown:
    """The worst pipeline stage's breakdown; a streamed model state's (one stage) by `_streamed`."""
    if options.stream_state_bytes is not None:
        return _streamed(model, workload, layout, options)
    every = (estimate_memory(model, workload, layout, options, stage=s) for s in range(layout.pp))
    return max(every, key=lambda m: m.total)


def estimate_memory(
    model: ModelSpec,
    workload: Workload,
    layout: Layout,
    options: MemoryOptions | None = None,
    *,
    stage: int | None = None,
) -> MemoryBreakdown:
    """Peak bytes per device; with `stage=None` the worst pipeline stage."""
    options = options or MemoryOptions()
    if stage is None or options.stream_state_bytes is not None:
        return _worst_stage(model, workload, layout, options)

    mb, tp, cp, sp = layout.micro_batch, layout.tp, layout.cp, layout.sequence_parallel
    params, grads, opt, host = _states_on_device(model, workload, layout, options.offload, stage)
    blocks = _stage_blocks(model, workload, layout, options, stage)
    saved, resident, swapped = blocks.saved, blocks.resident, blocks.swapped
    act_device = blocks.resident_bytes
    act_swapped = sum(swapped)
    inflight = in_flight_microbatches(layout, stage)
    last = stage == layout.pp - 1
    final, shared, kept_shared = _outside_blocks(model, workload, layout, options, stage, blocks.recomputes)
    activations = int((act_device + final) * inflight)
    if act_swapped:
        tier = options.policies[0].swap_tier if options.policies else "dram"
        host[tier] = host.get(tier, 0) + int(act_swapped * inflight)
    chunk, cpu = options.loss_chunk_tokens, options.cpu_kernels
    loss = loss_peak_bytes(model, workload, micro_batch=mb, tp=layout.vocab_shards, cp=cp, chunk_tokens=chunk)
    loss_fwd, loss_bwd = loss if last else (0, 0)
    bucket, opt_tmp, emb_tmp = _step_buffers(model, workload, layout, options, stage)
    grads_at = gradients_during_backward(model, workload, layout, options, stage=stage)
    consumed = gradients_consumed_in_backward(layout, options.offload, layerwise=workload.layerwise)
    layer_grad = block_grad_bytes(model, workload, layout, grads, stage)
    temp = backward_temp_bytes(model, workload, micro_batch=mb, tp=tp, sp=sp, cp=cp, cpu_kernels=cpu)
    sweep, sweep_block, prefetch = backward_sweep(
        resident, swapped, saved=saved, temp=temp, grads_at=grads_at, prefetch=blocks.prefetch
    )
    # other in-flight micro-batches (1F1B) hold all their resident shares meanwhile
    others = (inflight - 1) * (act_device + final)
    # full-size gradients exist only after the block's backward ran: at the start of
    # backward no gradient is allocated yet (set_to_none), at the optimizer step all are
    fwd_sweep, last_in_flight = forward_sweep(resident, swapped, saved=saved, early=options.swap_out_early)
    phases = {
        # the loss: every block's resident share (and the last block's copy still in flight)
        "forward": int(params + opt + activations + loss_fwd + last_in_flight),
        "backward": params + opt + activations + loss_bwd,
        # the forward sweep: the worst block's forward (see `forward_sweep`)
        "block_forward": int(params + opt + fwd_sweep + others + shared),
        # the backward sweep, loss buffers gone: the worst block's backward (see `backward_sweep`)
        "block_backward": int(params + opt + sweep + others + kept_shared),
        **_step_end_phases(
            model,
            workload,
            layout,
            options,
            stage,
            states=(params, opt, grads),
            activations=activations,
            layer_grad=int(layer_grad),
            emb_tmp=emb_tmp,
            opt_tmp=opt_tmp,
            bucket=bucket,
        ),  # fmt: skip
    }
    if layout.grad_accum > 1:
        # accumulation keeps gradients alive through the next micro-batches
        phases["forward"] += grads
        phases["backward"] += grads
        phases["block_forward"] += grads
    phase = max(phases, key=lambda k: phases[k])
    peak = phases[phase]
    in_grads, in_acts, buffers = _split_peak(
        phase,
        peak,
        params=params,
        opt=opt,
        grads=grads,
        activations=activations,
        last_in_flight=last_in_flight,
        sweep_grads=int(grads_at[sweep_block]) if resident else 0,
        temp=temp,
        accumulating=layout.grad_accum > 1,
        consumed_in_backward=consumed,
    )
    frag = int(peak * options.fragmentation)
    return MemoryBreakdown(
        parameters=params,
        gradients=in_grads,
        optimizer_states=opt,
        activations=in_acts,
        buffers=buffers + frag,
        peak_phase=phase,
        host_bytes=host,
        detail={
            "block_saved_bytes": saved,
            "block_input_bytes": blocks.inp,
            "in_flight_microbatches": math.ceil(inflight),
            "in_flight_block_bytes": int(saved * inflight),  # one block's saved bytes over those in flight
            "logits_bytes": logits_bytes(model, workload, micro_batch=mb, tp=layout.vocab_shards, cp=cp)
            if last
            else 0,
            "loss_forward_bytes": loss_fwd,
            "loss_backward_bytes": loss_bwd,
            "recompute_transient_bytes": blocks.transient,
            "backward_temp_bytes": temp,
            "backward_sweep_block": blocks.first + sweep_block,
            "backward_prefetch_bytes": int(prefetch),
            # what the step holds besides the blocks' activations and the gradients (per block:
            # `gradients_during_backward`) while a block runs its backward: states, the backward
            # temporaries, the other in-flight micro-batches
            "backward_rest_bytes": int(params + opt + temp + others),
            "bucket_bytes": bucket,
            "optimizer_temp_bytes": opt_tmp,
            "embedding_backward_bytes": emb_tmp,
            "shared_inputs_kept_bytes": kept_shared,  # (rotary tables, eager masks; recompute keeps them)
            "fragmentation_bytes": frag,
            "all_gradients_bytes": grads,
            **{f"phase_{k}": v for k, v in phases.items()},
        },
    )
