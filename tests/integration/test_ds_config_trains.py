"""The emitted ds_config.json trains: real deepspeed.initialize (gloo, one process), one optimizer step.

The plan comes from `make_plan` for a CPU cluster; DeepSpeed builds the optimizer from the
config (torch AdamW: the plan asks for it on CPU, where FusedAdam cannot run), accumulates
the plan's micro-batches and steps once. The result must equal plain PyTorch doing the same
(AdamW, loss / grad_accum, grad-norm clipping at 1.0) exactly, for ZeRO-0 and ZeRO-1.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from planner.cluster import ClusterSpec, DeviceSpec, Link, Links, TierSpec
from planner.emit import write_outputs
from planner.planning import make_plan
from planner.presets import MODEL_PRESETS
from planner.units import GiB
from planner.workload import OptimizerSpec, Workload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEP = r"""
import copy, json, os, sys
import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import deepspeed
import deepspeed.ops

from planner.plan import Plan
from tests.helpers import hf_model

# NOTE: DeepSpeed's CPU comm backend compiles a shared-memory kernel (minutes of C++ build)
# on first use; one process needs only gloo, so it is marked unavailable here.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")

results = {}
for out_dir in sys.argv[2:]:
    plan = Plan.load(os.path.join(out_dir, "plan.json"))
    lay, opt = plan.layout, plan.optimizer.settings
    model = hf_model(plan.model, seed=0)
    ref = copy.deepcopy(model)
    before = copy.deepcopy(model)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=os.path.join(out_dir, "ds_config.json")
    )
    ids = torch.randint(0, plan.model.vocab_size, (plan.workload.global_batch, plan.workload.seq_len),
                        generator=torch.Generator().manual_seed(1))
    mb, ga = lay.micro_batch, lay.grad_accum
    for i in range(ga):
        x = ids[i * mb:(i + 1) * mb]
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    # the reference: plain PyTorch with the plan's hyper-parameters
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                                weight_decay=opt["weight_decay"])
    for i in range(ga):
        x = ids[i * mb:(i + 1) * mb]
        (ref(input_ids=x, labels=x).loss / ga).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    pairs = list(zip(engine.module.parameters(), ref.parameters()))
    results[out_dir] = {
        "zero_stage": engine.zero_optimization_stage(),
        "train_batch_size": engine.train_batch_size(),
        "optimizer": type(engine.optimizer).__name__,
        "equal": all(torch.equal(a, b) for a, b in pairs),
        "changed": any(not torch.equal(a, b) for a, b in zip(engine.module.parameters(), before.parameters())),
        "steps": engine.global_steps,
    }
print("RESULT " + json.dumps(results))
"""


def cpu_cluster() -> ClusterSpec:
    return ClusterSpec(
        name="cpu-1",
        nodes=1,
        devices_per_node=1,
        device=DeviceSpec(kind="cpu", memory=4 * GiB, peak_flops={"fp32": 1e11}),
        links=Links(intra_node=Link(bandwidth=1e10), inter_node=Link(bandwidth=1e9)),
        host=(TierSpec(kind="dram", capacity=8 * GiB, read_bandwidth=1e10, write_bandwidth=1e10),),
    )


@pytest.mark.integration
def test_emitted_ds_config_trains_one_step(tmp_path):
    w = Workload(
        global_batch=4, seq_len=64, dtype="fp32", optimizer=OptimizerSpec(lr=1e-3, weight_decay=0.01)
    )
    plan = make_plan(MODEL_PRESETS["tiny-llama"], cpu_cluster(), w).plan
    assert plan.layout.zero_stage == 0 and plan.layout.grad_accum * plan.layout.micro_batch == 4
    dirs = []
    for zero in (0, 1):
        variant = plan.replace(layout=dataclasses.replace(plan.layout, zero_stage=zero))
        out = tmp_path / f"zero{zero}"
        write_outputs(variant, out)
        dirs.append(str(out))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571", "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}  # fmt: skip
    script = tmp_path / "step.py"
    script.write_text(STEP)
    proc = subprocess.run(
        [sys.executable, str(script), ROOT, *dirs],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT ") :])
    for zero, d in enumerate(dirs):
        r = results[d]
        assert r["zero_stage"] == zero
        assert r["train_batch_size"] == 4
        assert r["steps"] == 1  # one optimizer step after grad_accum micro-batches
        assert r["changed"] and r["equal"], r
    assert results[dirs[1]]["optimizer"] == "DeepSpeedZeroOptimizer"
