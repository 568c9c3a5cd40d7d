"""A tiny Llama, its data and a streamed-state plan, shared by the streamed-state tests and their subprocess."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from offload.blocks import find_blocks
from planner.plan import ActivationPolicy, ModelStatePlan, Plan, StateGroup, TierPlan
from planner.presets import MODEL_PRESETS, resolve_cluster
from planner.workload import Workload

VOCAB, SEQ, BATCH = 512, 24, 2


def build(layers: int = 3, *, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        )
    )  # fmt: skip


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def train(model, step_fn, data, *, steps: int, ga: int, start: int = 0) -> list[float]:
    losses = []
    for st in range(start, start + steps):
        total = 0.0
        for k in range(ga):
            ids = data[st * ga + k]
            loss = model(input_ids=ids, labels=ids).loss / ga
            loss.backward()
            total += loss.item()
        step_fn()
        losses.append(total)
    return losses


def stream_plan(
    model, nvme_dir: str, *, tier: str = "nvme", activations: str = "keep", depth: int = 1, ga: int = 2, chunk: int = 1 << 22,
    **kinds: str,
) -> Plan:  # fmt: skip
    blocks = find_blocks(model)
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() for p in model.parameters())
    tiers = {k: kinds.get(k, tier) for k in ("params", "master", "grads", "moments")}
    groups = [StateGroup(name="rest", numel=total - sum(per_block), **tiers)]  # type: ignore[arg-type]
    groups += [StateGroup(name=f"block.{i}", numel=n, **tiers) for i, n in enumerate(per_block)]  # type: ignore[arg-type]
    n = len(blocks)
    acts = {
        "keep": (),
        "swap": tuple(ActivationPolicy(layer=i, keep_fraction=0.5, swap_fraction=0.5) for i in range(n)),
        "recompute": tuple(
            ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0) for i in range(n)
        ),
    }[activations]
    return Plan(
        model=MODEL_PRESETS["tiny-llama"],
        cluster=resolve_cluster("rtx4090-nvme"),
        workload=Workload(global_batch=BATCH * ga, seq_len=SEQ, dtype="fp32"),
        activations=acts,
        tiers=(
            TierPlan(kind="nvme", capacity_bytes=1 << 30, path=nvme_dir),
            TierPlan(kind="dram", capacity_bytes=256 << 20),
        ),
        model_state=ModelStatePlan(
            stream=True, groups=tuple(groups), prefetch_depth=depth, chunk_numel=chunk
        ),
    )
