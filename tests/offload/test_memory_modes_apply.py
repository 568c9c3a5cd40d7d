"""The trainer carries out the plan's memory modes (launch.train.apply): pure bf16 parameters, layer-wise
updates in backward, 8-bit states; modes it cannot run are refused naming the plan field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from launch.train.apply import apply_plan
from launch.train.config import Settings, TrainConfigError
from planner.plan import Layout, OptimizerPlan, Plan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import OptimizerSpec, Workload
from tests.optim.helpers import llama_batches, llama_loss, make_tiny_llama


def _settings(layout: Layout | None = None, **modes) -> Settings:
    bits = modes.get("state_bits", 0)
    workload = Workload(global_batch=4, seq_len=16, dtype="bf16", precision=modes.get("precision", "mixed"),
                        layerwise=modes.get("layerwise", False), max_grad_norm=0,
                        optimizer=OptimizerSpec(state_bits=bits))  # fmt: skip
    plan = Plan(model=MODEL_PRESETS["tiny-llama"], cluster=resolve_cluster("rtx4090-nvme"), workload=workload,
                layout=layout or Layout(), optimizer=OptimizerPlan(max_grad_norm=0, **modes))  # fmt: skip
    return Settings(spec=plan.model, seq_len=16, micro_batch=4, grad_accum=1, optimizer="adamw",
                    optimizer_settings={}, dtype="bf16", engine="torch", max_grad_norm=0.0, plan=plan,
                    plan_path="plan.json")  # fmt: skip


def test_pure_bf16_layerwise_steps_in_backward() -> None:
    model = make_tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    applied = apply_plan(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                         _settings(precision="pure", layerwise=True))  # fmt: skip
    try:
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # no fp32 master anywhere
        llama_loss(model, llama_batches(1)[0]).backward()
        assert all(p.grad is None for p in model.parameters())  # consumed in backward
        # (an update below a bf16 ulp is lost: norm weights at 1.0 move in steps of 2^-7, not by lr = 1e-3)
        changed = [
            not torch.equal(p.float(), b.bfloat16().float()) for p, b in zip(model.parameters(), before)
        ]
        assert sum(changed) > len(changed) // 2
        applied.optimizer.step()  # the loop's step finds no gradient: nothing more happens
    finally:
        applied.remove()


def test_8bit_states_replace_the_optimizer() -> None:
    pytest.importorskip("bitsandbytes")
    model = make_tiny_llama(hidden=64, ffn=128)
    applied = apply_plan(model, torch.optim.AdamW(model.parameters(), lr=1e-3), _settings(state_bits=8))
    try:
        llama_loss(model, llama_batches(1)[0]).backward()
        applied.optimizer.step()
        states = [v for st in applied.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        assert any(v.dtype == torch.uint8 for v in states)
    finally:
        applied.remove()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_modes_the_trainer_cannot_run_are_refused() -> None:
    model = make_tiny_llama()
    with pytest.raises(TrainConfigError, match="optimizer.state_bits.*CUDA"):
        apply_plan(model, torch.optim.AdamW(model.parameters()), _settings(state_bits=4))
    # layer-wise on several ranks runs on the torch engine (the stepper averages in its hooks), not Accelerate's
    accelerate = dataclasses.replace(_settings(Layout(dp=2), layerwise=True), engine="accelerate")
    with pytest.raises(TrainConfigError, match="optimizer.layerwise"):
        apply_plan(model, torch.optim.AdamW(model.parameters()), accelerate)
