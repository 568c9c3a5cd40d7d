"""The memory modes (precision, layer-wise updates, low-bit states): state bytes, the 7B-on-24-GB plan, the
Plan fields and what the search may combine them with."""

from __future__ import annotations

import dataclasses

import pytest

from planner.errors import SpecError
from planner.memory import MemoryOptions, estimate_memory, optimizer_state_bytes_per_param
from planner.plan import Layout, OptimizerPlan, Plan
from planner.planning import make_plan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.search import SearchSpace
from planner.strategies import OptimizerOffload
from planner.strategy import StrategyInput
from planner.workload import OptimizerSpec, Workload, memory_modes

LLAMA7B = MODEL_PRESETS["llama2-7b"]
GiB = 1 << 30


def _w(**kw) -> Workload:
    opt = kw.pop("optimizer", OptimizerSpec())
    return Workload(global_batch=8, seq_len=2048, optimizer=opt, **kw)


def test_precision_and_state_bits_set_the_bytes_per_parameter() -> None:
    # ZeRO paper K = 12 for mixed-precision Adam; pure bf16 AdamW keeps two bf16 moments (4 B), as torch's
    # AdamW on bf16 parameters does (README "Measured on a GPU")
    assert optimizer_state_bytes_per_param(_w()) == 12
    assert optimizer_state_bytes_per_param(_w(precision="pure")) == 4
    assert optimizer_state_bytes_per_param(_w(dtype="fp32", precision="pure")) == 8  # no master to drop
    eight = optimizer_state_bytes_per_param(
        _w(precision="pure", optimizer=OptimizerSpec(state_bits=8)), LLAMA7B
    )
    four = optimizer_state_bytes_per_param(
        _w(precision="pure", optimizer=OptimizerSpec(state_bits=4)), LLAMA7B
    )
    # bitsandbytes: 1 B + an fp32 absmax per 256 elements, per moment; torchao 4-bit: 0.5 B + 4 B per 128
    assert eight == pytest.approx(2 * (1 + 4 / 256), rel=1e-3)
    assert four == pytest.approx(2 * (0.5 + 4 / 128), rel=1e-3)


def test_galore_optimizer_memory_beside_the_paper() -> None:
    # Zhao et al. 2024 (GaLore), abstract: up to 65.5% less optimizer-state memory than a BF16 baseline, up
    # to 82.5% with 8-bit GaLore; their 7B runs use rank 1024
    base = optimizer_state_bytes_per_param(_w(precision="pure"), LLAMA7B)
    galore = OptimizerSpec(kind="galore", rank=1024)
    bf16 = optimizer_state_bytes_per_param(_w(precision="pure", optimizer=galore), LLAMA7B)
    int8 = optimizer_state_bytes_per_param(
        _w(precision="pure", optimizer=dataclasses.replace(galore, state_bits=8)), LLAMA7B
    )
    assert 1 - bf16 / base == pytest.approx(0.655, abs=0.02)
    assert 1 - int8 / base == pytest.approx(0.825, abs=0.04)


def test_layerwise_frees_the_gradients_of_the_step() -> None:
    layout = Layout(micro_batch=8)
    opts = MemoryOptions(recompute="full")
    whole = estimate_memory(LLAMA7B, _w(precision="pure", micro_batch=8), layout, opts)
    lw = estimate_memory(
        LLAMA7B, _w(precision="pure", micro_batch=8, layerwise=True, max_grad_norm=0), layout, opts
    )
    assert lw.gradients < 0.02 * whole.parameters
    assert whole.total - lw.total > 0.9 * whole.parameters  # the bf16 gradients (as large as the weights)


def test_galore_recipe_fits_7b_on_a_24gb_gpu() -> None:
    cluster = resolve_cluster("rtx4090-nvme")
    w = _w(precision="pure", layerwise=True, max_grad_norm=0, micro_batch=8,
           optimizer=OptimizerSpec(kind="galore", rank=128, state_bits=8))  # fmt: skip
    result = make_plan(LLAMA7B, cluster, w, space=SearchSpace(micro_batch=8), time_limit_s=2, mapping_top=0)
    assert result.memory.total <= 0.95 * 24 * GiB  # the card's 24 GiB less the 5% headroom
    assert result.memory.gradients < GiB and result.memory.optimizer_states < 2 * GiB
    opt = result.plan.optimizer
    assert (opt.precision, opt.layerwise, opt.state_bits, opt.max_grad_norm) == ("pure", True, 8, 0.0)
    assert not opt.offload


def test_plain_adamw_without_offload_does_not_fit_and_says_what_it_needs() -> None:
    # AdamW's leanest device-resident mode: pure bf16, 8-bit moments, layer-wise, every block recomputed
    w = _w(precision="pure", layerwise=True, max_grad_norm=0, micro_batch=8,
           optimizer=OptimizerSpec(state_bits=8))  # fmt: skip
    mem = estimate_memory(LLAMA7B, w, Layout(micro_batch=8), MemoryOptions(recompute="full"))
    # bf16 weights 12.6 GiB + two 8-bit moments 12.8 GiB + recomputed blocks' inputs: above 24 GiB
    assert 28 * GiB < mem.total < 36 * GiB
    assert mem.optimizer_states == pytest.approx(LLAMA7B.params * 2 * (1 + 4 / 256), rel=0.01)


def test_host_offload_is_offered_only_for_the_state_it_runs() -> None:
    cluster = resolve_cluster("rtx4090-nvme")

    def applies(w: Workload) -> bool:
        inp = StrategyInput(
            model=LLAMA7B, cluster=cluster, workload=w, layout=Layout(zero_stage=1), budget_bytes=1
        )
        return OptimizerOffload().applies(inp)

    assert applies(_w())
    assert not applies(_w(precision="pure"))
    assert not applies(_w(optimizer=OptimizerSpec(state_bits=8)))


def test_memory_modes_most_exact_first_and_only_what_the_device_runs() -> None:
    w = _w(optimizer=OptimizerSpec(kind="galore"))
    modes = memory_modes(w, precision=("mixed", "pure"), layerwise=(False, True), state_bits=(0, 8, 4),
                         device_kind="rtx4090")  # fmt: skip
    assert len(modes) == 12 and modes[0] == w
    assert all(m.max_grad_norm == 0 for m in modes if m.layerwise)
    on_cpu = memory_modes(
        w, precision=("mixed",), layerwise=(False,), state_bits=(0, 8, 4), device_kind="cpu"
    )
    assert [m.optimizer.state_bits for m in on_cpu] == [0, 8]  # torchao's 4-bit AdamW needs CUDA
    fp32 = memory_modes(w.replace(dtype="fp32"), precision=("mixed", "pure"), layerwise=(False,),
                        state_bits=(0,), device_kind="cpu")  # fmt: skip
    assert len(fp32) == 1


def test_plan_carries_the_modes_and_old_plans_load(tmp_path) -> None:
    with pytest.raises(SpecError, match="clipping"):
        OptimizerPlan(layerwise=True, max_grad_norm=1.0)
    plan = Plan(model=MODEL_PRESETS["tiny-llama"], cluster=resolve_cluster("rtx4090-nvme"),
                workload=_w(precision="pure", layerwise=True, max_grad_norm=0),
                optimizer=OptimizerPlan(precision="pure", layerwise=True, state_bits=8, max_grad_norm=0))  # fmt: skip
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    old = plan.to_dict()
    old["schema_version"] = "1.1"
    for key in ("precision", "layerwise", "state_bits"):
        del old["optimizer"][key]
    del old["workload"]["precision"], old["workload"]["layerwise"], old["workload"]["optimizer"]["state_bits"]
    old["workload"]["max_grad_norm"] = old["optimizer"]["max_grad_norm"] = 1.0
    loaded = Plan.from_dict(old)
    assert (loaded.optimizer.precision, loaded.optimizer.layerwise, loaded.optimizer.state_bits) == (
        "mixed",
        False,
        0,
    )
