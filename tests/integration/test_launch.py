"""`memtier launch` end to end: torchrun with gloo on CPU, a plan applied by offload.apply in every rank.

The reference run trains tiny-llama on 2 ranks with block 0's activations swapped to the DRAM tier, block 1
recomputed, the chunked loss and the optimizer state offloaded to DRAM; the ranks' parameters must stay bit-identical, and a run whose rank 1 dies
once and is restarted (--max-restarts 1) must end exactly where the reference ends (resume restores model,
optimizer, RNG and data position). DeepSpeed runs the same plan under deepspeed.initialize with the
plan's recompute applied in code.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from launch import run
from planner.plan import ActivationPolicy, Layout
from tests.integration.helpers import SCRIPTS, TRAIN, memtier, small_plan

FAULT = os.path.join(SCRIPTS, "train_fault.py")
POLICIES = (
    ActivationPolicy(layer=0, keep_fraction=0.0, swap_fraction=1.0),
    ActivationPolicy(layer=1, keep_fraction=0.0, recompute_fraction=1.0),
)
COMMON = ("--steps", "4", "--ckpt-every", "2")


def _params(directory, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(directory, f"params-rank{rank}.pt"))


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- the launcher's pieces (no processes) ----------------------------------------------------------


def test_worker_env_follows_the_plans_device_order(tmp_path):
    plan = small_plan(str(tmp_path / "plan.json"), ranks=4)
    plan = plan.replace(
        layout=Layout(dp=4, micro_batch=2, rank_to_device=("n0:d2", "n0:d0", "n0:d3", "n0:d1"))
    )
    spec = run.LaunchSpec(script=TRAIN, plan_path=str(tmp_path / "plan.json"), nproc=4)
    env = run.worker_env(spec, plan, base={}, cuda_devices=4, cores=8)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,0,3,1"
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["MEMTIER_PLAN"] == os.path.abspath(tmp_path / "plan.json")
    assert "CUDA_VISIBLE_DEVICES" not in run.worker_env(spec, plan, base={}, cuda_devices=0, cores=8)
    with pytest.raises(run.LaunchError, match="this node has 2 GPU"):
        run.worker_env(spec, plan, base={}, cuda_devices=2, cores=8)
    assert run.threads_per_rank(4, cores=2) == 1


def test_torchrun_arguments():
    spec = run.LaunchSpec(script=TRAIN, script_args=("--steps", "3"), nproc=2, max_restarts=2)
    args = run.torchrun_args(spec)
    assert args[-3:] == [TRAIN, "--steps", "3"]
    assert "--standalone" in args and args[args.index("--max-restarts") + 1] == "2"
    multi = run.torchrun_args(run.LaunchSpec(script=TRAIN, nproc=2, nnodes=2, rdzv_endpoint="host:29400"))
    assert "--standalone" not in multi and multi[multi.index("--rdzv-endpoint") + 1] == "host:29400"
    with pytest.raises(run.LaunchError, match="--rdzv-endpoint"):
        run.torchrun_args(run.LaunchSpec(script=TRAIN, nproc=2, nnodes=2))


def test_bad_input_exits_2_before_starting_anything(tmp_path):
    small_plan(str(tmp_path / "plan.json"), ranks=2)
    out = memtier("launch", "--nproc", "3", "--plan", str(tmp_path / "plan.json"), TRAIN)
    assert out.returncode == 2
    assert "dp(2)" in out.stderr and "nproc(3)" in out.stderr and str(tmp_path / "plan.json") in out.stderr
    out = memtier("launch", "--plan", str(tmp_path / "missing.json"), TRAIN)
    assert out.returncode == 2 and "missing.json" in out.stderr and "--plan" in out.stderr
    out = memtier("launch", str(tmp_path / "nope.py"))
    assert out.returncode == 2 and "nope.py" in out.stderr


# ---- real runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    small_plan(str(d / "plan.json"), activations=POLICIES, chunked_loss=True, optimizer_offload=True)
    out = memtier(
        "launch", "--nproc", "2", "--plan", str(d / "plan.json"), TRAIN, *COMMON, "--ckpt-dir", str(d / "ckpt"),
        "--save-final-params", str(d / "params"), "--metrics-out", str(d / "metrics.json"), timeout=180,
    )  # fmt: skip
    return d, out


@pytest.mark.integration
def test_two_ranks_train_with_the_plan_and_stay_identical(reference):
    d, out = reference
    assert out.returncode == 0, out.stderr[-3000:]
    assert "all ranks finished" in out.stderr
    _assert_equal(_params(d / "params", 0), _params(d / "params", 1))
    m = json.loads((d / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["engine"] == "torch"
    assert m["swap"]["bytes_swapped"] > 0 and m["swap"]["bytes_fetched"] == m["swap"]["bytes_swapped"]
    assert m["tier_peak_bytes"]["dram"] > 0
    assert m["optimizer_tier_bytes"] == {"dram": 12 * m["params"]}  # fp32 master + 2 moments, all offloaded
    assert m["attention_calls_last_step"] == [1, 2]  # block 1 is recomputed: its forward runs twice
    losses = [loss for _, loss in m["losses"]]
    assert losses[-1] < losses[0]
    assert 0 < m["mfu"] <= m["hfu"] <= 1


@pytest.mark.integration
def test_max_restarts_resumes_exactly(reference, tmp_path):
    """Rank 1 dies at step 3 of the first attempt; the restarted group resumes from step 2's checkpoint and
    ends with the reference run's parameters, bit for bit."""
    d, ref = reference
    assert ref.returncode == 0
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, FAULT_RANK="1", FAULT_STEP="3", FAULT_CODE="7", FAULT_FIRST_ATTEMPT_ONLY="1",
               PID_DIR=str(pid_dir))  # fmt: skip
    out = memtier(
        "launch", "--nproc", "2", "--max-restarts", "1", "--plan", str(d / "plan.json"), FAULT, *COMMON,
        "--ckpt-dir", str(tmp_path / "ckpt"), "--save-final-params", str(tmp_path / "params"), env=env, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "step 2, data position" in out.stderr
    assert {p.name for p in pid_dir.iterdir()} >= {"0.0.pid", "1.0.pid", "0.1.pid", "1.1.pid"}
    for r in (0, 1):
        _assert_equal(_params(tmp_path / "params", r), _params(d / "params", r))


@pytest.mark.integration
def test_deepspeed_engine_applies_the_plans_recompute(tmp_path):
    plan = tmp_path / "plan.json"
    both = tuple(ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0) for i in (0, 1))
    small_plan(str(plan), activations=both, zero_stage=2, engine="deepspeed")
    out = memtier(
        "launch", "--nproc", "2", "--engine", "deepspeed", "--plan", str(plan), TRAIN, "--steps", "3",
        "--save-final-params", str(tmp_path / "params"), "--metrics-out", str(tmp_path / "m.json"), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((tmp_path / "ds_config.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 2
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["engine"] == "deepspeed"
    assert m["attention_calls_last_step"] == [2, 2]  # recomputed in backward: the checkpointing is real
    _assert_equal(_params(tmp_path / "params", 0), _params(tmp_path / "params", 1))


def _train_lm_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_lm_under_test", TRAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("optimizer", ["galore", "frugal"])
def test_train_lm_optimizers_in_process(tmp_path, optimizer):
    """The example trains with each optimizer it offers (one process, no plan): the loss falls."""
    train_lm = _train_lm_module()
    metrics = tmp_path / "m.json"
    code = train_lm.main(
        ["--model", "tiny-llama", "--seq", "64", "--micro-batch", "2", "--steps", "4", "--optimizer", optimizer,
         "--rank", "8", "--lr", "3e-3", "--metrics-out", str(metrics)]
    )  # fmt: skip
    assert code == 0
    m = json.loads(metrics.read_text())
    assert m["optimizer"] == optimizer and m["world_size"] == 1
    losses = [loss for _, loss in m["losses"]]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("plan_kw", "layout", "field"),
    [
        ({}, {"dp": 1, "cp": 2}, "layout.cp"),
        ({}, {"dp": 1, "pp": 2, "stage_layers": (1, 1)}, "layout.grad_accum"),  # 1F1B: >= pp micro-batches
        ({"engine": "deepspeed"}, {"dp": 1, "tp": 2}, "layout.tp"),
        (
            {},
            {"dp": 1, "tp": 2, "vocab_parallel": True},
            "layout.vocab_parallel",
        ),  # head whole on every tp rank
        (
            {},
            {"dp": 1, "pp": 2, "grad_accum": 2, "stage_layers": (1, 1), "sequence_parallel": True},
            "layout.sequence_parallel",
        ),  # tokens split over tp ranks, without tp
    ],
)
def test_launch_refuses_a_layout_the_trainer_cannot_run(tmp_path, plan_kw, layout, field):
    """A plan is a promise: a layout (or a part of the plan beside it) memtier's trainer cannot carry out is
    refused before any rank starts (exit 2, the field named), never run another way."""
    import dataclasses

    plan = small_plan(str(tmp_path / "plan.json"), **{"ranks": 2, **plan_kw})
    plan.replace(layout=dataclasses.replace(plan.layout, **layout)).save(str(tmp_path / "plan.json"))
    nproc = str(plan.cluster.world_size)
    out = memtier("launch", "--nproc", nproc, "--plan", str(tmp_path / "plan.json"), TRAIN)
    assert out.returncode == 2 and field in out.stderr and "--data-parallel-only" in out.stderr, out.stderr


def test_launch_refuses_an_engine_the_plan_did_not_choose(tmp_path):
    small_plan(str(tmp_path / "plan.json"), ranks=1)
    out = memtier("launch", "--engine", "deepspeed", "--plan", str(tmp_path / "plan.json"), TRAIN)
    assert out.returncode == 2 and "--engine" in out.stderr and "layout.engine is 'torch'" in out.stderr


def test_train_lm_rejects_overrides_of_the_plan(tmp_path):
    train_lm = _train_lm_module()
    small_plan(str(tmp_path / "plan.json"), ranks=1)
    with pytest.raises(train_lm.TrainConfigError, match="--seq"):
        train_lm.main(["--plan", str(tmp_path / "plan.json"), "--seq", "32"])


def test_auto_plan_for_a_budget(tmp_path):
    """`--auto` plans for the cluster (here a YAML; 'local' is this machine's probe) and the per-rank budget."""
    from planner.cluster import cluster_to_yaml
    from planner.plan import load_plan
    from tests.integration.helpers import cpu_cluster

    yaml_path = tmp_path / "cluster.yaml"
    yaml_path.write_text(cluster_to_yaml(cpu_cluster(1)))
    roomy = run.auto_plan(model="llama-20m", seq=256, micro_batch=4, nproc=2, budget=None,
                          out_dir=str(tmp_path / "roomy"), cluster_arg=str(yaml_path))  # fmt: skip
    plan = load_plan(roomy)
    assert plan.layout.dp == 2 and plan.layout.world_size == 2 and not plan.activations
    budget = plan.predicted.peak_bytes // 2
    tight = load_plan(run.auto_plan(model="llama-20m", seq=256, micro_batch=4, nproc=2, budget=budget,
                                    out_dir=str(tmp_path / "tight"), cluster_arg=str(yaml_path)))  # fmt: skip
    assert tight.predicted.peak_bytes <= budget and tight.activations


def test_layerwise_updates_on_two_ranks_equal_one_process(tmp_path):
    """Layer-wise AdamW (each parameter stepped in its gradient hook, `optim.LayerwiseStepper`) on 2 data-
    parallel ranks: the stepper averages each gradient over the ranks in its hook (no DDP around the model),
    so the losses and the parameters equal one process stepping the same global batch layer-wise."""
    import dataclasses

    def layerwise(path: str, ranks: int, micro_batch: int) -> None:
        plan = small_plan(path, ranks=ranks, micro_batch=micro_batch)
        opt = dataclasses.replace(plan.optimizer, layerwise=True, max_grad_norm=0.0)
        plan.replace(optimizer=opt).save(path)

    results = []
    for name, ranks, mb in (("one", 1, 4), ("two", 2, 2)):
        path, metrics, params = (str(tmp_path / f"{name}{x}") for x in (".json", "-m.json", "-params"))
        layerwise(path, ranks, mb)
        out = memtier(
            "launch", "--nproc", str(ranks), "--plan", path, TRAIN, "--steps", "5", "--metrics-out", metrics,
            "--save-final-params", params,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        with open(metrics) as fh:
            losses = [loss for _, loss in json.load(fh)["losses"]]
        state = {}
        for f in sorted(os.listdir(params)):
            state.update(torch.load(os.path.join(params, f)))
        results.append((losses, state))
    (one_losses, one_params), (two_losses, two_params) = results
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=0)
    for k, ref in one_params.items():
        torch.testing.assert_close(two_params[k], ref, rtol=1e-5, atol=1e-5)
