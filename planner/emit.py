"""Configs a user launches from a Plan: ds_config.json, accelerate.yaml, launch.sh.

- `ds_config.json` for DeepSpeed (keys from its config-json reference; checked by
  `deepspeed.runtime.config.DeepSpeedConfig` in the tests). The batch is given as
  micro-batch and gradient accumulation only: DeepSpeed derives train_batch_size from
  its data-parallel world size, so the same file parses on one process and runs on
  the planned world (micro_batch * grad_accum * dp = global batch). Optimizer offload is
  written as `offload_optimizer` only where DeepSpeed can express it (ZeRO >= 1): an
  interleaved plan at ZeRO-0 (subgroups updated on the CPU or the device, Deep Optimizer
  States) keeps DeepSpeed's optimizer resident, and memtier's runtime (`offload.apply`
  reading plan.json) carries out the interleaving; launch.sh says so in its header.
- `accelerate.yaml` for `accelerate launch --config_file` (DeepSpeed plugin pointing at
  ds_config.json, the precision in that file only; on CPU clusters torchrun's launcher, gloo; loads with
  accelerate's `load_config_from_file` and launches: tests/integration/test_accelerate_launch.py).
- `launch.sh`: one torchrun per node. The plan's rank_to_device puts node-sized blocks
  of logical ranks on physical nodes (`planner.mapping`): the node that hosts block k
  starts with `--node-rank k`, and CUDA_VISIBLE_DEVICES lists its devices in local-rank
  order, so torchrun's rank node_rank * D + local_rank lands on the planned device.

`write_outputs` writes all four files under one directory, each to a temporary name
in that directory and renamed into place (`planner.schema.atomic_write_text`).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from planner.errors import SpecError
from planner.plan import Plan
from planner.schema import atomic_write_text

DEFAULT_PORT = 29500
# DeepSpeed's default reduce/all-gather bucket (5e8 elements), the figure the memory model assumes
BUCKET_ELEMENTS = 500_000_000


def _device_index(name: str) -> tuple[int, int]:
    node, dev = name.split(":")
    return int(node[1:]), int(dev[1:])


def node_assignment(plan: Plan) -> list[tuple[int, list[int]]]:
    """Per node rank k: (physical node, its local devices in local-rank order)."""
    cluster, layout = plan.cluster, plan.layout
    per = cluster.devices_per_node
    names = layout.rank_to_device or tuple(cluster.device_name(r) for r in range(cluster.world_size))
    if len(names) != cluster.world_size:
        raise SpecError(
            f"{len(names)} entries for {cluster.world_size} devices", field="layout.rank_to_device"
        )
    out = []
    for k in range(cluster.nodes):
        block = [_device_index(n) for n in names[k * per : (k + 1) * per]]
        nodes = {n for n, _ in block}
        if len(nodes) != 1:
            raise SpecError(
                f"logical ranks {k * per}..{(k + 1) * per - 1} span nodes {sorted(nodes)}; torchrun cannot"
                " place them",
                field="layout.rank_to_device",
            )
        out.append((block[0][0], [d for _, d in block]))
    if len({n for n, _ in out}) != cluster.nodes:
        raise SpecError("two node blocks on the same node", field="layout.rank_to_device")
    return out


def deepspeed_offloads(plan: Plan) -> bool:
    """Whether DeepSpeed itself offloads the optimizer: it can only with ZeRO >= 1."""
    return plan.optimizer.offload and plan.layout.zero_stage >= 1


def runtime_offloads(plan: Plan) -> bool:
    """An optimizer offload memtier's runtime carries out and ds_config.json cannot express."""
    return plan.optimizer.offload and not deepspeed_offloads(plan)


def stream_offloads(plan: Plan) -> dict[str, Any]:
    """A streamed plan (`Plan.model_state`) as DeepSpeed runs it: ZeRO-3 with the parameters and the optimizer
    offloaded (ZeRO-Infinity, Rajbhandari et al. 2021), to NVMe where the plan puts any of that kind there,
    else to pinned CPU memory. DeepSpeed places a kind in one tier, not per group: the plan's NVMe share
    goes whole to NVMe."""
    groups = plan.model_state.groups
    nvme = plan.tier("nvme")

    def target(kinds: tuple[str, ...]) -> dict[str, Any]:
        if nvme is not None and any(g.tiers()[k] == "nvme" for g in groups for k in kinds):
            return {"device": "nvme", "nvme_path": nvme.path, "pin_memory": True}
        return {"device": "cpu", "pin_memory": True}

    return {
        "stage": 3,
        "offload_param": target(("params",)),
        "offload_optimizer": target(("master", "moments")),
    }


def ds_config(plan: Plan) -> dict[str, Any]:
    layout, workload, opt = plan.layout, plan.workload, plan.optimizer
    zero: dict[str, Any] = {
        "stage": layout.zero_stage,
        "overlap_comm": layout.zero_stage > 0,
        "contiguous_gradients": layout.zero_stage >= 2,
        # DeepSpeed's default buckets (5e8 elements) dwarf a small model: one bucket the size of the model's
        # gradients is DeepSpeed's documented tuning, and the same as the default for models above it
        "reduce_bucket_size": min(BUCKET_ELEMENTS, plan.model.params),
        "allgather_bucket_size": min(BUCKET_ELEMENTS, plan.model.params),
    }
    if plan.model_state.stream:
        zero.update(stream_offloads(plan))
    elif deepspeed_offloads(plan):
        tier = plan.tier(opt.tier)
        if opt.tier == "nvme":
            zero["offload_optimizer"] = {"device": "nvme", "nvme_path": tier.path if tier else None}
        else:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": opt.max_grad_norm,
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
    }
    if workload.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif workload.dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if opt.kind in ("adamw", "sgd"):
        params: dict[str, Any] = {k: opt.settings[k] for k in ("lr", "weight_decay") if k in opt.settings}
        if opt.kind == "adamw":
            params.update({k: opt.settings[k] for k in ("betas", "eps") if k in opt.settings})
            if plan.cluster.device.kind == "cpu" and not (
                deepspeed_offloads(plan) or plan.model_state.stream
            ):
                params["torch_adam"] = True  # DeepSpeed's FusedAdam needs CUDA
        cfg["optimizer"] = {"type": "AdamW" if opt.kind == "adamw" else "SGD", "params": params}
    # other optimizers (GaLore, FRUGAL) come from memtier's optim package as a client optimizer
    recomputed = sum(1 for a in plan.activations if a.recompute_fraction > 0)
    if recomputed:
        cfg["activation_checkpointing"] = {
            "partition_activations": layout.tp > 1,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
            "number_checkpoints": recomputed,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        }
    # No "pipeline" block: DeepSpeed reads it only for a PipelineModule, never for an HF model; no
    # "tensor_parallel": memtier runs DeepSpeed for ZeRO data parallelism only (launch/train/layouts.py refuses
    # tp/pp on that engine; torch's engine runs them), so the config holds the keys that run
    return cfg


def accelerate_config(plan: Plan, ds_config_path: str) -> dict[str, Any]:
    """The accelerate config `accelerate launch --config_file` starts the planned world from.

    On accelerators: DeepSpeed's plugin reading ds_config.json, which carries the precision, so no
    `mixed_precision` beside it (accelerate 1.x refuses a config that sets both). On a CPU cluster: the
    torchrun launcher (`distributed_type: MULTI_GPU`, `use_cpu: false`), the one accelerate path that starts
    `num_processes` processes without mpirun; a script that makes its `Accelerator(cpu=True)` (memtier's
    trainer does, launch/train/engines.py) then runs as one MULTI_CPU gloo group. With `use_cpu: true`
    accelerate 1.x starts a single process unless mpirun is configured (`simple_launcher`), and DeepSpeed's
    launcher expects GPUs, so on CPU the script reads ds_config.json itself.
    """
    cluster = plan.cluster
    common = {
        "compute_environment": "LOCAL_MACHINE",
        "machine_rank": 0,  # per node: `accelerate launch --machine_rank K` (launch.sh's node rank)
        "main_training_function": "main",
        "num_machines": cluster.nodes,
        "num_processes": cluster.world_size,
        "main_process_port": DEFAULT_PORT,
        "rdzv_backend": "static",
        "same_network": True,
        "debug": False,
    }
    if cluster.device.kind == "cpu":
        return {**common, "distributed_type": "MULTI_GPU", "gpu_ids": "all", "use_cpu": False}
    return {
        **common,
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "deepspeed_config_file": ds_config_path,
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": plan.layout.zero_stage == 3,
        },
        "use_cpu": False,
    }


def launch_script(plan: Plan) -> str:
    """A bash script: `launch.sh NODE SCRIPT [ARGS...]`, NODE the physical node index of this host."""
    cluster, layout, pred = plan.cluster, plan.layout, plan.predicted
    assignment = node_assignment(plan)
    per = cluster.devices_per_node
    lines = [
        "#!/usr/bin/env bash",
        f"# memtier plan: {plan.model.name} on {cluster.name} ({cluster.nodes} x {per} {cluster.device.kind})",
        f"# layout {layout.describe()}, stage_layers {list(layout.stage_layers) or 'even'}",
        f"# predicted {pred.step_time_s:.3f} s/step, {pred.tflops_per_device:.1f} TFLOP/s per device,"
        f" MFU {100 * pred.mfu:.1f}%",
        "#",
        "# Run on every node:  ./launch.sh NODE train.py [args...]",
        "#   NODE is this host's physical node index (n0 -> 0, n1 -> 1, ...).",
        "#   MASTER_ADDR must name the host that runs node rank 0"
        + (f" (physical node n{assignment[0][0]})." if cluster.nodes > 1 else "."),
        "# The node rank and the device order below place each logical rank (tp innermost,",
        "# then cp, dp, pp) on the device plan.json's rank_to_device gives it. The training",
        "# script reads the plan from $MEMTIER_PLAN and DeepSpeed's config from $MEMTIER_DS_CONFIG.",
        *(
            [
                f"# optimizer: interleaved offload ({len(plan.optimizer.subgroups)} subgroups,"
                f" {100 * plan.optimizer.device_update_fraction:.1f}% of the elements updated on the device)"
                f" at ZeRO-{layout.zero_stage}:",
                "#   DeepSpeed cannot express it, so ds_config.json keeps the optimizer resident; the training",
                "#   script carries it out with offload.apply(model, optimizer, plan) from $MEMTIER_PLAN.",
            ]
            if runtime_offloads(plan) and not plan.model_state.stream
            else []
        ),
        *(
            [
                "# model state: streamed per block from the host tiers (plan.json's model_state); the training",
                "#   script carries it out with offload.apply(model, optimizer, plan) from $MEMTIER_PLAN;",
                "#   ds_config.json states it as ZeRO-3 with offload_param and offload_optimizer (ZeRO-Infinity).",
            ]
            if plan.model_state.stream
            else []
        ),
        *(
            [
                f"# pipeline: interleaved 1F1B with {layout.virtual_stages} model chunks per device. DeepSpeed's",
                "#   pipeline engine runs plain 1F1B only: use Megatron-LM with --num-layers-per-virtual-pipeline-"
                f"stage {(layout.stage_layers[0] if layout.stage_layers else plan.model.num_layers // layout.pp) // layout.virtual_stages}",
                "#   for the predicted step time (plain 1F1B has a bubble this many times larger).",
            ]
            if layout.virtual_stages > 1
            else []
        ),
        "set -euo pipefail",
        'PLAN_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
    ]
    default = ':-0}"' if cluster.nodes == 1 else ':?usage: launch.sh NODE SCRIPT [ARGS...]}"'
    lines.append(f'NODE="${{1{default}')
    lines.append("if [ $# -gt 0 ]; then shift; fi")
    lines.append('case "$NODE" in')
    for rank, (node, devices) in enumerate(assignment):
        visible = ",".join(str(d) for d in devices)
        lines.append(f"  {node}) NODE_RANK={rank}; export CUDA_VISIBLE_DEVICES={visible} ;;")
    lines.append(
        f'  *) echo "launch.sh: node $NODE is not in this plan (0..{cluster.nodes - 1})" >&2; exit 2 ;;'
    )
    lines.append("esac")
    lines += [
        'export MEMTIER_PLAN="$PLAN_DIR/plan.json"',
        'export MEMTIER_DS_CONFIG="$PLAN_DIR/ds_config.json"',
    ]
    torchrun = [
        "torchrun",
        f"--nnodes={cluster.nodes}",
        f"--nproc-per-node={per}",
        '--node-rank="$NODE_RANK"',
    ]
    if cluster.nodes == 1:
        torchrun += ["--master-addr=127.0.0.1", f'--master-port="${{MASTER_PORT:-{DEFAULT_PORT}}}"']
    else:
        torchrun += [
            '--master-addr="${MASTER_ADDR:?set MASTER_ADDR to the host of node rank 0}"',
            f'--master-port="${{MASTER_PORT:-{DEFAULT_PORT}}}"',
        ]
    lines.append("exec " + " \\\n  ".join(torchrun) + ' \\\n  "$@"')
    return "\n".join(lines) + "\n"


def write_ds_config(plan: Plan, out_dir: str | os.PathLike[str]) -> str:
    """ds_config.json alone under `out_dir` (what `memtier launch` needs beside a plan made without one)."""
    import json

    path = os.path.join(os.path.abspath(os.fspath(out_dir)), "ds_config.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(ds_config(plan), indent=2) + "\n")
    return path


def write_outputs(plan: Plan, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """plan.json, ds_config.json, accelerate.yaml and launch.sh under `out_dir`; returns their paths."""
    import json

    out = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise SpecError("exists and is not a directory", field="--out", source=out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:  # a file where a directory should be, no permission, ...
        raise SpecError(f"cannot create it: {e.strerror}", field="--out", source=out) from None
    paths = {
        name: os.path.join(out, name)
        for name in ("plan.json", "ds_config.json", "accelerate.yaml", "launch.sh")
    }
    plan.save(paths["plan.json"])
    atomic_write_text(paths["ds_config.json"], json.dumps(ds_config(plan), indent=2) + "\n")
    acc = accelerate_config(plan, paths["ds_config.json"])
    atomic_write_text(paths["accelerate.yaml"], yaml.safe_dump(acc, sort_keys=False))
    atomic_write_text(paths["launch.sh"], launch_script(plan))
    # the temporary files are created 0600; give the results the modes the umask allows
    umask = os.umask(0)
    os.umask(umask)
    for name, path in paths.items():
        os.chmod(path, (0o777 if name == "launch.sh" else 0o666) & ~umask)
    return paths
