"""Layer-wise updates for any optimizer (optim.per_param): 20 layer-wise steps equal 20 whole steps.

AdamW in fp32 and in pure bf16, GaLore (fp32, pure bf16, 8-bit states), Natural GaLore, FRUGAL (SVD and
blockwise subspaces), and bitsandbytes' 8-bit AdamW: every parameter is updated alone with the same
arithmetic as in a whole step, so the results are bit-identical (torch.equal), not close.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from optim import (
    FRUGAL,
    GaLoreAdamW,
    LayerwiseStepper,
    NaturalGaLoreAdamW,
    OptimizerConfigError,
    low_rank_param_groups,
)
from optim.per_param import PerParameterOptimizer, low_bit_adamw
from tests.optim.helpers import llama_batches, llama_loss, make_tiny_llama

STEPS = 20


def _adamw(model: torch.nn.Module) -> Any:
    return torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)


def _galore(model: torch.nn.Module) -> Any:
    return GaLoreAdamW(low_rank_param_groups(model, switch_key="galore", rank=6, update_proj_gap=5), lr=5e-3)


def _natural_galore(model: torch.nn.Module) -> Any:
    groups = low_rank_param_groups(model, switch_key="galore", rank=6, update_proj_gap=5, history_size=4)
    return NaturalGaLoreAdamW(groups, lr=5e-3, weight_decay=0.1)


def _frugal(model: torch.nn.Module) -> Any:
    groups = low_rank_param_groups(model, switch_key="frugal", density=0.25, update_proj_gap=5)
    return FRUGAL(groups, lr=5e-3)


def _frugal_blockwise(model: torch.nn.Module) -> Any:
    groups = low_rank_param_groups(
        model, switch_key="frugal", density=0.25, update_proj_gap=5, projection="blockwise"
    )
    return FRUGAL(groups, lr=5e-3)


def _galore8(model: torch.nn.Module) -> Any:
    pytest.importorskip("bitsandbytes")
    # (rank 8 on 64-wide matrices: 512-element moments, under bitsandbytes' 4096-element floor; the
    # embeddings' and head's 8192-element moments are quantized)
    groups = low_rank_param_groups(model, switch_key="galore", rank=8, update_proj_gap=5)
    return GaLoreAdamW(groups, lr=5e-3, state_bits=8)


def _adamw8(model: torch.nn.Module) -> Any:
    return low_bit_adamw(model.parameters(), bits=8, lr=5e-3, min_8bit_size=256)


def _twins(dtype: torch.dtype, **shape: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = make_tiny_llama(**shape).to(dtype)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize(
    "name,make,dtype",
    [
        ("adamw", _adamw, torch.float32),
        ("adamw-pure-bf16", _adamw, torch.bfloat16),
        ("galore", _galore, torch.float32),
        ("galore-pure-bf16", _galore, torch.bfloat16),
        ("natural_galore", _natural_galore, torch.float32),
        ("frugal", _frugal, torch.float32),
        ("frugal-blockwise", _frugal_blockwise, torch.float32),
        ("galore-8bit", _galore8, torch.float32),
    ],
)
def test_twenty_layerwise_steps_equal_twenty_whole_steps(
    name: str, make: Callable[[torch.nn.Module], Any], dtype: torch.dtype
) -> None:
    shape = {"vocab": 128, "hidden": 64, "ffn": 96} if name == "galore-8bit" else {}
    model, twin = _twins(dtype, **shape)
    whole = make(model)
    layerwise = make(twin)
    if not callable(getattr(layerwise, "step_param", None)):
        layerwise = PerParameterOptimizer.like(layerwise)
    with LayerwiseStepper(layerwise):
        for ids in llama_batches(STEPS, vocab=shape.get("vocab", 128)):
            llama_loss(model, ids).backward()
            whole.step()
            whole.zero_grad(set_to_none=True)
            llama_loss(twin, ids).backward()  # every parameter stepped inside backward
            assert all(p.grad is None for p in twin.parameters())
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    assert any(
        not torch.equal(p, q)
        for p, q in zip(model.parameters(), make_tiny_llama(**shape).to(dtype).parameters())
    )
    if name == "galore-8bit":
        assert any(v.dtype == torch.uint8 for st in twin_states(layerwise) for v in st)


def twin_states(opt: Any) -> list[list[torch.Tensor]]:
    return [[v for v in st.values() if torch.is_tensor(v)] for st in opt.state.values()]


def test_8bit_adamw_layerwise_equals_its_whole_step() -> None:
    pytest.importorskip("bitsandbytes")
    model, twin = _twins(torch.float32)
    whole = _adamw8(model)
    layerwise = PerParameterOptimizer(
        [{"params": list(twin.parameters()), "lr": 5e-3}],
        lambda groups: low_bit_adamw(groups, bits=8, min_8bit_size=256),
    )
    with LayerwiseStepper(layerwise):
        for ids in llama_batches(STEPS):
            llama_loss(model, ids).backward()
            whole.step()
            whole.zero_grad(set_to_none=True)
            llama_loss(twin, ids).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert any(
        v.dtype == torch.uint8 for st in layerwise.state.values() for v in st.values() if torch.is_tensor(v)
    )


def test_per_parameter_state_round_trips_and_refuses_a_stepped_optimizer() -> None:
    model = make_tiny_llama()
    opt = PerParameterOptimizer.like(_adamw(model))
    llama_loss(model, llama_batches(1)[0]).backward()
    opt.step()
    again = PerParameterOptimizer.like(_adamw(model))
    again.load_state_dict(opt.state_dict())
    assert (
        again.state_bytes()
        == opt.state_bytes()
        == 2 * 4 * sum(p.numel() for p in model.parameters()) + 4 * len(list(model.parameters()))
    )
    stepped = _adamw(model)
    stepped.step()
    with pytest.raises(OptimizerConfigError, match="before its first step"):
        PerParameterOptimizer.like(stepped)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_4bit_states_are_refused_clearly_without_cuda() -> None:
    with pytest.raises(OptimizerConfigError, match="4-bit .* torchao.*CUDA"):
        low_bit_adamw([torch.nn.Parameter(torch.zeros(2))], bits=4)
    with pytest.raises(OptimizerConfigError, match="8 or 4"):
        low_bit_adamw([torch.nn.Parameter(torch.zeros(2))], bits=2)
