"""Model state placed across device / DRAM / CXL / NVMe and streamed per block (`planner.model_state`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from launch.cli import main
from planner.cluster import TierSpec
from planner.emit import ds_config
from planner.estimate import budget_bytes
from planner.memory import estimate_memory
from planner.model_state import (
    ElementBytes,
    HostTiersShortError,
    StateShortfall,
    StreamedState,
    device_levels,
    device_state_bytes,
    plan_model_state,
    state_groups,
    stream_refusal,
)
from planner.plan import Plan
from planner.planning import make_plan, memory_options, streamed_plan
from planner.presets import resolve_cluster, resolve_model
from planner.units import GiB, fmt_bytes
from planner.workload import OptimizerSpec, Workload

RTX = resolve_cluster("rtx4090-nvme")
W = Workload(global_batch=8, seq_len=2048)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse and error exits
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _bytes_per_kind(workload: Workload) -> dict[str, float]:
    eb = ElementBytes.of(workload)
    return {"params": eb.params, "master": eb.master, "grads": eb.grads, "moments": eb.moments}


@pytest.mark.parametrize("name", ["llama2-13b", "gpt3-175b", "gpt2"])
def test_groups_add_up_to_the_model(name: str) -> None:
    model = resolve_model(name)
    groups = state_groups(model)
    assert groups[0][0] == "rest" and [g for g, _ in groups[1:]] == [
        f"block.{i}" for i in range(model.num_layers)
    ]
    assert sum(n for _, n in groups) == model.params


def test_llama2_13b_plan_streams_and_its_tiers_add_up(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code, out, err = _cli(
        capsys, "plan", "--model", "llama2-13b", "--cluster", "rtx4090-nvme", "--global-batch", "8",
        "--seq", "2048", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    assert "model state streamed" in out
    plan = Plan.load(tmp_path / "plan.json")
    ms, model, w = plan.model_state, plan.model, plan.workload
    assert ms.stream and ms.staging_bytes > 0
    assert sum(g.numel for g in ms.groups) == model.params
    per = _bytes_per_kind(w)
    by_tier = ms.bytes_by_tier(
        param_bytes=w.dtype_bytes, master=w.mixed_precision, moment_bytes=per["moments"]
    )
    assert sum(by_tier.values()) == pytest.approx(model.params * sum(per.values()), abs=len(ms.groups) * 4)
    # every host tier the state uses has a TierPlan that holds it; the host's bytes are what the plan predicts
    for tier, used in by_tier.items():
        if tier == "device":
            continue
        tp = plan.tier(tier)
        assert tp is not None and tp.capacity_bytes >= used
        assert plan.predicted.bytes_by_tier[tier] == used
    assert plan.predicted.peak_bytes <= budget_bytes(plan.cluster, w)
    # re-costed as the runtime reads the plan: the same device peak
    assert estimate_memory(model, w, plan.layout, memory_options(plan)).total == plan.predicted.peak_bytes
    assert len(plan.activations) == model.num_layers  # explicit per-layer policies with buffer offsets
    dram = plan.cluster.tier("dram")
    assert dram is not None and plan.predicted.host_peak_bytes <= dram.capacity
    assert plan.predicted.host_peak_bytes >= ms.staging_bytes + by_tier.get("dram", 0)
    parts = plan.predicted.time_breakdown
    exposed = (
        parts["stream_forward_exposed"] + parts["stream_backward_exposed"] + parts["optimizer_out_of_core"]
    )
    assert plan.predicted.step_time_s == pytest.approx(sum(parts.values()))
    assert exposed > 0 and plan.predicted.tflops_per_device > 0
    assert any("exposed per step" in n for n in plan.notes)


def test_gpt3_175b_mixed_is_short_of_nvme_and_says_by_how_much(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(
        capsys, "plan", "--model", "gpt3-175b", "--cluster", "rtx4090-nvme", "--global-batch", "8",
        "--seq", "2048",
    )  # fmt: skip
    assert code == 3
    assert "does not fit the host tiers" in err and "short by" in err
    assert "--precision pure" in err and "fits" in err and "NVMe drive of at least" in err


def test_gpt3_175b_pure_streams_from_nvme(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    code, out, err = _cli(
        capsys, "plan", "--model", "gpt3-175b", "--cluster", "rtx4090-nvme", "--global-batch", "8",
        "--seq", "2048", "--precision", "any", "--out", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.workload.precision == "pure" and plan.model_state.stream
    assert sum(g.numel for g in plan.model_state.groups) == plan.model.params
    nvme = plan.tier("nvme")
    assert nvme is not None and nvme.capacity_bytes >= plan.predicted.bytes_by_tier["nvme"]
    assert nvme.capacity_bytes <= RTX.tier("nvme").capacity  # type: ignore[union-attr]
    # DeepSpeed's reading of the same plan: ZeRO-3 with parameters and optimizer on the NVMe path
    zero = json.loads((tmp_path / "ds_config.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == "nvme" and zero["offload_param"]["nvme_path"] == nvme.path
    assert zero["offload_optimizer"]["device"] == "nvme"


def test_make_plan_raises_with_the_missing_bytes() -> None:
    model = resolve_model("gpt3-175b")
    with pytest.raises(HostTiersShortError) as e:
        make_plan(model, RTX, W)
    err = e.value
    eb = ElementBytes.of(W)
    # off the device: all but the device's share of the state (at most the rest group and a few blocks)
    assert err.host_need_bytes >= model.params * eb.total - 8 * model.layer_params * eb.params
    assert err.host_need_bytes <= model.params * eb.total
    assert err.host_have_bytes < RTX.tier("dram").capacity + RTX.tier("nvme").capacity  # type: ignore[union-attr]
    assert err.host_short_bytes > 0 and f"short by {fmt_bytes(err.host_short_bytes)}" in str(err)
    # the device's figures, as every InfeasibleError carries them
    assert err.have_bytes == budget_bytes(RTX, W) and err.need_bytes > err.have_bytes
    assert any("pure" in a and "fits" in a for a in err.alternatives)
    # and the pure 16-bit mode fits: 8 B per parameter
    plan = streamed_plan(model, RTX, W.replace(precision="pure"))
    assert plan.model_state.stream and plan.predicted.peak_bytes <= budget_bytes(RTX, W)


def test_big_dram_keeps_everything_in_dram() -> None:
    """The cheapest tier mix that fits: with DRAM for all of it, nothing goes to NVMe, and the device keeps
    as much as it can (the least streaming that fits)."""
    model = resolve_model("llama2-13b")
    big = dataclasses.replace(
        RTX,
        host=(
            TierSpec(kind="dram", capacity=1024 * GiB, read_bandwidth=60e9, write_bandwidth=60e9),
            *[t for t in RTX.host if t.kind != "dram"],
        ),
    )
    plan = streamed_plan(model, big, W)
    tiers = {t for g in plan.model_state.groups for t in g.tiers().values()}
    assert "nvme" not in tiers and "dram" in tiers
    assert plan.tier("nvme") is None
    # the device keeps the parameters of a prefix of blocks (not everything streamed), and DRAM in place of
    # NVMe is never slower
    assert sum(g.params == "device" for g in plan.model_state.groups) >= 1
    small = streamed_plan(model, RTX, W)
    assert plan.predicted.step_time_s <= small.predicted.step_time_s


def test_device_bytes_follow_the_contract() -> None:
    model = resolve_model("llama2-13b")
    eb = ElementBytes.of(W)
    groups = state_groups(model)
    levels = device_levels(model)
    everything = levels[-1]
    params, grads = device_state_bytes(groups, everything, eb, depth=1)
    rest, block = groups[0][1], groups[1][1]
    assert params == 2 * block * eb.params + rest * eb.params  # the pool of 2 blocks + the rest's buffer
    assert grads == max(rest, block) * eb.params  # one group's gradient at a time
    first = levels[0]
    # resident gradients accumulate in the host gradients' dtype (fp32 under mixed precision), as the runtime does
    assert device_state_bytes(groups, first, eb) == (model.params * eb.params, model.params * eb.grads)
    # once the pool is paid for (depth + 1 blocks streamed), each rung holds no more than the one before
    totals = [sum(device_state_bytes(groups, lv, eb)) for lv in levels]
    assert all(b <= a for a, b in zip(totals[3:], totals[4:], strict=False))
    assert totals[-1] == min(totals) and totals[1] < totals[0]


def test_stream_all_streams_every_group_and_a_small_model_fits() -> None:
    model = resolve_model("llama-20m") if _has("llama-20m") else resolve_model("gpt2")
    w = Workload(global_batch=2, seq_len=256)
    plan = streamed_plan(model, RTX, w, stream_all=True)
    assert all(g.params != "device" and g.grads != "device" for g in plan.model_state.groups)
    assert plan.layout.world_size == 1 and plan.layout.zero_stage == 0
    assert plan.model_state.prefetch_depth == 1
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again == plan
    assert ds_config(plan)["zero_optimization"]["stage"] == 3


def _has(name: str) -> bool:
    try:
        resolve_model(name)
    except Exception:
        return False
    return True


def test_streaming_is_refused_where_the_runtime_cannot() -> None:
    assert stream_refusal(RTX, W) is None
    assert stream_refusal(RTX, W.replace(optimizer=OptimizerSpec(kind="galore"))) is not None
    assert stream_refusal(RTX, W.replace(optimizer=OptimizerSpec(state_bits=8))) is not None
    assert stream_refusal(RTX, W.replace(layerwise=True, max_grad_norm=0.0)) is not None
    assert stream_refusal(resolve_cluster("dgx-a100-8x80g"), W) is not None


def test_device_too_small_even_streaming() -> None:
    model = resolve_model("gpt3-175b")
    found = plan_model_state(model, RTX, W.replace(precision="pure"), budget_bytes=1 * GiB, micro_batches=[1])
    assert isinstance(found, StateShortfall) and found.where == "device" and found.short_bytes > 0
    ok = plan_model_state(
        model, RTX, W.replace(precision="pure"), budget_bytes=budget_bytes(RTX, W), micro_batches=[1]
    )
    assert isinstance(ok, StreamedState)


def test_estimate_shows_the_state_per_tier(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(
        capsys, "estimate", "--model", "llama2-13b", "--cluster", "rtx4090-nvme", "--seq", "2048",
        "--global-batch", "8", "--json",
    )  # fmt: skip
    assert code == 0, err
    ms = json.loads(out)["model_state"]
    assert ms["fits"] and ms["device_peak_bytes"] <= budget_bytes(RTX, W)
    model = resolve_model("llama2-13b")
    per = _bytes_per_kind(W)
    for kind, row in ms["state_by_kind"].items():
        assert sum(row.values()) == pytest.approx(model.params * per[kind], abs=len(state_groups(model)))
    assert sum(ms["state_bytes_by_tier"].values()) == pytest.approx(
        sum(sum(r.values()) for r in ms["state_by_kind"].values()), abs=4 * len(state_groups(model))
    )
