"""The chunked loss under a real DeepSpeed ZeRO-3 engine (gloo, one process): ZeRO-3's forward hook hands the
head's output on as a new tensor (`output.detach()` through an autograd function), which the loss once took
for logit soft-capping (issue #20). Three steps give the losses of plain PyTorch with the standard loss."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import copy, json, sys
import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import deepspeed
import deepspeed.ops

from offload.loss import install_chunked_loss
from planner.presets import MODEL_PRESETS
from tests.helpers import hf_model

# NOTE: one process needs only gloo; DeepSpeed's shared-memory CPU comm kernel would be compiled otherwise
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
spec = MODEL_PRESETS["tiny-llama"]
model = hf_model(spec)
ref = copy.deepcopy(model)
handle = install_chunked_loss(model, chunk_size=64)
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
ids = torch.randint(0, spec.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
got, expected = [], []
for _ in range(3):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    got.append(loss.item())
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_opt.step()
    ref_opt.zero_grad()
    expected.append(loss.item())
print("RESULT " + json.dumps({"got": got, "expected": expected, "calls": handle.calls,
                              "zero_stage": engine.zero_optimization_stage()}))
"""


@pytest.mark.integration
def test_chunked_loss_runs_under_a_zero3_engine(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}  # fmt: skip
    script = tmp_path / "zero3.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), ROOT], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    assert r["zero_stage"] == 3 and r["calls"] == 3  # the chunked path computed every loss
    assert r["got"][0] == pytest.approx(r["expected"][0], rel=1e-6)
    # later steps: the same updates, up to fp32 reduction order (ZeRO-3's flattened gradient partitions)
    assert r["got"] == pytest.approx(r["expected"], rel=1e-3)
