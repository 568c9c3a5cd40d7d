"""LoRA in the cost models: trainable parameters, saved activations, step time, refusals, the CLI flags."""

from __future__ import annotations

import pytest
import torch
import transformers

from launch.cli import main
from planner.errors import SpecError
from planner.lora import check_lora, frozen_weight_grad_flops, saved_elems_change, trainable_params
from planner.memory import MemoryOptions, block_saved_bytes, estimate_memory, model_states
from planner.model import ModelSpec, to_hf_config_dict
from planner.plan import Layout
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.steptime import estimate_step_time
from planner.trace import trace_module
from planner.workload import OptimizerSpec, Workload

peft = pytest.importorskip("peft")

SPEC = ModelSpec(name="t-llama-lora", family="llama", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2,
                 ffn_hidden_size=176, vocab_size=256, max_position_embeddings=128)  # fmt: skip
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SETS = [("q_proj", "v_proj"), ALL, ("o_proj",), ("down_proj",), ("gate_proj", "k_proj")]


def _lora(targets: tuple[str, ...], rank: int = 8, **kw) -> Workload:
    return Workload(global_batch=1, seq_len=32, dtype="fp32", lora_rank=rank, lora_targets=targets, **kw)


def _peft_on_meta(spec: ModelSpec, targets: tuple[str, ...], rank: int = 8):
    d = to_hf_config_dict(spec)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
        return peft.get_peft_model(
            model, peft.LoraConfig(r=rank, target_modules=list(targets), lora_dropout=0.0)
        )


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
def test_trainable_params_match_peft(targets):
    model = _peft_on_meta(SPEC, targets)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_params(SPEC, _lora(targets)) == trained


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
def test_saved_activations_match_the_meta_trace(targets):
    """A block's saved bytes under LoRA (frozen base weights) = the meta-device trace of the PEFT model
    (block 1: block 0's input needs no gradient, so it saves less; the model counts it like the others)."""
    tokens = 32
    trace = trace_module(_peft_on_meta(SPEC, targets), {"input_ids": torch.zeros(1, tokens, dtype=torch.long,
                                                                                  device="meta")})  # fmt: skip
    traced = trace.module("base_model.model.model.layers.1").saved_bytes
    w = _lora(targets)
    assert block_saved_bytes(SPEC, w, micro_batch=1) == traced
    full = block_saved_bytes(SPEC, w.replace(lora_rank=0), micro_batch=1)
    assert full - traced == -sum(saved_elems_change(SPEC, w)) * tokens * 4


def test_model_states_count_only_the_adapters():
    w = _lora(("q_proj", "v_proj"))
    n = trainable_params(SPEC, w)
    st = model_states(SPEC, w, Layout())
    assert st.gradients == n * 4  # fp32 gradients of the adapters only
    assert st.optimizer_states == n * 8  # AdamW's two fp32 moments (fp32 weights are their own master)
    assert st.parameters == (SPEC.params + n) * 4  # the frozen base plus the adapters
    full = model_states(SPEC, w.replace(lora_rank=0), Layout())
    assert st.total < full.total


def test_lora_peak_below_full_fine_tuning_on_a_7b():
    spec = MODEL_PRESETS["llama2-7b"]
    w = Workload(global_batch=1, seq_len=2048, lora_rank=16)
    lora = estimate_memory(spec, w, Layout(), MemoryOptions(recompute="full"))
    full = estimate_memory(spec, w.replace(lora_rank=0), Layout(), MemoryOptions(recompute="full"))
    # full fine-tuning: 16 B/param of state (2 + 2 + 12); LoRA: the 16-bit weights and the adapters' few
    assert full.total > 16 * spec.params
    assert 2 * spec.params < lora.parameters + lora.gradients + lora.optimizer_states < 2.05 * spec.params
    assert lora.total < full.total / 4


def test_step_time_skips_the_frozen_weight_gradients():
    spec = MODEL_PRESETS["llama2-7b"]
    cluster = resolve_cluster("dgx-a100-8x80g")
    w = Workload(global_batch=8, micro_batch=1, seq_len=2048, lora_rank=16)
    lay = Layout(dp=8, micro_batch=1)
    lora = estimate_step_time(spec, cluster, w, lay)
    full = estimate_step_time(spec, cluster, w.replace(lora_rank=0), lay)
    # the matmuls dominate: backward ~1x forward for frozen weights, so compute ~2/3 of full fine-tuning's
    assert 0.6 < lora.compute_s / full.compute_s < 0.75
    assert lora.optimizer_s < full.optimizer_s / 100 and lora.dp_comm_s < full.dp_comm_s / 100
    tokens = 2048
    assert frozen_weight_grad_flops(spec, w, tokens) > 0
    assert frozen_weight_grad_flops(spec, w.replace(lora_rank=0), tokens) == 0


def test_refusals_name_the_field():
    with pytest.raises(SpecError, match="lora_targets") as err:
        check_lora(SPEC, _lora(("qkv",)))
    assert err.value.field == "lora_targets"
    with pytest.raises(SpecError, match="galore") as err:
        check_lora(SPEC, _lora(("q_proj",), optimizer=OptimizerSpec(kind="galore")))
    assert err.value.field == "optimizer"
    check_lora(SPEC, _lora(("q_proj",)))  # fine


def test_cli_estimate_and_plan_take_lora_flags(capsys, tmp_path):
    argv = ["--model", "tiny-llama", "--cluster", "dgx-a100-8x80g", "--global-batch", "8", "--seq", "128"]
    assert main(["estimate", *argv, "--json"]) == 0
    full = capsys.readouterr().out
    assert main(["estimate", *argv, "--json", "--lora-rank", "16", "--lora-targets", "q_proj,v_proj"]) == 0
    lora = capsys.readouterr().out
    assert "LoRA r=16 on q_proj,v_proj" in lora and full != lora
    assert main(["plan", *argv, "--lora-rank", "16", "--top", "1", "--out", str(tmp_path / "o")]) == 0
    from planner.plan import Plan

    plan = Plan.load(str(tmp_path / "o" / "plan.json"))
    assert plan.workload.lora_rank == 16 and plan.workload.lora_targets == ("q_proj", "v_proj")
    assert main(["estimate", *argv, "--lora-rank", "16", "--lora-targets", "nope"]) == 2


def test_memtier_trainer_runs_a_data_parallel_lora_plan_and_refuses_it_beside_tp():
    """memtier's trainer wraps the model in PEFT's adapters for a data-parallel LoRA plan
    (tests/integration/test_lora_launch.py runs one); beside tp it refuses it before any rank starts."""
    from launch.train.layouts import refusals
    from planner.plan import Plan
    from tests.integration.helpers import cpu_cluster

    plan = Plan(model=SPEC, cluster=cpu_cluster(2), workload=_lora(("q_proj",)), layout=Layout(dp=2))
    assert refusals(plan) == []
    tp = plan.replace(layout=Layout(tp=2))
    assert "workload.lora_rank" in [name for name, _ in refusals(tp)]
    assert "workload.lora_rank" not in [
        name for name, _ in refusals(tp.replace(workload=tp.workload.replace(lora_rank=0)))
    ]


def test_a_peft_model_traced_on_the_meta_device_gives_spec_and_workload():
    from planner.trace import lora_fields_of, model_spec_of

    model = _peft_on_meta(SPEC, ("v_proj", "q_proj"), rank=4)
    fields = lora_fields_of(model)
    assert fields == {"lora_rank": 4, "lora_targets": ("q_proj", "v_proj")}
    spec = model_spec_of(model, name=SPEC.name)
    assert spec.params == SPEC.params
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_params(spec, Workload(global_batch=1, seq_len=32, **fields)) == trained
    assert lora_fields_of(model.get_base_model()) == {}
