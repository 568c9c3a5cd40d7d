"""`Trainer.train()` with `MemtierCallback`: the losses of the same run without it, with activations swapped,
the chunked loss and the optimizer offloaded (a LoRA model, CPU, a few steps)."""

from __future__ import annotations

import pytest
import torch

from offload.hf_trainer import PLAN_ENV, MemtierCallback
from planner.budget import plan_for_budget
from planner.errors import SpecError
from planner.model import ModelSpec
from planner.workload import Workload
from tests.helpers import hf_model
from tests.integration.helpers import cpu_cluster

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SPEC = ModelSpec(name="t-llama-trainer", family="llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=4,
                 ffn_hidden_size=352, vocab_size=512, max_position_embeddings=256)  # fmt: skip
BATCH, SEQ, STEPS = 4, 128, 3
LORA = Workload(global_batch=BATCH, micro_batch=BATCH, seq_len=SEQ, dtype="fp32", lora_rank=8)


@pytest.fixture(scope="module")
def plan():
    cluster = cpu_cluster(1)
    keep = plan_for_budget(SPEC, cluster, LORA, budget_bytes=1 << 40).plan
    budget = int(0.6 * keep.predicted.peak_bytes)
    return plan_for_budget(SPEC, cluster, LORA, budget_bytes=budget, optimizer_offload=True).plan


class _Losses(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def _train(tmp_path, callbacks, batch: int = BATCH) -> tuple[list[float], transformers.Trainer]:
    torch.set_num_threads(1)
    model = peft.get_peft_model(hf_model(SPEC), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, SPEC.vocab_size, (BATCH * STEPS, SEQ), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x.clone()} for x in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", max_steps=STEPS,
        per_device_train_batch_size=batch, learning_rate=1e-3, logging_steps=1, seed=0, disable_tqdm=True,
        max_grad_norm=1.0,
    )  # fmt: skip
    log = _Losses()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[log, *callbacks])
    trainer.train()
    return log.losses, trainer


def test_trainer_with_the_callback_gives_the_same_losses(plan, tmp_path):
    assert plan.optimizer.offload and plan.loss.kind == "chunked"
    expected, _ = _train(tmp_path / "ref", [])
    callback = MemtierCallback(plan)
    got, trainer = _train(tmp_path / "memtier", [callback])
    assert len(got) == STEPS
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert callback.swap_stats.bytes_swapped > 0 and callback.swap_stats.bytes_fetched > 0
    assert type(callback.offloaded_optimizer).__name__ == "OffloadedAdamW"
    # undone at the end: the torch optimizer back in accelerate's wrapper, the Trainer's clipping restored
    assert isinstance(trainer.optimizer.optimizer, torch.optim.AdamW) and trainer.args.max_grad_norm == 1.0
    assert callback.handle is None


def test_plan_from_the_environment(plan, tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    plan.save(str(path))
    monkeypatch.setenv(PLAN_ENV, str(path))
    assert MemtierCallback().plan == plan
    monkeypatch.delenv(PLAN_ENV)
    with pytest.raises(SpecError, match=PLAN_ENV):
        MemtierCallback()


def test_a_trainer_batch_other_than_the_plans_is_refused(plan, tmp_path):
    callback = MemtierCallback(plan)
    with pytest.raises(SpecError, match=r"per_device_train_batch_size\(2\) != the plan's 4"):
        _train(tmp_path, [callback], batch=2)
    callback.remove()
