"""Step-time model: structure and ratios, never milliseconds."""

import dataclasses

import pytest

from planner.comm import GroupLink, allreduce_time, groups, worst_group_links
from planner.estimate import estimate
from planner.memory import MemoryOptions, Offload
from planner.plan import Layout
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import Workload

W = Workload(global_batch=64, micro_batch=1, seq_len=2048)


def test_groups_partition_the_ranks():
    layout = Layout(dp=2, tp=4, pp=2, cp=2)
    g = groups(layout)
    for kind, size in (("tp", 4), ("dp", 2), ("pp", 2), ("cp", 2)):
        members = sorted(r for grp in g[kind] for r in grp)
        assert members == list(range(32)) and all(len(x) == size for x in g[kind])
    assert g["tp"][0] == [0, 1, 2, 3]  # tp innermost: on one node's fastest links


def test_slowest_link_sets_the_group_time():
    cluster = resolve_cluster("hetero-a100-32")
    # dp across n0 and n2 crosses the slow uplink; across n0 and n1 it does not
    fast = worst_group_links(Layout(dp=4, tp=8), cluster, mapping=list(range(32)))
    assert fast["tp"].bandwidth == 300e9
    # the dp ring n0-n1-n2-n3 closes over n3-n0, which crosses the slow uplink
    assert fast["dp"].bandwidth == 6.25e9
    swapped = list(range(8)) + list(range(16, 24)) + list(range(8, 16)) + list(range(24, 32))
    other = worst_group_links(Layout(dp=4, tp=8), cluster, mapping=swapped)
    assert other["dp"].bandwidth <= fast["dp"].bandwidth


def test_allreduce_costs():
    link = GroupLink(bandwidth=1e9, latency=0.0)
    # ring: 2 (n-1)/n x B / bw
    assert allreduce_time(1e9, 4, link) == pytest.approx(1.5)
    assert allreduce_time(1e9, 1, link) == 0.0


def test_bubble_follows_1f1b():
    spec = MODEL_PRESETS["llama2-13b"]
    cluster = resolve_cluster("dgx-a100-8x80g", nodes=4)
    for m in (8, 32):
        w = W.replace(global_batch=m)
        e = estimate(spec, cluster, w, Layout(tp=8, pp=4, dp=1, grad_accum=m))
        # bubble / (per-micro-batch work x m) = (p - 1) / m (Narayanan et al. 2021, Sec. 2.2)
        t = e.time
        assert t.bubble_s / (t.compute_s + t.tp_comm_s + t.pp_comm_s) == pytest.approx(3 / m, rel=1e-6)


def test_mfu_and_hfu_bounded_and_ordered():
    spec = MODEL_PRESETS["gpt3-175b"]
    cluster = resolve_cluster("dgx-a100-8x80g", nodes=128)
    w = Workload(global_batch=1536, seq_len=2048)
    e = estimate(spec, cluster, w, Layout(tp=8, pp=16, dp=8, grad_accum=192), MemoryOptions(recompute="full"))
    assert 0 < e.time.mfu < e.time.hfu <= 1.0
    assert e.time.hfu / e.time.mfu == pytest.approx(4 / 3, rel=0.03)


def test_slow_links_slow_the_step():
    spec = MODEL_PRESETS["llama2-7b"]
    base = resolve_cluster("dgx-a100-8x80g", nodes=4)
    slow = dataclasses.replace(
        base,
        links=dataclasses.replace(
            base.links, inter_node=dataclasses.replace(base.links.inter_node, bandwidth=2e9)
        ),
    )
    layout = Layout(dp=32, micro_batch=1, grad_accum=2, zero_stage=1)
    fast_t = estimate(spec, base, W, layout).time
    slow_t = estimate(spec, slow, W, layout).time
    assert slow_t.dp_comm_s > 5 * fast_t.dp_comm_s
    assert slow_t.step_s > fast_t.step_s


def test_offload_moves_the_optimizer_to_the_cpu():
    spec = MODEL_PRESETS["llama2-7b"]
    cluster = resolve_cluster("rtx4090-nvme")
    w = Workload(global_batch=8, micro_batch=1, seq_len=1024)
    layout = Layout(grad_accum=8)
    host = estimate(spec, cluster, w, layout, MemoryOptions(offload=Offload(optimizer=True)))
    nvme = estimate(spec, cluster, w, layout, MemoryOptions(offload=Offload(optimizer=True, tier="nvme")))
    resident = estimate(spec, cluster, w, layout)
    assert host.time.optimizer_s > resident.time.optimizer_s
    assert nvme.time.optimizer_s > host.time.optimizer_s
    assert host.memory.total < resident.memory.total
    assert host.memory.host_bytes["dram"] == pytest.approx(12 * spec.params, rel=1e-6)


def test_block_overhead_adds_per_block_and_per_recompute():
    spec = MODEL_PRESETS["llama-20m"]
    base = resolve_cluster("rtx4090-nvme")
    slow = dataclasses.replace(base, device=dataclasses.replace(base.device, block_overhead=1e-3))
    w = Workload(global_batch=4, micro_batch=1, seq_len=256)
    layout = Layout(grad_accum=4)
    for rc, blocks in (("none", spec.num_layers), ("full", spec.num_layers * 4 / 3)):
        opts = MemoryOptions(recompute=rc)
        a = estimate(spec, base, w, layout, opts).time.compute_s
        b = estimate(spec, slow, w, layout, opts).time.compute_s
        # every micro-batch runs each block forward + backward once; recompute adds a forward (1/3)
        assert b - a == pytest.approx(4 * blocks * 1e-3, rel=1e-9)


def test_interleaved_1f1b_divides_the_bubble_and_multiplies_the_sends():
    spec = MODEL_PRESETS["llama2-13b"]
    cluster = resolve_cluster("dgx-a100-8x80g", nodes=4)
    w = W.replace(global_batch=8)
    plain = estimate(spec, cluster, w, Layout(tp=8, pp=4, grad_accum=8)).time
    inter = estimate(spec, cluster, w, Layout(tp=8, pp=4, grad_accum=8, virtual_stages=2)).time
    # Narayanan et al. 2021, Sec. 2.2.2: bubble (p - 1) / (v m) of the per-micro-batch work, v x the sends
    assert inter.pp_comm_s == pytest.approx(2 * plain.pp_comm_s)
    per_mb = (inter.compute_s + inter.tp_comm_s + inter.pp_comm_s) / 8
    assert inter.bubble_s == pytest.approx(3 * per_mb / 2)
    assert inter.step_s < plain.step_s  # the bubble saved outweighs the extra sends here


def test_interleaved_schedule_holds_more_activations_on_the_first_stage():
    from planner.memory import in_flight_microbatches

    # Korthikanti et al. 2022, Sec. 4.2.3: the first stage holds 1 + (p - 1) / (p v) times plain 1F1B's p
    for p, v in ((4, 2), (8, 4), (16, 3)):
        layout = Layout(pp=p, grad_accum=64, virtual_stages=v)
        assert in_flight_microbatches(layout, 0) == pytest.approx(p * (1 + (p - 1) / (p * v)))
        assert in_flight_microbatches(Layout(pp=p, grad_accum=64), 0) == p
        # every stage holds more than under plain 1F1B, the first the most
        held = [in_flight_microbatches(layout, k) for k in range(p)]
        assert held == sorted(held, reverse=True)
        assert all(h >= p - k for k, h in enumerate(held))


def test_cpu_ranks_sharing_cores_split_the_compute_and_absorb_the_bubble():
    """4 CPU ranks on a 2-core machine (1 thread each): all busy, each gets a quarter of the machine's probed
    compute; a pipeline rank idle in the bubble leaves its core to the busy ones, so a 2-stage pipeline over
    2 micro-batches (bubble 1/2 of the compute when each rank has a device of its own) costs no bubble."""
    from planner.cluster import CpuSpec, DeviceSpec, Link, Links
    from planner.steptime import cpu_shares, estimate_step_time

    spec = MODEL_PRESETS["llama-20m"]
    gpu_like = resolve_cluster("dgx-a100-8x80g")
    dev = DeviceSpec(kind="cpu", memory=24 << 30, peak_flops={"fp32": 4e11}, efficiency=0.7,
                     host_link=Link(bandwidth=1e10, latency=1e-7), memory_bandwidth=1e10)  # fmt: skip
    cpu = dataclasses.replace(
        gpu_like, devices_per_node=4, device=dev, cpu=CpuSpec(cores=2, peak_flops=4e11, adam_params_per_s=3e9),
        links=Links(intra_node=Link(bandwidth=1e9, latency=4e-5), inter_node=Link(bandwidth=1e9, latency=4e-5)),
    )  # fmt: skip
    assert cpu_shares(cpu) == (0.25, 0.5) and cpu_shares(gpu_like) == (1.0, 1.0)
    one = dataclasses.replace(cpu, devices_per_node=1)
    w = Workload(global_batch=8, micro_batch=2, seq_len=64, dtype="fp32")
    alone = estimate_step_time(spec, one, w.replace(global_batch=2), Layout(dp=1, micro_batch=2))
    dp4 = estimate_step_time(spec, cpu, w, Layout(dp=4, micro_batch=2))
    assert dp4.compute_s == pytest.approx(
        4 * alone.compute_s
    )  # the same work per rank, a quarter of the cores
    assert dp4.dp_exposed_s == pytest.approx(dp4.dp_comm_s)  # no spare core hides the reduction
    pp = estimate_step_time(
        spec, cpu, w, Layout(dp=2, pp=2, micro_batch=2, grad_accum=2, stage_layers=(4, 4))
    )
    assert pp.bubble_s == 0.0
    dedicated = estimate_step_time(
        spec, dataclasses.replace(cpu, cpu=CpuSpec(cores=8, peak_flops=4e11, adam_params_per_s=3e9)), w,
        Layout(dp=2, pp=2, micro_batch=2, grad_accum=2, stage_layers=(4, 4)),
    )  # fmt: skip
    assert dedicated.bubble_s > 0.0


def test_roofline_costs_memory_bound_operators_and_the_causal_half_of_fused_attention():
    """planner.kernels: with `roofline`, a block is its GEMMs at the GEMM efficiency plus its memory-bound bytes
    at the HBM bandwidth (a larger share in narrow models), and a fused causal attention kernel runs half the
    counted score/context FLOPs; without it, a block is FLOPs / (peak x efficiency) as the probe fits it."""
    from planner.flops import layer_forward_flops
    from planner.kernels import block_forward_time, memory_bound_bytes
    from planner.model import ModelSpec

    dev = resolve_cluster("dgx-a100-8x80g").device
    assert dev.roofline
    rate = dev.flops("fp16") * dev.efficiency
    w = Workload(global_batch=8, seq_len=2048, dtype="fp16", flash_attention=False)

    def gpt(h: int, a: int) -> ModelSpec:
        return ModelSpec(name=f"gpt-{h}", family="gpt", num_layers=24, hidden_size=h, num_heads=a,
                         ffn_hidden_size=4 * h, vocab_size=51200, gated_mlp=False, norm="layernorm",
                         position="learned", attn_dropout=0.1, hidden_dropout=0.1)  # fmt: skip

    def slowdown(m: ModelSpec, wl: Workload) -> float:
        return block_forward_time(m, dev, wl, 2048).forward_s / (layer_forward_flops(m, 2048, 2048) / rate)

    narrow, wide = gpt(2304, 24), gpt(20480, 128)
    assert slowdown(narrow, w) > slowdown(wide, w) > 1.0  # the memory-bound share falls as h grows
    # the unfused scores dominate a narrow model's bytes; a fused kernel moves none of them
    assert memory_bound_bytes(narrow, w, 2048) > 2 * memory_bound_bytes(
        narrow, w.replace(flash_attention=True), 2048
    )
    # fused and causal: half the counted attention FLOPs (at the kernel's own efficiency)
    flash = w.replace(flash_attention=True)
    plain = dataclasses.replace(dev, attention_efficiency=0.0)
    attn = 4.0 * 2048 * 2048 * wide.q_size
    fused_s, _, flash_extra_s = block_forward_time(wide, plain, flash, 2048)
    unfused_s, _, unfused_extra_s = block_forward_time(
        wide, plain, flash.replace(flash_attention=False), 2048
    )
    moved = (memory_bound_bytes(wide, w, 2048) - memory_bound_bytes(wide, flash, 2048)) / dev.memory_bandwidth
    assert unfused_s - fused_s == pytest.approx(0.5 * attn / rate + moved, rel=1e-9)
    # its backward recomputes the scores: 2.5x its forward (FlashAttention-2, Sec. 4.1), 0.5x more than 2x
    assert flash_extra_s == pytest.approx(0.25 * attn / rate, rel=1e-9)
    assert unfused_extra_s == 0.0  # unfused: the s x s are read back
    # without roofline: FLOPs / (peak x efficiency), nothing else
    off = dataclasses.replace(dev, roofline=False)
    assert block_forward_time(narrow, off, w, 2048).forward_s == pytest.approx(
        layer_forward_flops(narrow, 2048, 2048) / rate
    )
    assert block_forward_time(wide, off, flash, 2048).backward_extra_s == 0.0  # a probed block's time has it


def test_selective_recompute_runs_the_attention_core_again_and_dp_overlap_hides_the_reduction():
    spec = MODEL_PRESETS["gpt3-175b"]
    cluster = resolve_cluster("dgx-a100-8x80g", nodes=8)
    w = Workload(global_batch=64, seq_len=2048, flash_attention=False)
    layout = Layout(tp=8, pp=8, grad_accum=64)
    t = {rc: estimate(spec, cluster, w, layout, MemoryOptions(recompute=rc)).time.compute_s
         for rc in ("none", "selective", "full")}  # fmt: skip
    assert t["none"] < t["selective"] < t["full"]
    from planner.steptime import estimate_step_time

    dp = Layout(dp=8, tp=8, micro_batch=1, grad_accum=8)
    hidden = estimate_step_time(spec, cluster, w, dp)
    after = estimate_step_time(spec, cluster, w, dp, dp_overlap=0.0)  # reduced after the last backward
    assert after.dp_exposed_s == pytest.approx(after.dp_comm_s) and after.dp_exposed_s > hidden.dp_exposed_s
