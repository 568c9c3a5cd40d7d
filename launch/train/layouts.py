"""Which layouts memtier's trainer carries out (plain Python over the Plan): `launch.run.check_runnable` asks
before any rank starts, `launch.train.parallel` asks again in every rank.

- torch engine: data parallelism (DDP, or gradient averaging in hooks for the offloaded optimizer); and,
  through `launch.train.parallel`, tensor parallelism (with or without sequence parallelism), ZeRO 1-3 as
  FSDP2, pipeline parallelism (1F1B, or interleaved 1F1B with virtual stages) and their products, for
  Llama-style HF models, with activation recompute and swap on any of them;
- deepspeed engine: ZeRO 0-3 data parallelism;
- accelerate engine: plain data parallelism.

Context parallelism is not run (the search does not choose it). Streamed model state (`plan.model_state`) runs
in one process on the torch engine with AdamW.
"""

from __future__ import annotations

from planner.plan import Layout, Plan

# model families whose HF blocks `launch.train.parallel` splits (q/k/v/o, gate/up/down projections)
TP_FAMILIES = ("llama", "mistral", "qwen2")


def needs_parallel(layout: Layout) -> bool:
    """Whether the layout needs more than DDP (or hook averaging): tp, pp, or ZeRO partitioning."""
    return layout.tp > 1 or layout.pp > 1 or (layout.zero_stage > 0 and layout.dp > 1)


def _engine_refusals(lay: Layout) -> list[tuple[str, str]]:
    out = []
    for name, value, what in (("tp", lay.tp, "tensor"), ("pp", lay.pp, "pipeline")):
        if value > 1:
            out.append(
                (f"layout.{name}", f"{name}={value}: {what} parallelism runs on the torch engine only")
            )
    if lay.engine == "accelerate" and lay.zero_stage and lay.dp > 1:
        out.append(
            ("layout.zero_stage", f"zero_stage={lay.zero_stage}: ZeRO runs on the torch or deepspeed engine")
        )
    return out


def _pipeline_refusals(plan: Plan) -> list[tuple[str, str]]:
    lay, layers = plan.layout, plan.model.num_layers
    out = []
    if lay.virtual_stages > 1 and lay.pp == 1:
        out.append(("layout.virtual_stages", f"virtual_stages={lay.virtual_stages} needs pp > 1"))
    if lay.pp == 1:
        return out
    per_stage = list(lay.stage_layers) or [layers // lay.pp] * lay.pp
    v = lay.virtual_stages
    if len(per_stage) != lay.pp or sum(per_stage) != layers or any(n < v or n % v for n in per_stage):
        out.append((
            "layout.stage_layers",
            f"{tuple(per_stage)}: needs pp({lay.pp}) stages of whole multiples of virtual_stages({v}) blocks "
            f"summing to num_layers({layers})",
        ))  # fmt: skip
    if lay.grad_accum < lay.pp or (v > 1 and lay.grad_accum % lay.pp):
        need = "a multiple of" if v > 1 else ">="
        out.append(
            ("layout.grad_accum", f"grad_accum({lay.grad_accum}) must be {need} pp({lay.pp}) micro-batches")
        )
    if plan.model.tied_embeddings:
        out.append(("model.tied_embeddings", "pipeline stages cannot share tied embeddings"))
    return out


def _stream_refusals(plan: Plan) -> list[tuple[str, str]]:
    """Streamed model state (`offload.state`) runs in one process on the torch engine, with AdamW."""
    if not plan.model_state.stream:
        return []
    lay, out = plan.layout, []
    if lay.world_size > 1 or lay.zero_stage:
        out.append(
            ("model_state.stream", f"streamed model state runs in one process, the plan has {lay.describe()}")
        )
    if lay.engine != "torch":
        out.append(("layout.engine", f"streamed model state runs on the torch engine, not {lay.engine!r}"))
    if plan.optimizer.kind != "adamw":
        out.append(
            ("optimizer.kind", f"streamed model state updates with AdamW, not {plan.optimizer.kind!r}")
        )
    for name in ("layerwise", "state_bits"):
        if getattr(plan.optimizer, name):
            out.append((f"optimizer.{name}", f"optimizer.{name} is not run with streamed model state"))
    if plan.optimizer.offload:
        out.append(("optimizer.offload", "the plan streams model state and also offloads the optimizer"))
    return out


def _compile_refusals(plan: Plan) -> list[tuple[str, str]]:
    """Compiled blocks (`offload.activations.compiled`) run in data-parallel plans on the torch engine with
    the model state on the device: streamed blocks would run eagerly, against the plan's costs."""
    lay, backend = plan.layout, plan.workload.compile
    if not backend:
        return []
    where = []
    if needs_parallel(lay):
        where.append(lay.describe())
    if lay.engine != "torch":
        where.append(f"the {lay.engine} engine")
    if plan.model_state.stream:
        where.append("streamed model state (its blocks run eagerly)")
    if not where:
        return []
    return [("workload.compile", f"compiled blocks ({backend}) run data-parallel on the torch engine, not with "
             f"{' and '.join(where)}: re-plan without --compile")]  # fmt: skip


def refusals(plan: Plan) -> list[tuple[str, str]]:
    """(field, why) of every part of the plan memtier's trainer cannot carry out; empty: it runs."""
    lay, spec = plan.layout, plan.model
    out: list[tuple[str, str]] = _stream_refusals(plan) + _compile_refusals(plan)
    if plan.workload.lora and (needs_parallel(lay) or lay.engine != "torch" or plan.model_state.stream):
        # the trainer wraps the built model in PEFT's LoRA adapters (launch.train.apply.lora_model) for
        # data-parallel runs on the torch engine
        out.append(("workload.lora_rank", f"LoRA runs data-parallel on the torch engine, not {lay.describe()} "
                    f"on {lay.engine}{' with streamed state' if plan.model_state.stream else ''}"))  # fmt: skip
    if lay.cp > 1:
        out.append(("layout.cp", f"cp={lay.cp}: context parallelism is not run by memtier's trainer"))
    if lay.engine != "torch":
        return out + _engine_refusals(lay)
    out += _pipeline_refusals(plan)
    if not needs_parallel(lay):
        return out
    if (lay.tp > 1 or lay.pp > 1) and spec.family not in TP_FAMILIES:
        out.append(("model.family", f"tp/pp run on {TP_FAMILIES} blocks, not {spec.family!r}"))
    if lay.tp > 1 and (spec.num_heads % lay.tp or spec.num_kv_heads % lay.tp):
        why = f"tp({lay.tp}) must divide num_heads({spec.num_heads}) and num_kv_heads({spec.num_kv_heads})"
        out.append(("layout.tp", why))
    if lay.vocab_parallel and lay.tp > 1:
        why = "the embeddings and the head stay whole on every tp rank in memtier's trainer: re-plan without --vocab-parallel"
        out.append(("layout.vocab_parallel", why))
    if lay.sequence_parallel and lay.tp == 1:
        out.append(
            ("layout.sequence_parallel", "sequence parallelism splits tokens over tp ranks: needs tp > 1")
        )
    if plan.optimizer.offload and plan.optimizer.kind != "adamw":
        out.append(("optimizer.offload", "optimizer-state offload of tp/pp/FSDP2 shards runs with AdamW"))
    if plan.optimizer.kind != "adamw":
        out.append(
            ("optimizer.kind", f"{plan.optimizer.kind} is not run on tp/pp/FSDP2 shards yet (adamw is)")
        )
    opt = plan.optimizer
    for name, default in (("precision", "mixed"), ("layerwise", False), ("state_bits", 0)):
        value = getattr(opt, name, default)  # the memory modes (planner.workload), where the plan has them
        if value != default:
            out.append((f"optimizer.{name}", f"{name}={value!r} is not run on tp/pp/FSDP2 shards yet"))
    return out
