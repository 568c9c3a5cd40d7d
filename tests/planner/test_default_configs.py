"""The memory model on families at their transformers defaults (issue #21): GPT-2 with its 0.1 dropout,
Qwen2's grouped-query attention, Gemma 2's eager soft-capped attention, experts; predicted vs the peak of a
real CPU training step (MemTracker, fp32, fused AdamW), with and without full recompute. The whole sweep
(every family, three settings) is `benchmarks/cost_model.py --families`."""

from __future__ import annotations

import pytest
import torch

from planner.memory import MemoryOptions, block_saved_bytes, estimate_memory
from planner.model import from_hf_config
from planner.plan import Layout
from planner.workload import Workload
from tests.helpers import DEFAULT_FAMILY_CONFIGS, default_family_model, full_recompute, measure_step_peak

CASES = [(f, rc) for f in ("gpt2", "qwen2", "gemma2", "qwen2_moe") for rc in ("none", "full")]


@pytest.mark.parametrize("family,recompute", CASES, ids=[f"{f}-{rc}" for f, rc in CASES])
def test_default_config_peak_within_10_percent_never_5_under(family, recompute):
    torch.set_num_threads(1)
    config, model = default_family_model(family)
    if recompute == "full":
        full_recompute(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    b, s = 2, 384
    measured = measure_step_peak(model, opt, torch.randint(0, config.vocab_size, (b, s)))["Total"]
    spec = from_hf_config(config.to_dict())
    w = Workload(global_batch=b, micro_batch=b, seq_len=s, dtype="fp32")
    options = MemoryOptions(recompute=recompute, optimizer_impl="fused", cpu_kernels=True)
    ratio = estimate_memory(spec, w, Layout(micro_batch=b), options).total / measured
    assert 0.95 <= ratio <= 1.10, f"{family} {recompute}: predicted / measured = {ratio:.3f}"


def test_dropout_is_read_and_costed_per_device_kind():
    spec = from_hf_config(DEFAULT_FAMILY_CONFIGS["gpt2"]().to_dict())
    assert (spec.attn_dropout, spec.hidden_dropout, spec.embd_dropout) == (0.1, 0.1, 0.1)
    assert from_hf_config(DEFAULT_FAMILY_CONFIGS["llama"]().to_dict()).attn_dropout == 0.0
    w = Workload(global_batch=2, micro_batch=2, seq_len=256, dtype="bf16")
    # CUDA: fused SDPA draws the attention mask inside, boolean residual masks; CPU: the math kernel's s x s
    # probabilities, mask and dropped probabilities, masks in the working dtype
    gpu = block_saved_bytes(spec, w, micro_batch=2)
    cpu = block_saved_bytes(spec, w, micro_batch=2, cpu_kernels=True)
    none = block_saved_bytes(spec.replace(attn_dropout=0.0, hidden_dropout=0.0), w, micro_batch=2)
    tokens, h, a = 2 * 256, spec.hidden_size, spec.num_heads
    assert gpu - none == tokens * 2 * h  # two 1-byte masks of h per token
    # (CPU: no log-sum-exp of a fused kernel, working-dtype masks instead of the 1-byte ones)
    assert cpu - gpu == tokens * ((2 * h + 3 * a * 256) * 2 - 2 * a - 2 * h)
