"""Emitted configs: DeepSpeed's parser, accelerate's loader, launch.sh's device order, atomic writes."""

import dataclasses
import json
import os
import subprocess
import sys

import pydantic
import pytest
import yaml

from launch.cli import main
from planner.cluster import ClusterSpec, DeviceSpec, Link, Links, TierSpec
from planner.emit import accelerate_config, ds_config, launch_script, node_assignment, write_outputs
from planner.errors import SpecError
from planner.plan import Plan
from planner.planning import make_plan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.search import SearchSpace
from planner.units import GiB
from planner.workload import OptimizerSpec, Workload

HETERO = resolve_cluster("hetero-a100-32")


def cpu_cluster(devices: int = 1) -> ClusterSpec:
    return ClusterSpec(
        name="cpu-test",
        nodes=1,
        devices_per_node=devices,
        device=DeviceSpec(kind="cpu", memory=4 * GiB, peak_flops={"fp32": 1e11}),
        links=Links(intra_node=Link(bandwidth=1e10), inter_node=Link(bandwidth=1e9)),
        host=(TierSpec(kind="dram", capacity=8 * GiB, read_bandwidth=1e10, write_bandwidth=1e10),),
    )


@pytest.fixture(scope="module")
def hetero_plan() -> Plan:
    # the searched mapping moves node blocks: n0, n2, n1, n3 (see test_search)
    # (context parallelism searched too, as it was when these emitter checks were written; the trainer refuses it)
    w = Workload(global_batch=32, seq_len=16384)
    return make_plan(
        MODEL_PRESETS["llama3-70b"], HETERO, w, seed=0, space=SearchSpace(context_parallel=True)
    ).plan


def _variants(plan: Plan) -> list[Plan]:
    """The plan with each ZeRO stage, optimizer offload, fp16 and a pipeline."""
    out = []
    lay = plan.layout
    for zero in (0, 1, 2, 3):
        out.append(plan.replace(layout=dataclasses.replace(lay, zero_stage=zero)))
    out.append(plan.replace(optimizer=dataclasses.replace(plan.optimizer, offload=True, tier="dram")))
    out.append(plan.replace(workload=plan.workload.replace(dtype="fp16")))
    out.append(plan.replace(layout=dataclasses.replace(lay, pp=2, dp=1, stage_layers=(41, 39), zero_stage=1)))
    return out


def test_ds_config_parses_with_deepspeed(hetero_plan, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    for i, plan in enumerate(_variants(hetero_plan)):
        path = tmp_path / f"ds{i}.json"
        path.write_text(json.dumps(ds_config(plan)))
        cfg = DeepSpeedConfig(str(path))
        lay = plan.layout
        assert cfg.zero_optimization_stage == lay.zero_stage
        assert cfg.gradient_accumulation_steps == lay.grad_accum
        assert cfg.train_micro_batch_size_per_gpu == lay.micro_batch
        # one process: DeepSpeed derives the batch from its data-parallel world (here 1)
        assert cfg.train_batch_size == lay.micro_batch * lay.grad_accum
        assert cfg.bfloat16_config.enabled == (plan.workload.dtype == "bf16")
        assert (cfg.zero_config.offload_optimizer is not None) == plan.optimizer.offload
        # only keys DeepSpeed honours for an HF model under ZeRO data parallelism (no PipelineModule, no AutoTP)
        assert not {"pipeline", "tensor_parallel"} & set(ds_config(plan))
    # an unknown ZeRO key is refused by DeepSpeed's parser: the check above is not vacuous
    bad = ds_config(hetero_plan)
    bad["zero_optimization"]["stage_four"] = True
    with pytest.raises(pydantic.ValidationError, match="stage_four"):
        DeepSpeedConfig(bad)


def test_accelerate_yaml_loads_with_accelerate(hetero_plan, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    paths = write_outputs(hetero_plan, tmp_path / "out")
    cfg = load_config_from_file(paths["accelerate.yaml"])
    assert cfg.distributed_type.value == "DEEPSPEED"
    assert cfg.num_processes == 32 and cfg.num_machines == 4
    # the precision lives in ds_config.json only: accelerate 1.x refuses `mixed_precision` beside it
    with open(paths["accelerate.yaml"], encoding="utf-8") as fh:
        assert "mixed_precision" not in yaml.safe_load(fh)
    with open(paths["ds_config.json"], encoding="utf-8") as fh:
        assert json.load(fh)["bf16"]["enabled"] is True
    assert cfg.deepspeed_config["deepspeed_config_file"] == paths["ds_config.json"]
    # accelerate's DeepSpeed plugin reads the emitted DeepSpeed config and agrees on its values
    plugin = DeepSpeedPlugin(hf_ds_config=paths["ds_config.json"])
    assert plugin.zero_stage == hetero_plan.layout.zero_stage
    assert plugin.gradient_accumulation_steps == hetero_plan.layout.grad_accum


def test_launch_script_places_ranks_on_planned_devices(hetero_plan, tmp_path):
    text = launch_script(hetero_plan)
    path = tmp_path / "launch.sh"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    per = HETERO.devices_per_node
    for node_rank, (node, devices) in enumerate(node_assignment(hetero_plan)):
        line = (
            f"  {node}) NODE_RANK={node_rank}; export CUDA_VISIBLE_DEVICES={','.join(map(str, devices))} ;;"
        )
        assert line in text
        # torchrun's rank node_rank * D + local_rank runs on the device the plan gives it
        for local, dev in enumerate(devices):
            assert hetero_plan.layout.rank_to_device[node_rank * per + local] == f"n{node}:d{dev}"
    assert sorted(n for n, _ in node_assignment(hetero_plan)) == [0, 1, 2, 3]
    assert node_assignment(hetero_plan)[1][0] != 1  # the searched mapping is not the default order


def test_node_assignment_refuses_unlaunchable_maps(hetero_plan):
    names = list(hetero_plan.layout.rank_to_device)
    names[7], names[8] = names[8], names[7]  # block 0 now spans two nodes
    bad = hetero_plan.replace(layout=dataclasses.replace(hetero_plan.layout, rank_to_device=tuple(names)))
    with pytest.raises(SpecError, match="span nodes"):
        node_assignment(bad)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_launch_script_runs_torchrun_with_the_planned_order(tmp_path):
    """Real torchrun, one node of two CPU 'devices': each rank sees the plan and its device list."""
    cluster = cpu_cluster(devices=2)
    w = Workload(global_batch=4, seq_len=64, dtype="fp32")
    plan = make_plan(MODEL_PRESETS["tiny-llama"], cluster, w).plan
    plan = plan.replace(layout=dataclasses.replace(plan.layout, rank_to_device=("n0:d1", "n0:d0")))
    paths = write_outputs(plan, tmp_path / "out")
    probe = tmp_path / "probe.py"
    # each rank writes its own file: two ranks printing at once can interleave their lines
    probe.write_text(
        "import json, os, sys\n"
        "keys = ('RANK', 'LOCAL_RANK', 'CUDA_VISIBLE_DEVICES', 'MEMTIER_PLAN')\n"
        "out = os.path.join(sys.argv[1], 'rank' + os.environ['RANK'] + '.json')\n"
        "open(out, 'w').write(json.dumps({k: os.environ[k] for k in keys}))\n"
    )
    env = {
        **os.environ,
        "MASTER_PORT": str(free_port()),
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    proc = subprocess.run(
        ["bash", paths["launch.sh"], "0", str(probe), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    seen = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(s["RANK"] for s in seen) == ["0", "1"]
    for s in seen:
        assert s["CUDA_VISIBLE_DEVICES"] == "1,0" and s["MEMTIER_PLAN"] == paths["plan.json"]


def test_write_outputs_stays_inside_dir_and_round_trips(hetero_plan, tmp_path):
    before = set(os.listdir(tmp_path))
    out = tmp_path / "plan-out"
    paths = write_outputs(hetero_plan, out)
    assert set(os.listdir(tmp_path)) - before == {"plan-out"}
    assert sorted(os.listdir(out)) == [
        "accelerate.yaml",
        "ds_config.json",
        "launch.sh",
        "plan.json",
    ]  # no temp left
    assert Plan.load(paths["plan.json"]) == hetero_plan
    assert os.access(paths["launch.sh"], os.X_OK)
    with open(paths["accelerate.yaml"]) as fh:
        assert yaml.safe_load(fh)["num_processes"] == 32
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SpecError, match="not a directory"):
        write_outputs(hetero_plan, tmp_path / "afile")


def test_low_rank_optimizer_leaves_the_optimizer_to_the_script(hetero_plan):
    plan = hetero_plan.replace(workload=hetero_plan.workload.replace(optimizer=OptimizerSpec(kind="galore")))
    plan = plan.replace(optimizer=dataclasses.replace(plan.optimizer, kind="galore"))
    assert "optimizer" not in ds_config(plan)
    assert accelerate_config(plan, "x.json")["deepspeed_config"]["deepspeed_config_file"] == "x.json"


def test_cli_plan_writes_outputs_and_json(capsys, tmp_path):
    out = tmp_path / "o"
    code = main(["plan", "--model", "llama3-8b", "--cluster", "dgx-a100-8x80g", "--global-batch", "16",
                 "--seq", "2048", "--top", "3", "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert "TFLOP/s" in text and "why #1" in text and "bottleneck" in text
    assert sorted(os.listdir(out)) == ["accelerate.yaml", "ds_config.json", "launch.sh", "plan.json"]
    code = main(["plan", "--model", "llama3-8b", "--cluster", "dgx-a100-8x80g", "--global-batch", "16",
                 "--seq", "2048", "--top", "3", "--json"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and len(data["top"]) == 3
    assert data["chosen"]["layout"] == data["top"][0]["layout"]
    assert Plan.from_dict(data["plan"]).layout.world_size == 8
    assert data["top"][0]["step_s"] <= data["top"][1]["step_s"] <= data["top"][2]["step_s"]


def test_interleaved_plan_at_zero0_keeps_deepspeed_resident_and_says_so(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from deepspeed.runtime.config import DeepSpeedConfig

    # one H100 and Llama-2-7B: interleaved optimizer offload beats resident (does not fit) and full offload
    one = dataclasses.replace(resolve_cluster("dgx-h100-8"), devices_per_node=1)
    plan = make_plan(MODEL_PRESETS["llama2-7b"], one, Workload(global_batch=8, seq_len=2048)).plan
    assert plan.optimizer.offload and plan.optimizer.subgroups and plan.layout.zero_stage == 0
    paths = write_outputs(plan, tmp_path / "out")
    cfg = DeepSpeedConfig(paths["ds_config.json"])
    assert cfg.zero_optimization_stage == 0
    assert cfg.zero_config.offload_optimizer is None  # DeepSpeed cannot interleave; memtier's runtime does
    assert cfg.optimizer_name == "adamw"
    assert cfg.train_micro_batch_size_per_gpu == plan.layout.micro_batch
    # the same plan at ZeRO-1 is an offload DeepSpeed can express: the block is written there
    z1 = plan.replace(layout=dataclasses.replace(plan.layout, zero_stage=1))
    assert ds_config(z1)["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    # a CPU device keeps DeepSpeed's torch Adam when DeepSpeed itself does not offload
    cpu = plan.replace(cluster=dataclasses.replace(plan.cluster, device=cpu_cluster().device))
    assert ds_config(cpu)["optimizer"]["params"]["torch_adam"] is True
    # accelerate and launch.sh stay valid, and launch.sh says who carries out the interleaving
    acc = load_config_from_file(paths["accelerate.yaml"])
    assert acc.distributed_type.value == "DEEPSPEED" and acc.num_processes == 1
    with open(paths["launch.sh"], encoding="utf-8") as f:
        script = f.read()
    assert "interleaved offload" in script and "offload.apply" in script
    assert subprocess.run(["bash", "-n", paths["launch.sh"]], check=False).returncode == 0
    assert Plan.load(paths["plan.json"]) == plan


def test_accelerate_yaml_passes_accelerates_deepspeed_checks(hetero_plan, tmp_path, monkeypatch):
    """What `accelerate launch --config_file` does with the emitted file on GPUs, short of starting processes:
    the launcher's validation, then the fields it exports (ACCELERATE_CONFIG_DS_FIELDS) checked by the
    DeepSpeed plugin each rank builds. A `mixed_precision` beside `deepspeed_config_file` fails there."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin

    def exported_fields(config_file: str) -> str:
        args = launch_command_parser().parse_args(["--config_file", config_file, "train.py"])
        args, defaults, mp_from_config = _validate_launch_command(args)
        assert args.use_deepspeed
        return ",".join([*defaults.deepspeed_config, *(["mixed_precision"] if mp_from_config else [])])

    paths = write_outputs(hetero_plan, tmp_path / "out")
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", exported_fields(paths["accelerate.yaml"]))
    DeepSpeedPlugin(hf_ds_config=paths["ds_config.json"])  # accelerate's _deepspeed_config_checks pass
    with open(paths["accelerate.yaml"], encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh)
    old = tmp_path / "old.yaml"  # what memtier emitted before (issue #20)
    old.write_text(yaml.safe_dump({**cfg, "mixed_precision": "bf16"}))
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", exported_fields(str(old)))
    with pytest.raises(ValueError, match="will be ignored"):
        DeepSpeedPlugin(hf_ds_config=paths["ds_config.json"])
