"""A LoRA plan under `memtier launch --plan`: the trainer wraps the built model in PEFT's adapters
(`launch.train.apply.lora_model`) and carries out the plan made for the LoRA run (swap, the chunked loss).
Its losses equal the same LoRA run with nothing of memtier's applied; its predicted peak is within 10% of the
measured one (MemTracker, the trainer's last step) and below the full fine-tuning plan's."""

from __future__ import annotations

import json

import pytest

from planner.budget import plan_for_budget
from planner.model import ModelSpec
from planner.plan import LossPlan
from planner.workload import Workload
from tests.integration.helpers import TRAIN, cpu_cluster, memtier

pytest.importorskip("peft")

# activations dominate (as in tests/offload/test_lora_runtime.py): 4 blocks, batch 4 x 256 tokens
SPEC = ModelSpec(name="t-llama-lora", family="llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=4,
                 ffn_hidden_size=352, vocab_size=512, max_position_embeddings=256)  # fmt: skip
LORA = Workload(global_batch=4, micro_batch=4, seq_len=256, dtype="fp32", lora_rank=8,
                lora_targets=("q_proj", "v_proj"), max_grad_norm=0.0)  # fmt: skip
STEPS = "4"


def _train(tmp_path, plan, name: str) -> dict:
    path = tmp_path / f"{name}.json"
    plan.save(str(path))
    metrics = tmp_path / f"{name}-metrics.json"
    out = memtier(
        "launch", "--plan", str(path), TRAIN, "--steps", STEPS, "--track-memory", "--threads", "1",
        "--metrics-out", str(metrics), timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(metrics.read_text())


@pytest.mark.integration
def test_lora_plan_under_memtier_launch(tmp_path):
    cluster = cpu_cluster(1)
    keep = plan_for_budget(SPEC, cluster, LORA, budget_bytes=1 << 40).plan
    full = plan_for_budget(SPEC, cluster, LORA.replace(lora_rank=0), budget_bytes=1 << 40).plan
    plan = plan_for_budget(SPEC, cluster, LORA, budget_bytes=int(0.6 * keep.predicted.peak_bytes)).plan
    assert plan.loss.kind == "chunked" and any(p.swap_fraction > 0 for p in plan.activations)
    bare = keep.replace(activations=(), loss=LossPlan(), tiers=())  # the LoRA run with nothing of memtier's

    got, ref = _train(tmp_path, plan, "lora"), _train(tmp_path, bare, "bare")
    losses = [loss for _, loss in got["losses"]]
    assert losses == pytest.approx([loss for _, loss in ref["losses"]], rel=1e-5)
    assert got["swap"]["bytes_swapped"] > 0 and got["chunked_loss_calls"] == int(STEPS)
    measured, predicted = got["memory"]["device_peak_bytes"], plan.predicted.peak_bytes
    assert abs(measured / predicted - 1) <= 0.10, (measured, predicted)
    assert predicted < keep.predicted.peak_bytes < full.predicted.peak_bytes
    print(
        f"LoRA under memtier launch: measured peak {measured / 2**20:.2f} MiB, predicted {predicted / 2**20:.2f} MiB"
        f" (keep-all {keep.predicted.peak_bytes / 2**20:.2f}, full fine-tuning {full.predicted.peak_bytes / 2**20:.2f})"
    )
