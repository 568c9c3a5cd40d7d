"""Layout search: heterogeneous links matter, pruning loses nothing, plans fit, infeasible input says why."""

import dataclasses
import itertools
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from launch.cli import main
from planner.cluster import ClusterSpec, CpuSpec, DeviceSpec, Link, Links, TierSpec
from planner.errors import InfeasibleError, LayoutError
from planner.estimate import budget_bytes, validate_layout
from planner.mapping import AnnealSettings
from planner.memory import MemoryOptions, estimate_memory
from planner.model import ModelSpec
from planner.plan import Layout
from planner.planning import make_plan, memory_options
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.search import (
    SearchSpace,
    SearchSpaceError,
    cp_choices,
    micro_batches,
    parallel_shapes,
    search,
    stage_splits,
    zero_choices,
)
from planner.steptime import estimate_step_time
from planner.strategies import (
    ACTIVATION_BASELINES,
    OPTIMIZER_BASELINES,
    KeepAll,
    RecomputeAll,
    RecomputeBlock,
    block_policies,
)
from planner.strategy import Strategy, StrategyInput, peak_memory
from planner.units import GiB
from planner.workload import Workload

HETERO = resolve_cluster("hetero-a100-32")


def _uniform(cluster: ClusterSpec) -> ClusterSpec:
    """The same cluster as a search that trusts the peak figures sees it: no per-link overrides."""
    return dataclasses.replace(cluster, links=dataclasses.replace(cluster.links, overrides=()))


# ---- the acceptance test -------------------------------------------------------------


def test_hetero_links_plan_beats_uniform_assumption_and_mapping_beats_default():
    # layout choice: llama2-13b, where a uniform-links search picks wide data parallelism
    # that crosses the slow inter-rack uplink
    model = MODEL_PRESETS["llama2-13b"]
    w = Workload(global_batch=64, seq_len=4096)
    real = make_plan(model, HETERO, w, seed=0)
    uniform = make_plan(model, _uniform(HETERO), w, seed=0)
    # the uniform-links plan, run on the real links (its own rank order: the default)
    u = uniform.plan
    t_uniform = estimate_step_time(
        model, HETERO, w, u.layout, memory_options(u), swap_exposed_s=uniform.chosen.added_time_s
    ).step_s
    t_real = real.plan.predicted.step_time_s
    ratio = t_uniform / t_real
    # rank mapping: llama3-70b at 16K tokens, where Megatron order sends dp across the racks
    model70, w70 = MODEL_PRESETS["llama3-70b"], Workload(global_batch=32, seq_len=16384)
    real70 = make_plan(model70, HETERO, w70, seed=0, space=SearchSpace(context_parallel=True))  # (costed CP)
    mapping = real70.chosen.mapping
    print(
        f"\nhetero-a100-32, llama2-13b, seq 4096, batch 64:"
        f"\n  real-links plan    {real.chosen.describe()}: {t_real:.3f} s"
        f"\n  uniform-links plan {uniform.chosen.describe()}: {t_uniform:.3f} s on the real links"
        f"\n  predicted ratio {ratio:.3f}x"
        f"\nllama3-70b, seq 16384: searched rank mapping {mapping.gain if mapping else 1:.3f}x over the default order"
    )
    assert ratio > 1.05
    assert mapping is not None and not mapping.is_default and mapping.gain > 1.01
    # the plan's prediction is what the cost model says for its own layout and mapping
    again = estimate_step_time(model70, HETERO, w70, real70.plan.layout, memory_options(real70.plan))
    assert again.step_s == pytest.approx(real70.plan.predicted.step_time_s, rel=1e-9)
    # and its rank order is the one the mapping search found
    assert real70.plan.layout.rank_to_device == tuple(HETERO.device_name(d) for d in mapping.mapping)


# ---- hard constraints, pruning -------------------------------------------------------------


def test_ranked_layouts_respect_hard_constraints():
    model, w = MODEL_PRESETS["llama3-8b"], Workload(global_batch=64, seq_len=4096)
    res = search(model, HETERO, w, budget_bytes=budget_bytes(HETERO, w), mapping_top=0)
    assert len(res.ranked) > 5
    for c in res.ranked:
        validate_layout(model, HETERO, w, c.layout)  # raises LayoutError if not
        assert model.num_heads % c.layout.tp == 0
        assert c.layout.pp == 1 or c.layout.zero_stage <= 1
        assert c.layout.micro_batch * c.layout.dp * c.layout.grad_accum == w.global_batch
        assert c.peak_bytes <= res.budget_bytes
    assert [c.step_s for c in res.ranked] == sorted(c.step_s for c in res.ranked)
    assert res.pruned_by_states > 0 and res.timed >= len(res.ranked)


def test_pruning_finds_the_exhaustive_optimum():
    """Against a brute force that times every (shape, split, ZeRO, placement, micro-batch, policy)."""
    model = MODEL_PRESETS["llama-300m"]
    cluster = resolve_cluster("dgx-a100-8x80g")
    w = Workload(global_batch=32, seq_len=2048)
    budget = 3 * GiB  # the model states of a 300M model (4.8 GB) need ZeRO or offload
    space = SearchSpace()
    res = search(model, cluster, w, budget_bytes=budget, space=space, mapping_top=0)
    best = None
    for dp, tp, pp, cp in parallel_shapes(model, cluster, w, space):
        for (_, split), zero, opt_strategy in itertools.product(
            stage_splits(model, w, pp), zero_choices(space, pp=pp), OPTIMIZER_BASELINES
        ):
            if zero > 0 and dp * cp == 1 and opt_strategy.name == "resident":
                continue
            for mb in micro_batches(w, dp, space):
                layout = Layout(dp=dp, tp=tp, pp=pp, cp=cp, micro_batch=mb, grad_accum=32 // (dp * mb),
                                zero_stage=zero, sequence_parallel=tp > 1, stage_layers=split)  # fmt: skip
                inp = StrategyInput(model=model, cluster=cluster, workload=w, layout=layout, budget_bytes=budget,
                                    options=MemoryOptions(loss_chunk_tokens=space.loss_chunk_tokens))  # fmt: skip
                if not opt_strategy.applies(inp):
                    continue
                opt = opt_strategy.solve(inp)
                for act_strategy in ACTIVATION_BASELINES:
                    a_inp = dataclasses.replace(inp, options=opt.options)
                    if not act_strategy.applies(a_inp):
                        continue
                    act = act_strategy.solve(a_inp)
                    if not (opt.fits and act.fits):
                        continue
                    t = estimate_step_time(model, cluster, w, layout, act.options).step_s
                    best = t if best is None else min(best, t)
    assert best is not None
    assert res.best.step_s == pytest.approx(best, rel=1e-12)
    assert res.pruned_by_states > 0


# ---- splits, context parallel ---------------------------------------------------------------


def test_uneven_splits_cover_every_layer_and_balance_the_head():
    model = MODEL_PRESETS["llama3-8b"]  # 32 blocks, a 128k-vocab head (~1.1 blocks of FLOPs)
    w = Workload(global_batch=64, seq_len=4096)
    for pp in (2, 3, 4, 5, 6, 7):
        splits = dict(stage_splits(model, w, pp))
        for split in splits.values():
            assert len(split) == pp and sum(split) == model.num_layers and min(split) >= 1
        if model.num_layers % pp:
            assert len(splits) >= 2  # the remainder placed more than one way
    splits = dict(stage_splits(model, w, 4))
    assert splits["head"][-1] < splits["even"][-1]
    layout = Layout(dp=1, tp=8, pp=4, micro_batch=1, grad_accum=64)
    even = estimate_step_time(model, HETERO, w, layout)
    head = estimate_step_time(model, HETERO, w, dataclasses.replace(layout, stage_layers=splits["head"]))
    assert head.compute_s < even.compute_s


def test_context_parallel_only_for_long_sequences():
    assert cp_choices(Workload(global_batch=8, seq_len=32768), 32, SearchSpace()) == [
        1
    ]  # the trainer cannot run it
    space = SearchSpace(context_parallel=True)
    assert cp_choices(Workload(global_batch=8, seq_len=4096), 32, space) == [1]
    assert cp_choices(Workload(global_batch=8, seq_len=32768), 32, space) == [1, 2, 4, 8, 16]
    model, w = MODEL_PRESETS["llama3-8b"], Workload(global_batch=16, seq_len=32768)
    res = search(model, HETERO, w, budget_bytes=budget_bytes(HETERO, w), space=space, mapping_top=0)
    assert any(c.layout.cp > 1 for c in res.ranked)


def test_search_space_names_the_field():
    with pytest.raises(SearchSpaceError) as e:
        SearchSpace(micro_batch=0)
    assert e.value.field == "micro_batch"
    with pytest.raises(SearchSpaceError) as e:
        SearchSpace(zero_stages=(4,))
    assert e.value.field == "zero_stages"


# ---- the strategy interface ----------------------------------------------------------------


def test_baselines_are_strategies_and_block_recompute_is_the_fewest_that_fit():
    for strategy in (*OPTIMIZER_BASELINES, *ACTIVATION_BASELINES):
        assert isinstance(strategy, Strategy)
    model, w = MODEL_PRESETS["llama3-8b"], Workload(global_batch=8, seq_len=8192)
    layout = Layout(dp=8, tp=1, pp=1, micro_batch=1, grad_accum=1, zero_stage=3)
    keep = estimate_memory(model, w, layout, MemoryOptions()).total
    full = estimate_memory(model, w, layout, MemoryOptions(recompute="full")).total
    budget = (keep + full) // 2
    inp = StrategyInput(model=model, cluster=HETERO, workload=w, layout=layout, budget_bytes=budget)
    assert not KeepAll().solve(inp).fits and RecomputeAll().solve(inp).fits
    res = RecomputeBlock().solve(inp)
    n = sum(p.recompute_fraction for p in res.options.policies)
    assert res.fits and 0 < n < model.num_layers
    fewer = MemoryOptions(policies=block_policies(model, layout, int(n) - 1))
    assert estimate_memory(model, w, layout, fewer).total > budget


def test_expensive_strategy_runs_on_the_best_layouts_only():
    model, w = MODEL_PRESETS["llama3-8b"], Workload(global_batch=16, seq_len=8192)
    cluster = resolve_cluster("dgx-a100-8x80g")
    budget = 8 * GiB
    # the standard loss: its logits make the budget bind (split by vocabulary over tp, as Megatron's are)
    space = SearchSpace(loss_chunk_tokens=0, vocab_parallel=True)
    base = search(
        model,
        cluster,
        w,
        budget_bytes=budget,
        space=space,
        activation_strategies=(KeepAll(), RecomputeAll()),
        mapping_top=0,
    )
    strategies = (KeepAll(), RecomputeAll(), RecomputeBlock(expensive=True))
    refined = search(
        model,
        cluster,
        w,
        budget_bytes=budget,
        space=space,
        activation_strategies=strategies,
        mapping_top=0,
        refine_top=3,
    )
    top3 = {c.shape for c in base.ranked[:3]}
    assert refined.best.activations.strategy == "recompute_block" and refined.best.shape in top3
    assert refined.best.step_s < base.best.step_s
    for c in refined.ranked:
        if c.shape not in top3:
            assert c.activations.strategy in ("keep_all", "recompute_all")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tp=st.sampled_from([1, 2, 4]),
    pp=st.sampled_from([1, 2, 3, 5]),
    dp=st.sampled_from([1, 2]),
    mb=st.sampled_from([1, 2]),
    m=st.sampled_from([1, 3, 8]),
    zero=st.sampled_from([0, 1, 2, 3]),
    recompute=st.sampled_from(["none", "full"]),
    block=st.integers(0, 4),
)
def test_peak_memory_equals_the_worst_stage(tp, pp, dp, mb, m, zero, recompute, block):
    model = MODEL_PRESETS["llama2-13b"]  # 40 blocks: uneven for pp = 3
    w = Workload(global_batch=dp * mb * m, seq_len=2048)
    for _, split in stage_splits(model, w, pp):
        layout = Layout(
            dp=dp, tp=tp, pp=pp, micro_batch=mb, grad_accum=m, zero_stage=zero, stage_layers=split
        )
        options = MemoryOptions(recompute=recompute)
        assert (
            peak_memory(model, w, layout, options).total == estimate_memory(model, w, layout, options).total
        )
        blocks = MemoryOptions(policies=block_policies(model, layout, block))
        fast = peak_memory(model, w, layout, blocks, same_policy_per_stage=True).total
        assert fast == estimate_memory(model, w, layout, blocks).total


# ---- every recommended plan fits (property) ----------------------------------------------------


@st.composite
def _small_specs(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    kv = draw(st.sampled_from([k for k in (1, 2, 4, 8) if heads % k == 0]))
    head_dim = draw(st.sampled_from([32, 64]))
    family = draw(st.sampled_from(["llama", "gpt2", "gpt"]))
    model = ModelSpec(
        name="random",
        family=family,
        num_layers=draw(st.integers(1, 12)),
        hidden_size=heads * head_dim,
        num_heads=heads,
        num_kv_heads=kv if family == "llama" else heads,
        ffn_hidden_size=draw(st.sampled_from([2, 3, 4])) * heads * head_dim,
        vocab_size=draw(st.sampled_from([256, 1000, 8192, 50257])),
        max_position_embeddings=4096,
        gated_mlp=family == "llama",
        norm="rmsnorm" if family == "llama" else "layernorm",
        position="rope" if family == "llama" else "learned",
    )
    intra = draw(st.floats(1e9, 300e9))
    cluster = ClusterSpec(
        name="random",
        nodes=draw(st.integers(1, 3)),
        devices_per_node=draw(st.sampled_from([1, 2, 4])),
        device=DeviceSpec(
            kind="gpu", memory=draw(st.integers(32 << 20, 2 << 30)), peak_flops={"bf16": 100e12}
        ),
        links=Links(
            intra_node=Link(bandwidth=intra), inter_node=Link(bandwidth=draw(st.floats(0.5e9, 50e9)))
        ),
        host=(
            TierSpec(
                kind="dram",
                capacity=draw(st.integers(1 << 30, 1 << 40)),
                read_bandwidth=50e9,
                write_bandwidth=50e9,
            ),
        ),  # fmt: skip
        cpu=CpuSpec(),
    )
    w = Workload(
        global_batch=draw(st.sampled_from([1, 2, 4, 8, 12, 16])),
        seq_len=draw(st.sampled_from([256, 1024, 4096])),
        headroom=draw(st.sampled_from([0.0, 0.05, 0.2])),
    )
    return model, cluster, w


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=_small_specs(), seed=st.integers(0, 3))
def test_no_recommended_plan_exceeds_device_memory(specs, seed):
    model, cluster, w = specs
    have = budget_bytes(cluster, w)
    try:
        result = make_plan(model, cluster, w, seed=seed, mapping_top=2, anneal=AnnealSettings(iterations=40))
    except InfeasibleError as e:
        event("infeasible")
        assert e.need_bytes > e.have_bytes == have
        return
    except LayoutError as e:
        event("no parallel shape")  # e.g. a global batch smaller than any data-parallel size
        assert e.field == "global_batch" and f"world_size({cluster.world_size})" in str(e)
        return
    event(f"feasible, {result.chosen.activations.strategy}, opt {result.chosen.optimizer.strategy}")
    plan = result.plan
    # re-cost the plan as the runtime will read it: its layout, per-layer policies and offload
    mem = estimate_memory(model, plan.workload, plan.layout, memory_options(plan))
    assert mem.total == plan.predicted.peak_bytes <= have
    for cand in result.search.ranked:
        assert estimate_memory(model, w, cand.layout, cand.options).total <= have
    validate_layout(model, cluster, w, plan.layout)
    assert len(plan.activations) == model.num_layers


# ---- infeasible input ---------------------------------------------------------------------------


def test_infeasible_reports_shortfall_and_alternatives():
    # 1T parameters: 250 GB of bf16 weights per GPU even fully sharded over 8 (gpt3-175b now fits one
    # node with ZeRO-3 and the optimizer offloaded, its gradients leaving the device as they complete)
    model = MODEL_PRESETS["megatron-1t"]
    cluster = resolve_cluster("dgx-a100-8x80g")
    w = Workload(global_batch=8, seq_len=2048)
    with pytest.raises(InfeasibleError) as e:
        make_plan(model, cluster, w)
    err = e.value
    assert err.need_bytes > err.have_bytes == budget_bytes(cluster, w)
    assert "needs" in str(err) and "optimizer offload" in str(err)
    more = [a for a in err.alternatives if a.startswith("more devices")]
    assert more, err.alternatives
    nodes = int(more[0].split(":")[1].split()[0])
    # the alternative really fits
    make_plan(model, cluster.with_nodes(nodes), w, mapping_top=0)


def test_cli_plan_infeasible_exits_3(capsys):
    # SGD: the model state cannot stream from the host tiers (planner.model_state runs AdamW only), so nothing
    # fits one 24 GiB device (with AdamW it streams: tests/planner/test_model_state.py)
    code = main(
        ["plan", "--model", "llama3-70b", "--cluster", "rtx4090-nvme", "--global-batch", "8", "--seq", "4096",
         "--optimizer", "sgd"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3
    assert "infeasible" in err and "needs" in err and "more devices" in err and "Traceback" not in err


def test_cli_plan_batch_too_small_exits_2(capsys):
    # 2 layers and 4 heads cannot take 32 devices without dp >= 4 > global batch 2
    argv = [
        "plan",
        "--model",
        "tiny-llama",
        "--cluster",
        "hetero-a100-32",
        "--global-batch",
        "2",
        "--seq",
        "128",
    ]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "global_batch(2)" in err and "world_size(32)" in err


def test_cli_plan_bad_budget_exits_2(capsys):
    code = main(["plan", "--model", "tiny-llama", "--cluster", "dgx-a100-8x80g", "--budget", "lots"])
    assert code == 2 and "--budget" in capsys.readouterr().err


def test_cli_plan_engine_and_clipping_flags(capsys, tmp_path):
    argv = ["plan", "--model", "tiny-llama", "--cluster", "dgx-a100-8x80g", "--seq", "128", "--out",
            str(tmp_path)]  # fmt: skip
    assert main([*argv, "--engine", "deepspeed", "--max-grad-norm", "0"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["layout"]["engine"] == "deepspeed" and plan["optimizer"]["max_grad_norm"] == 0.0
    assert plan["optimizer"]["cpu_kernel"] == "torch_fused" and plan["optimizer"]["schedule"] == "cpu"
    assert main(argv) == 0  # the defaults: torch, clipping at 1.0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["layout"]["engine"] == "torch" and plan["optimizer"]["max_grad_norm"] == 1.0
    capsys.readouterr()
    assert main([*argv, "--max-grad-norm", "-1"]) == 2 and "--max-grad-norm" in capsys.readouterr().err


def test_deterministic_for_a_seed():
    model, w = MODEL_PRESETS["llama3-70b"], Workload(global_batch=32, seq_len=16384)
    a = make_plan(model, HETERO, w, seed=7)
    b = make_plan(model, HETERO, w, seed=7)
    assert a.plan.layout == b.plan.layout
    assert a.plan.predicted.step_time_s == b.plan.predicted.step_time_s
    assert [c.describe() for c in a.search.ranked] == [c.describe() for c in b.search.ranked]


def test_interleaved_schedule_is_searched_when_asked_and_wins_where_the_bubble_costs():
    model = MODEL_PRESETS["gpt3-175b"]
    cluster = resolve_cluster("dgx-a100-8x80g", nodes=8)
    w = Workload(global_batch=64, seq_len=2048)
    budget = budget_bytes(cluster, w)
    # as Megatron-LM runs it (the interleaved schedule's home): embeddings and head vocab-parallel
    mega = SearchSpace(vocab_parallel=True)
    plain = search(model, cluster, w, budget_bytes=budget, space=mega).best
    inter_space = SearchSpace(virtual_stages=(1, 2, 4), vocab_parallel=True)
    inter = search(model, cluster, w, budget_bytes=budget, space=inter_space).best
    assert plain is not None and inter is not None
    assert plain.layout.virtual_stages == 1  # DeepSpeed's engine cannot interleave: not by default
    lay = inter.layout
    assert lay.virtual_stages > 1 and inter.step_s < plain.step_s
    # Megatron's constraints: every stage's blocks split into v chunks, micro-batches a multiple of pp
    assert all(n % lay.virtual_stages == 0 for n in lay.stage_layers) and lay.grad_accum % lay.pp == 0
    assert inter.peak_bytes <= budget
    plan = make_plan(model, cluster, w, space=inter_space, mapping_top=0).plan
    assert plan.layout.virtual_stages == lay.virtual_stages
    from planner.emit import launch_script

    script = launch_script(plan)
    chunk = lay.stage_layers[0] // lay.virtual_stages
    assert f"--num-layers-per-virtual-pipeline-stage {chunk}" in script  # DeepSpeed cannot run it: said so


def test_cli_plan_interleave_flag(capsys, tmp_path):
    argv = ["plan", "--model", "gpt3-175b", "--cluster", "dgx-a100-8x80g", "--nodes", "8", "--global-batch", "64",
            "--seq", "2048", "--interleave", "1", "2", "4", "--vocab-parallel", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["layout"]["virtual_stages"] > 1
    with pytest.raises(SystemExit) as bad:  # not a positive count: argparse's usage error
        main([*argv[:-6], "--interleave", "0"])
    assert bad.value.code == 2
