"""Step-time model: compute, communication on the critical path, pipeline bubble, transfers.

compute   = FLOPs / (device peak for the dtype x efficiency) + blocks x block_overhead: an
            alpha-beta model of compute (Hockney 1994's form, used for messages below),
            whose beta (efficiency) and alpha (the per-block dispatch and launch cost) the
            probe fits from blocks of several sizes; `memtier bench --calibrate` refines
            the efficiency. On a device with `roofline` (the GPU presets) a block is costed as its
            kernels instead (`planner.kernels`): GEMMs at the GEMM efficiency, the attention core
            (half its counted FLOPs in a fused causal kernel, whose backward recomputes the scores:
            2.5x its forward, not 2x), the memory-bound operators at the memory bandwidth; selective
            recompute runs the attention core again.
tensor parallel: 2 all-reduces of the block's b*s*h activations in forward and 2 in
            backward (Shoeybi et al. 2019, Sec. 3); with sequence parallelism the same
            volume as all-gather + reduce-scatter (Korthikanti et al. 2022, Sec. 4.2.2).
            On the critical path.
pipeline  = 1F1B: (m + p - 1) slots of one micro-batch's forward + backward per stage
            (Narayanan et al. 2021, Sec. 2.2): bubble (p - 1) / m of the compute, plus
            point-to-point sends of b*s*h activations at every boundary, on the path;
            interleaved over v chunks per device: bubble (p - 1) / (v m), v times the sends
            (Sec. 2.2.2).
data parallel: gradient all-reduce (ZeRO-1/2: reduce-scatter + all-gather, same volume;
            ZeRO-3 adds a parameter all-gather in forward and backward: 1.5x, Rajbhandari
            et al. 2020, Sec. 7.2.2) overlapped with backward except the last bucket (`dp_overlap`:
            0 for a framework that reduces after the last backward, Megatron-LM before 2023).
offload   = the CPU optimizer step (params / CPU AdamW rate) and the gradient down /
            parameter up transfers over the host link (Ren et al. 2021, ZeRO-Offload);
            NVMe-resident state is read and written once per step (Rajbhandari et al. 2021).
LoRA      = frozen base weights skip their weight-gradient GEMMs (backward 1x forward for them instead of
            2x: `planner.lora.frozen_weight_grad_flops`, the head's too); gradients, their reduction and the
            optimizer step cover the adapters only (Hu et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.cluster import ClusterSpec
from planner.comm import GroupLink, allgather_time, allreduce_time, p2p_time, worst_group_links
from planner.flops import head_forward_flops, layer_forward_flops, model_flops_per_step
from planner.kernels import BlockTime, block_forward_time
from planner.lora import frozen_weight_grad_flops
from planner.memory import (
    MemoryOptions,
    device_params,
    optimizer_state_bytes_per_param,
    stage_layer_counts,
    trainable_device_params,
)
from planner.model import ModelSpec
from planner.plan import Layout
from planner.workload import Workload

# share of backward the data-parallel reduction can hide behind: all buckets but the
# last overlap (PyTorch DDP / DeepSpeed bucketing); a calibration can refine it
DP_OVERLAP = 0.8
# passes over the fp32 logits of the standard loss (see estimate_step_time)
LOSS_PASSES = 6


@dataclass(frozen=True, kw_only=True)
class StepTime:
    compute_s: float  # forward + backward (+ recompute) of the slowest stage, all micro-batches
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float  # total data-parallel collective time
    dp_exposed_s: float  # the part not hidden behind backward
    bubble_s: float
    optimizer_s: float  # optimizer step, on device or on the CPU with transfers
    swap_s: float  # exposed activation swap transfers
    step_s: float
    model_flops: float  # per step, whole model
    hardware_flops: float  # with recompute
    tflops_per_device: float  # achieved model TFLOP/s per device
    mfu: float
    hfu: float
    links: dict[str, float] = field(default_factory=dict)  # slowest link bandwidth per group kind

    def breakdown(self) -> dict[str, float]:
        return {
            "compute": self.compute_s,
            "tensor_parallel_comm": self.tp_comm_s,
            "pipeline_comm": self.pp_comm_s,
            "data_parallel_exposed": self.dp_exposed_s,
            "bubble": self.bubble_s,
            "optimizer": self.optimizer_s,
            "swap": self.swap_s,
        }

    @property
    def bottleneck(self) -> str:
        parts = self.breakdown()
        return max(parts, key=lambda k: parts[k])


def estimate_step_time(
    model: ModelSpec,
    cluster: ClusterSpec,
    workload: Workload,
    layout: Layout,
    options: MemoryOptions | None = None,
    *,
    mapping: list[int] | None = None,
    links: dict[str, GroupLink] | None = None,
    swap_exposed_s: float = 0.0,
    dp_overlap: float = DP_OVERLAP,
) -> StepTime:
    options = options or MemoryOptions()
    dev = cluster.device
    peak = dev.flops(workload.dtype)
    rate = peak * dev.efficiency
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    mb, m = layout.micro_batch, layout.grad_accum
    seq = workload.seq_len
    d = workload.dtype_bytes
    links = links or worst_group_links(layout, cluster, mapping)

    # compute of one micro-batch on the slowest stage: its blocks (sharded by tp and cp)
    counts = stage_layer_counts(model, pp, layout.stage_layers)
    tokens = mb * seq
    sp = layout.sequence_parallel
    layer_s, attn_s, bwd_extra_s = block_forward_time(model, dev, workload, tokens, tp=tp, cp=cp, sp=sp)
    # the head is whole on every tp rank unless vocab-parallel (memtier's trainer keeps it whole)
    head_f = head_forward_flops(model, tokens) / (layout.vocab_shards * cp)
    recompute_layers = _recomputed_layers(model, options)
    # per block beyond 3x its forward: selective recompute runs the attention core again (Korthikanti et al.
    # 2022, Sec. 4.3); a fused attention backward recomputes its scores (planner.kernels.BlockTime)
    beyond_s = (attn_s if options.recompute == "selective" and not options.policies else 0.0) + bwd_extra_s
    # LoRA: the weight-gradient GEMMs the frozen blocks and head skip
    frozen_layer_f = frozen_weight_grad_flops(model, workload, tokens) / (tp * cp)
    frozen_head_f = head_f if workload.lora else 0.0
    # the loss over the logits is memory-bound: log-softmax forward (read, write), the
    # loss and its backward (read the saved output, write the gradient) and the upcast,
    # about LOSS_PASSES passes over tokens x vocab fp32 values per micro-batch
    loss_s = LOSS_PASSES * tokens / cp * model.vocab_size / layout.vocab_shards * 4 / dev.memory_bandwidth
    stage_times = []
    for s, n in enumerate(counts):
        share = n / model.num_layers
        head = (3 * head_f - frozen_head_f) / rate if s == pp - 1 else 0.0
        work = (3 * n + recompute_layers * share) * layer_s + n * (beyond_s - frozen_layer_f / rate) + head
        # the fixed cost: every block runs forward and backward once, a recomputed one
        # its forward again (a third of the block's operators, as of its FLOPs)
        overhead = (n + recompute_layers * share / 3) * dev.block_overhead
        stage_times.append(work + overhead + (loss_s if s == pp - 1 else 0.0))
    per_mb = max(stage_times)
    compute = per_mb * m

    # tensor parallel: 4 all-reduces of b*s*h/cp per block per micro-batch (2 fwd, 2 bwd),
    # plus 2 more per recomputed block
    act = tokens / cp * model.hidden_size * d
    n_blocks = max(counts)
    tp_per_mb = (4 * n_blocks + 2 * recompute_layers / pp) * allreduce_time(act, tp, links["tp"])
    if cp > 1:
        # ring attention: K and V of the local chunk pass around the cp ring, fwd and bwd
        kv = tokens / cp * 2 * model.kv_size / tp * d
        tp_per_mb += 2 * n_blocks * allgather_time(kv * cp, cp, links["cp"])
    tp_comm = tp_per_mb * m

    # pipeline: send activations fwd and their gradients bwd across each boundary
    pp_comm = 0.0
    bubble = 0.0
    if pp > 1:
        # interleaved over v chunks: v times the boundaries crossed, a bubble v times smaller
        # (Narayanan et al. 2021, Sec. 2.2.2)
        v = layout.virtual_stages
        pp_per_mb = 2 * v * p2p_time(act / (tp if layout.sequence_parallel else 1), links["pp"])
        pp_comm = pp_per_mb * m
        bubble = (pp - 1) * (per_mb + tp_per_mb + pp_per_mb) / v

    # data parallel over the dp (and cp) group: gradients of this device's parameters
    psi = max(trainable_device_params(model, workload, layout, s) for s in range(pp))
    grad_bytes = psi * d
    dp_n = dp * cp
    dp_comm = allreduce_time(grad_bytes, dp_n, links["dp"])
    if layout.zero_stage >= 3:
        # parameter all-gathers, fwd + bwd: every parameter, frozen ones too (LoRA)
        param_bytes = max(device_params(model, layout, s) for s in range(pp)) * d
        dp_comm += 2 * allgather_time(param_bytes, dp_n, links["dp"])
    backward = (2 / 3) * per_mb  # the last micro-batch's backward is what reduction can hide behind
    dp_exposed = max(0.0, dp_comm - dp_overlap * backward) if dp_n > 1 else 0.0

    # optimizer step
    shard = psi / (dp_n if layout.zero_stage >= 1 else 1)
    optimizer = _optimizer_s(model, cluster, workload, options, shard)

    if cpu_shares(cluster)[0] < 1.0:
        compute, bubble, optimizer, dp_exposed = _shared_cores(cluster, compute, bubble, optimizer, dp_comm)
    step = compute + tp_comm + pp_comm + bubble + dp_exposed + optimizer + swap_exposed_s
    world = layout.world_size
    all_tokens = workload.global_batch * seq
    mflops = model_flops_per_step(model, all_tokens, seq)
    if workload.lora:
        frozen = model.num_layers * frozen_weight_grad_flops(model, workload, all_tokens)
        mflops -= frozen + head_forward_flops(model, all_tokens)
    hflops = mflops + recompute_layers * layer_forward_flops(model, workload.global_batch * seq, seq)
    achieved = mflops / step / world
    return StepTime(
        compute_s=compute,
        tp_comm_s=tp_comm,
        pp_comm_s=pp_comm,
        dp_comm_s=dp_comm,
        dp_exposed_s=dp_exposed,
        bubble_s=bubble,
        optimizer_s=optimizer,
        swap_s=swap_exposed_s,
        step_s=step,
        model_flops=mflops,
        hardware_flops=hflops,
        tflops_per_device=achieved / 1e12,
        # MFU counts model FLOPs only, HFU adds recompute (Korthikanti et al. 2022, App. A)
        mfu=min(1.0, achieved / peak),
        hfu=min(1.0, hflops / step / world / peak),
        links={k: v.bandwidth for k, v in links.items()},
    )


def cpu_shares(cluster: ClusterSpec) -> tuple[float, float]:
    """(while every rank computes, alone) shares of the machine's compute one rank of a CPU "device" gets.

    `memtier launch` runs devices_per_node CPU ranks on one machine, each with max(1, cores // ranks)
    threads (`launch.run.threads_per_rank`): a rank alone uses threads / cores of the machine; all busy,
    the cores are split between the ranks (1 / ranks each when they outnumber the cores). A device's probed
    compute is the whole machine's, so an accelerator, or a CPU node of one rank, gets (1, 1).
    """
    if cluster.device.kind != "cpu" or cluster.devices_per_node <= 1:
        return 1.0, 1.0
    cores, ranks = cluster.cpu.cores, cluster.devices_per_node
    threads = max(1, cores // ranks)
    alone = min(1.0, threads / cores)
    return min(alone, 1.0 / ranks), alone


def _shared_cores(
    cluster: ClusterSpec, compute: float, bubble: float, optimizer: float, dp_comm: float
) -> tuple[float, float, float, float]:
    """(compute, bubble, optimizer, exposed dp reduction) of CPU ranks that share one machine's cores, from
    the same terms costed at the whole machine's rate: everything a rank computes runs at its share of the
    machine; a pipeline bubble idles a rank, whose cores the busy ranks then use, so the critical path runs
    at a lone rank's rate and the bubble costs only what exceeds the ranks' total work; no spare core hides
    the gradient reduction (dp_comm is 0 without data parallelism)."""
    busy, alone = cpu_shares(cluster)
    critical = (compute + bubble) / alone
    compute, optimizer = compute / busy, optimizer / busy
    return compute, max(0.0, critical - compute), optimizer, dp_comm


def _optimizer_s(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, options: MemoryOptions, shard: float
) -> float:
    """Seconds of the optimizer step over `shard` trained parameters per device: on the host's CPU with the
    transfers (ZeRO-Offload), on a CPU device at the fused-AdamW rate, or memory-bound on an accelerator."""
    dev = cluster.device
    d = workload.dtype_bytes
    if options.offload.optimizer:
        # the node's CPU runs the updates of all its devices at once
        cpu_step = shard * cluster.devices_per_node / cluster.cpu.adam_params_per_s
        link = dev.host_link.bandwidth
        transfer = shard * d * 2 / link  # gradients down, parameters up
        optimizer = cpu_step + transfer
        tier = cluster.tier(options.offload.tier)
        if options.offload.tier == "nvme" and tier is not None:
            state = shard * optimizer_state_bytes_per_param(workload, model)
            optimizer += state / tier.read_bandwidth + state / tier.write_bandwidth
    elif dev.kind == "cpu":
        # the device is the CPU: the update runs at the measured fused-AdamW rate
        optimizer = shard / cluster.cpu.adam_params_per_s
    else:
        # element-wise update on the device, memory-bound: read params, grads and state,
        # write params and state back
        optimizer = (
            shard * (3 * d + 2 * optimizer_state_bytes_per_param(workload, model)) / dev.memory_bandwidth
        )
    return optimizer


def block_times(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, *, tokens: int, shard: int = 1
) -> BlockTime:
    """One block's `BlockTime` over `tokens` tokens (split `shard` ways by tp x cp), its forward with its share
    of the fixed per-block cost: the recompute cost and the overlap window the activation MIP uses."""
    dev = cluster.device
    t = block_forward_time(model, dev, workload, tokens, tp=shard)
    return t._replace(forward_s=t.forward_s + dev.block_overhead / 3)


def block_forward_s(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, *, tokens: int, shard: int = 1
) -> float:
    """`block_times(...).forward_s`."""
    return block_times(model, cluster, workload, tokens=tokens, shard=shard).forward_s


def swap_out_early(
    model: ModelSpec, cluster: ClusterSpec, workload: Workload, layout: Layout, tier: str = "dram"
) -> bool:
    """MemoryOptions.swap_out_early for this machine: one block's swap-out to `tier` is a small part of a
    block's forward (planner.memory.swap_out_is_early)."""
    from planner.memory import block_saved_bytes, swap_out_is_early

    spec = cluster.tier(tier)
    if spec is None:
        return False
    tp, cp, sp = layout.tp, layout.cp, layout.sequence_parallel
    kernels = cluster.device.kernel_options(workload)
    saved = block_saved_bytes(model, workload, micro_batch=layout.micro_batch, tp=tp, sp=sp, cp=cp, **kernels)
    write = min(cluster.device.host_link.bandwidth, spec.write_bandwidth / cluster.devices_per_node)
    fwd = block_forward_s(
        model, cluster, workload, tokens=layout.micro_batch * workload.seq_len, shard=tp * cp
    )
    return swap_out_is_early(saved, write, fwd)


def _recomputed_layers(model: ModelSpec, options: MemoryOptions) -> float:
    if options.policies:
        return sum(p.recompute_fraction for p in options.policies)
    if options.recompute == "full":
        return float(model.num_layers)
    if options.recompute == "selective":
        return 0.0  # the attention core only: small next to the block's matmuls
    return 0.0
