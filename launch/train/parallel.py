"""The plan's parallel layout on torch's own engine: device mesh, DTensor tensor parallelism, FSDP2, pipelining.

`parallelize(model, plan, d)` runs before the optimizer is built (the parameters it returns are the ones the
optimizer steps). torchtitan composes the same pieces on Llama (its `parallelize_llama` / `pipeline_llama`);
this is memtier's own, driven by the Plan only:

- the device mesh has the plan's dims in its rank order, Megatron's (`planner.mapping.group_ranks`: tp
  innermost, then cp, dp, pp), so logical rank r is torchrun's rank r; `memtier launch` already gave each
  rank the device `layout.rank_to_device[r]` (CUDA_VISIBLE_DEVICES);
- tensor parallelism (Shoeybi et al. 2019, Megatron-LM Sec. 3): q/k/v and gate/up column-wise, o and down
  row-wise, so each block needs one all-reduce in forward and one in backward per sub-layer; embeddings,
  norms and the head stay replicated (their gradients are identical on the tp ranks because the column-wise
  layers all-reduce the gradient of their input);
- ZeRO >= 1 (Rajbhandari et al. 2020) with FSDP2 `fully_shard` over the dp dim (inside each pipeline
  stage too: the stage's blocks and its chunk are sharded over its dp group): ZeRO-3 reshards parameters
  after forward, ZeRO-1/2 keep them gathered until backward (`reshard_after_forward=False`); ZeRO-0 averages
  gradients over the dp dim after the last micro-batch (or DDP, for pure data parallelism: engines.py);
- pipeline parallelism with `torch.distributed.pipelining`: `layout.stage_layers` blocks per stage,
  embeddings on the first, norm + head + loss on the last; 1F1B (Narayanan et al. 2021, PipeDream-Flush), or
  interleaved 1F1B with `layout.virtual_stages` chunks per stage (Narayanan et al. 2021, Sec. 2.2.2: stage s
  holds chunks s, s + pp, ...), `layout.grad_accum` micro-batches per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launch.train.config import TrainConfigError
from launch.train.distributed import Dist
from launch.train.layouts import needs_parallel, refusals
from planner.plan import Layout, Plan

# projections of an HF Llama-style block (Llama, Mistral, Qwen2) and how tensor parallelism splits them
COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")  # sequence-parallel with `layout.sequence_parallel`


def chunk_layers(layout: Layout, num_layers: int) -> list[tuple[int, int]]:
    """(first block, block count) of every model chunk, in model order: pp * virtual_stages chunks; chunk
    k * pp + s is the k-th chunk of pipeline stage s, which splits its `stage_layers[s]` blocks evenly
    (`layouts.refusals` checked that they divide)."""
    pp, v = layout.pp, layout.virtual_stages
    per_stage = list(layout.stage_layers) or [num_layers // pp] * pp
    out, first = [], 0
    for c in range(pp * v):
        n = per_stage[c % pp] // v
        out.append((first, n))
        first += n
    return out


class StageChunk(nn.Module):
    """A contiguous run of an HF causal LM's blocks, with the embeddings (first chunk) or the final norm and
    head (last chunk): one pipeline stage's model chunk. Shares the modules of the original model.

    With sequence parallelism (`tokens_mesh`, the tp mesh) the residual stream is a DTensor split by tokens;
    between stages its local shard is sent (1/tp of the bytes, Korthikanti et al. 2022, Sec. 4.2.2) and the
    receiving chunk wraps it again."""

    def __init__(
        self,
        model: nn.Module,
        first: int,
        count: int,
        *,
        is_first: bool,
        is_last: bool,
        tokens_mesh: Any = None,
        head_in_loss: bool = False,
    ) -> None:
        super().__init__()
        self.tokens_mesh = tokens_mesh
        self.head_in_loss = (
            head_in_loss  # the last chunk returns the normed hidden states (`ChunkedHeadLoss`)
        )
        inner = model.model  # type: ignore[union-attr]
        self.embed_tokens = inner.embed_tokens if is_first else None
        self.layers = nn.ModuleList(list(inner.layers)[first : first + count])
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if is_last else None
        self.lm_head = model.lm_head if is_last else None  # type: ignore[union-attr]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            h = self.embed_tokens(h)
        elif self.tokens_mesh is not None:
            from torch.distributed.tensor import DTensor, Shard

            h = DTensor.from_local(h, self.tokens_mesh, [Shard(1)], run_check=False)
        positions = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        rope = self.rotary_emb(h, positions)
        # no mask: SDPA's causal kernel, as the whole model uses for unpadded batches
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=positions, position_embeddings=rope)
        if self.norm is not None and self.lm_head is not None:
            if not self.head_in_loss:
                return self.lm_head(self.norm(h))
            h = self.norm(h)
            return h.full_tensor() if self.tokens_mesh is not None else h  # type: ignore[attr-defined]
        return h.to_local() if self.tokens_mesh is not None else h  # type: ignore[attr-defined]


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss without padding: position t predicts token t + 1, mean over the predictions."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
    )


class ChunkedHeadLoss:
    """The last pipeline stage's loss with the head inside it (`plan.loss.kind == "chunked"`): the head's
    projection and the causal-LM cross-entropy in token chunks (`offload.loss.linear_cross_entropy`), so no
    tokens x vocab logits tensor exists; the same mean over the predictions as `causal_lm_loss`. The head
    stays replicated over tp, so no vocab-parallel reduction is needed."""

    def __init__(self, head: nn.Module, chunk_size: int) -> None:
        self.head = head
        self.chunk_size = chunk_size
        self.calls = 0

    def __call__(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from offload.loss import linear_cross_entropy

        kw = {"chunk_size": self.chunk_size} if self.chunk_size > 0 else {}
        self.calls += 1
        return linear_cross_entropy(
            hidden, self.head.weight, tokens, bias=getattr(self.head, "bias", None), shift=True, **kw
        )


@dataclass
class Parallel:
    """What `parallelize` built: the mesh, this rank's place in it, and the modules it trains."""

    layout: Layout
    mesh: Any  # DeviceMesh (pp, dp, tp)
    dp_rank: int
    pp_rank: int
    modules: nn.ModuleList  # what this rank trains: the whole model, or its pipeline chunks
    chunk_ids: list[int] = field(default_factory=list)  # the model chunks this rank holds (pipelining)
    schedule: Any = None  # the pipeline schedule (pp > 1)
    loss_fn: Any = None  # the last stage's loss function (pp > 1): causal_lm_loss or a ChunkedHeadLoss

    @property
    def dp(self) -> int:
        return self.layout.dp

    def group(self, dim: str) -> Any:
        return self.mesh.get_group(dim)

    @property
    def fsdp(self) -> bool:
        return self.layout.zero_stage > 0 and self.layout.dp > 1


def _tensor_parallel(model: nn.Module, tp_mesh: Any, sequence_parallel: bool) -> None:
    """Megatron's split of every block over the tp mesh; with `sequence_parallel` (Korthikanti et al. 2022,
    Sec. 4.2.2) the norms and the residual stream between the sub-layers hold 1/tp of the tokens: an all-gather
    of the tokens before q/k/v and gate/up, a reduce-scatter after o and down (the same bytes as tp's
    all-reduce), and the embeddings' output split by tokens, the final norm sequence-parallel, the head's
    input gathered again (the head stays replicated)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan: dict[str, Any] = {name: ColwiseParallel() for name in COLWISE}
    if not sequence_parallel:
        plan.update({name: RowwiseParallel() for name in ROWWISE})
    else:
        tokens, whole = Shard(1), Replicate()
        plan.update(
            {name: RowwiseParallel(output_layouts=tokens, use_local_output=False) for name in ROWWISE}
        )
        plan.update({name: SequenceParallel() for name in NORMS})
        # HF passes the attention's input as a keyword, the MLP's as the first argument
        plan["self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": tokens},
            desired_input_kwarg_layouts={"hidden_states": whole},
        )
        plan["mlp"] = PrepareModuleInput(input_layouts=(tokens,), desired_input_layouts=(whole,))
    for block in model.model.layers:  # type: ignore[union-attr]
        parallelize_module(block, tp_mesh, plan)
    if sequence_parallel:
        parallelize_module(model, tp_mesh, {
            "model.embed_tokens": PrepareModuleOutput(
                output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=False
            ),
            "model.norm": SequenceParallel(),
            "lm_head": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
        })  # fmt: skip


def _fully_shard(modules: list[nn.Module], blocks: list[nn.Module], layout: Layout, dp_mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    # ZeRO-3 frees the gathered parameters after each block's forward; ZeRO-1/2 keep them until backward
    reshard = layout.zero_stage == 3
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    for m in modules:
        fully_shard(m, mesh=dp_mesh, reshard_after_forward=reshard)


def parallelize(model: nn.Module, plan: Plan, d: Dist) -> Parallel:
    """Apply the plan's layout to `model` (an HF causal LM on `d.device`); the modules this rank trains."""
    from torch.distributed.device_mesh import init_device_mesh

    lay = plan.layout
    mesh = init_device_mesh(d.device.type, (lay.pp, lay.dp, lay.tp), mesh_dim_names=("pp", "dp", "tp"))
    coords = mesh.get_coordinate()
    assert coords is not None
    pp_rank, dp_rank = coords[0], coords[1]
    if lay.tp > 1:
        _tensor_parallel(model, mesh["tp"], lay.sequence_parallel)
    if lay.pp == 1:
        modules = nn.ModuleList([model])
        if lay.zero_stage > 0 and lay.dp > 1:
            _fully_shard([model], list(model.model.layers), lay, mesh["dp"])  # type: ignore[union-attr]
        return Parallel(layout=lay, mesh=mesh, dp_rank=dp_rank, pp_rank=pp_rank, modules=modules)
    chunks = chunk_layers(lay, len(model.model.layers))  # type: ignore[union-attr]
    ids = [k * lay.pp + pp_rank for k in range(lay.virtual_stages)]
    sp_mesh = mesh["tp"] if lay.tp > 1 and lay.sequence_parallel else None
    chunked = plan.loss.kind == "chunked"
    owned = [
        StageChunk(
            model, *chunks[c], is_first=c == 0, is_last=c == len(chunks) - 1, tokens_mesh=sp_mesh,
            head_in_loss=chunked,
        )
        for c in ids
    ]  # fmt: skip
    _drop_unowned(model, owned)
    if lay.zero_stage > 0 and lay.dp > 1:
        _fully_shard(owned, [b for c in owned for b in c.layers], lay, mesh["dp"])
    par = Parallel(
        layout=lay, mesh=mesh, dp_rank=dp_rank, pp_rank=pp_rank, modules=nn.ModuleList(owned), chunk_ids=ids
    )
    par.loss_fn = ChunkedHeadLoss(model.lm_head, plan.loss.chunk_size) if chunked else causal_lm_loss  # type: ignore[arg-type]
    par.schedule = _schedule(par, owned, len(chunks), d.device, par.loss_fn)
    return par


def _drop_unowned(model: nn.Module, owned: list[nn.Module]) -> None:
    """Free the parameters of the blocks (and embeddings, norm, head) other pipeline stages hold: they move to
    the meta device, so a rank keeps only its stages' weights."""
    kept = {id(m) for c in owned for m in c.modules()}
    inner = model.model  # type: ignore[union-attr]
    for m in [*inner.layers, inner.embed_tokens, inner.norm, model.lm_head]:  # type: ignore[union-attr]
        if id(m) not in kept:
            m.to("meta")


def _schedule(
    par: Parallel, owned: list[nn.Module], n_chunks: int, device: torch.device, loss_fn: Any
) -> Any:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    lay = par.layout
    stages = [
        PipelineStage(m, c, n_chunks, device, group=par.group("pp"))
        for m, c in zip(owned, par.chunk_ids, strict=True)
    ]
    if lay.virtual_stages > 1:
        return ScheduleInterleaved1F1B(stages, n_microbatches=lay.grad_accum, loss_fn=loss_fn)
    return Schedule1F1B(stages[0], n_microbatches=lay.grad_accum, loss_fn=loss_fn)


# ------------------------------------------------------------------------------------------- the step
def pipeline_step(par: Parallel, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward of this dp rank's whole batch (grad_accum micro-batches) through the schedule;
    the mean micro-batch loss on every rank of the pipeline (the last stage has it, the others receive it)."""
    n_chunks = par.layout.pp * par.layout.virtual_stages
    has_first, has_last = 0 in par.chunk_ids, n_chunks - 1 in par.chunk_ids
    losses: list[torch.Tensor] = []
    args = (x,) if has_first else ()
    if has_last:
        par.schedule.step(*args, target=x, losses=losses)
        loss = torch.stack([t.detach() for t in losses]).mean()
    else:
        par.schedule.step(*args)
        loss = torch.zeros((), device=x.device)
    dist.all_reduce(loss, group=par.group("pp"))  # only the last stage's is non-zero
    return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def average_gradients(par: Parallel) -> None:
    """ZeRO-0 data parallelism beside tp/pp: every gradient averaged over the dp dim (replicas hold the same
    shards, so the local shards are averaged). FSDP2 reduce-scatters in backward itself."""
    if par.dp == 1 or par.fsdp:
        return
    group = par.group("dp")
    for p in par.modules.parameters():
        if p.grad is not None:
            g = _local(p.grad)
            dist.all_reduce(g, group=group)
            g.div_(par.dp)


def clip_gradients(par: Parallel, max_norm: float) -> torch.Tensor:
    """Global-norm clipping over every rank's gradients (torch.nn.utils.clip_grad_norm_'s rule: scale by
    max_norm / (norm + 1e-6) when below 1): a DTensor's norm is the norm of the whole tensor; pipeline
    stages own disjoint parameters, so their squared norms add."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in par.modules.parameters() if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for g in grads:
        n = torch.linalg.vector_norm(g)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        squares += n.double().cpu() ** 2
    if par.layout.pp > 1:
        dist.all_reduce(squares, group=par.group("pp"))
    total = math.sqrt(float(squares))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            _local(g).mul_(coef)
    return torch.tensor(total)


def full_state(par: Parallel, model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's trained parameters as whole tensors under the original model's names (DTensors gathered;
    a pipeline rank has its chunks' only). Every rank of a dp/tp group calls it: the gathers are collectives."""
    from torch.distributed.tensor import DTensor

    owned = {id(p) for p in par.modules.parameters()}
    out = {}
    for name, p in model.named_parameters():
        if id(p) in owned:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = t.detach().cpu().clone()
    return out


def parallel_layout(model: nn.Module, settings: Any, d: Dist, args: Any) -> Parallel | None:
    """`parallelize` when the plan's layout needs it (None: DDP, hook averaging or DeepSpeed run it)."""
    plan = settings.plan
    if plan is None or not needs_parallel(plan.layout) or plan.layout.engine != "torch":
        return None
    for name, why in refusals(plan):
        raise TrainConfigError(why, field=name, source=settings.plan_path)
    if args.ckpt_dir:
        raise TrainConfigError(
            "checkpoints of tp / pp / FSDP2 layouts are not written yet; run without it", field="--ckpt-dir"
        )
    if d.world != plan.layout.world_size:
        raise TrainConfigError(
            f"the plan's layout has {plan.layout.world_size} ranks, this run {d.world}", field="layout"
        )
    return parallelize(model, plan, d)
