"""Buffer offsets in `memtier plan`: the analytic block lifetimes (planner.lifetimes.block_lifetimes)
against a traced HF layer, and the buffer-reuse MIP's offsets and report carried by a plan."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from planner.lifetimes import TraceError, block_lifetimes, live_bytes_peak, load_trace
from planner.mip.buffers import best_fit, check_offsets, solve_buffers
from planner.model import ModelSpec
from planner.plan import ActivationPolicy, Layout, Plan
from planner.planning import buffer_settings, make_plan, with_buffer_offsets
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import Workload

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _by_role(tensors, role):  # type: ignore[no-untyped-def]
    return [t for t in tensors if t.role == role]


def test_analytic_llama_block_matches_the_stored_trace() -> None:
    # the configuration tests/planner/fixtures/make_fixtures.py traced (fp32, eager attention)
    traced = load_trace(os.path.join(FIXTURES, "llama_block_trace.json"))
    cfg = traced.source["config"]
    model = ModelSpec(
        name="fixture",
        family="llama",
        num_layers=1,
        hidden_size=cfg["hidden_size"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=128,
    )
    work = Workload(global_batch=cfg["batch"], seq_len=cfg["seq_len"], dtype="fp32", flash_attention=False)
    paper = block_lifetimes(model, work, micro_batch=cfg["batch"])
    for role in ("saved", "gradient", "output"):
        ours, theirs = _by_role(paper.tensors, role), _by_role(traced.tensors, role)
        assert sorted(t.size_bytes for t in ours) == sorted(t.size_bytes for t in theirs), role
    assert live_bytes_peak(paper.tensors) == live_bytes_peak(traced.tensors)
    assert 0 < paper.forward_ops < paper.total_ops
    assert all(0 <= t.start < t.end <= paper.total_ops for t in paper.tensors)


@pytest.mark.parametrize("name", ["llama2-7b", "mistral-7b", "gpt2", "gpt3-175b"])
def test_analytic_blocks_scale_with_the_layout(name: str) -> None:
    model = MODEL_PRESETS[name]
    work = Workload(global_batch=8, seq_len=1024)
    one = block_lifetimes(model, work, micro_batch=1)
    two = block_lifetimes(model, work, micro_batch=2)
    # flash attention: every activation is per token, so twice the tokens are twice the saved bytes
    saved = [sum(t.size_bytes for t in _by_role(tr.tensors, "saved")) for tr in (one, two)]
    assert saved[1] == 2 * saved[0] > 0
    # tensor parallelism with sequence parallelism splits every saved tensor
    split = block_lifetimes(model, work, micro_batch=1, tp=4, sp=True)
    assert sum(t.size_bytes for t in _by_role(split.tensors, "saved")) <= saved[0] / 4 + 1024
    # the same op sequence, so the same number of tensors
    assert len(one.tensors) == len(two.tensors) == len(split.tensors)


def test_analytic_lifetimes_name_bad_fields() -> None:
    work = Workload(global_batch=8, seq_len=128)
    with pytest.raises(TraceError) as info:
        block_lifetimes(MODEL_PRESETS["tiny-llama"], work, micro_batch=0)
    assert info.value.field == "micro_batch"
    with pytest.raises(ValueError, match="buffer_bytes"):
        ActivationPolicy(layer=0, buffer_offsets=(0, 512), buffer_bytes=(512,))


def test_plan_carries_non_overlapping_buffer_offsets_and_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, cluster = MODEL_PRESETS["llama2-7b"], resolve_cluster("dgx-h100-8")
    plan = make_plan(model, cluster, Workload(global_batch=64, seq_len=4096)).plan
    first = plan.activations[0]
    assert len(plan.activations) == model.num_layers
    assert first.buffer_offsets and len(first.buffer_bytes) == len(first.buffer_offsets)
    # identical layers reuse one answer
    assert all(
        a.buffer_offsets == first.buffer_offsets and a.buffer_bytes == first.buffer_bytes
        for a in plan.activations
    )
    # from the plan alone: a block's saved tensors are all alive when its backward starts,
    # so no two of them may share a byte of the arena
    spans = sorted(zip(first.buffer_offsets, first.buffer_bytes))
    for (o1, b1), (o2, _) in itertools.pairwise(spans):
        assert o1 + b1 <= o2
    reports = [r for r in plan.predicted.solvers if r.problem == "buffers"]
    assert len(reports) == 1
    rep = reports[0]
    assert rep.strategy == "mip" and rep.status in ("optimal", "fallback", "time_limit")
    assert rep.fragmentation is not None and rep.fragmentation >= 1.0
    assert rep.objective >= max(o + b for o, b in spans)  # the arena holds every saved tensor
    # the JSON round trip through planner.schema is exact
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert json.loads(path.read_text())["activations"][0]["buffer_offsets"] == list(first.buffer_offsets)
    # every tensor of the block, not just the saved ones, is placed without overlap
    lay = plan.layout
    trace = block_lifetimes(
        model, plan.workload, micro_batch=lay.micro_batch, tp=lay.tp, sp=lay.sequence_parallel, cp=lay.cp
    )
    sol = solve_buffers(trace.tensors, settings=buffer_settings())
    check_offsets(trace.tensors, sol.offsets, alignment_bytes=512)
    assert tuple(o for t, o in zip(trace.tensors, sol.offsets) if t.role == "saved") == first.buffer_offsets


def test_fragmented_block_is_deterministic_and_never_worse_than_best_fit() -> None:
    # tensor + sequence parallelism: norm tensors shrink by tp, the others do not; best-fit leaves gaps
    model = MODEL_PRESETS["llama2-70b"]
    work = Workload(global_batch=8, seq_len=4096)
    layout = Layout(tp=4, sequence_parallel=True, micro_batch=1)
    policies = (
        ActivationPolicy(layer=0),
        ActivationPolicy(layer=1, keep_fraction=0.0, recompute_fraction=1.0),
    )
    settings = buffer_settings(time_limit_s=0.5)
    a, report = with_buffer_offsets(model, work, layout, policies, settings=settings)
    b, again = with_buffer_offsets(model, work, layout, policies, settings=settings)
    assert a == b and report.objective == again.objective  # the same answer on every run
    assert a[0].buffer_offsets == a[1].buffer_offsets and a[1].recompute_fraction == 1.0
    trace = block_lifetimes(model, work, micro_batch=1, tp=4, sp=True)
    assert report.objective <= best_fit(trace.tensors).arena_bytes
    assert report.fragmentation is not None and report.fragmentation >= 1.0
