"""GaLoreAdamW against the reference galore-torch package and torch.optim.AdamW; exact resume."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from galore_torch import GaLoreAdamW as ReferenceGaLoreAdamW

from optim import FRUGAL, GaLoreAdamW, NaturalGaLoreAdamW, low_rank_param_groups
from tests.optim.helpers import llama_batches, llama_loss, make_tiny_llama

GALORE_SETTINGS = {"rank": 8, "update_proj_gap": 5, "scale": 0.5, "proj_type": "std"}


def _train(model, opt, batches) -> list[float]:
    losses = []
    for ids in batches:
        opt.zero_grad(set_to_none=True)
        loss = llama_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize(
    ("numerics", "eps", "weight_decay"),
    [
        # galore-torch's own arithmetic and defaults (eps=1e-6, weight decay on the updated parameter).
        ("galore_torch", 1e-6, 0.1),
        # torch.optim.AdamW's arithmetic coincides with galore-torch's when eps is negligible and there is
        # no weight decay: eps placement and decay order are the only differences.
        ("torch", 1e-12, 0.0),
    ],
)
def test_matches_galore_torch_after_20_steps_with_exact_svd(
    numerics: str, eps: float, weight_decay: float
) -> None:
    model = make_tiny_llama()
    reference = copy.deepcopy(model)
    ours = GaLoreAdamW(
        low_rank_param_groups(model, switch_key="galore", **GALORE_SETTINGS),
        lr=1e-2, eps=eps, weight_decay=weight_decay, svd="exact", numerics=numerics,
    )  # fmt: skip
    ref_groups = low_rank_param_groups(reference, switch_key="galore", **GALORE_SETTINGS)
    for g in ref_groups:
        g.pop("galore")  # galore-torch switches on by the presence of 'rank'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_opt = ReferenceGaLoreAdamW(ref_groups, lr=1e-2, eps=eps, weight_decay=weight_decay)
    batches = llama_batches(20)
    ours_losses = _train(model, ours, batches)
    _train(reference, ref_opt, batches)

    assert ours_losses[-1] < ours_losses[0]  # it trains
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, n=name: f"{n}: {m}")
    # The projected parameters really were projected: same rank as the reference's projector.
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert (
        ours.state[q_proj]["basis"].shape
        == ref_opt.state[reference.model.layers[0].self_attn.q_proj.weight]["projector"].ortho_matrix.shape
    )


def test_galore_differs_from_adamw_on_projected_weights() -> None:
    # Guards the cross-check above against a vacuous pass (e.g. projection silently off).
    model = make_tiny_llama()
    plain = copy.deepcopy(model)
    ours = GaLoreAdamW(low_rank_param_groups(model, switch_key="galore", **GALORE_SETTINGS), lr=1e-2)
    adamw = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.0)
    batches = llama_batches(3)
    _train(model, ours, batches)
    _train(plain, adamw, batches)
    w, v = model.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].mlp.up_proj.weight
    assert (w - v).abs().max() > 1e-3


def test_groups_without_projection_are_bit_identical_to_torch_adamw() -> None:
    model = make_tiny_llama()
    plain = copy.deepcopy(model)
    ours = GaLoreAdamW(model.parameters(), lr=3e-3, weight_decay=0.1, galore=False)
    adamw = torch.optim.AdamW(plain.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-8, foreach=False)
    batches = llama_batches(5)
    _train(model, ours, batches)
    _train(plain, adamw, batches)
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


def _make(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "galore":
        return GaLoreAdamW(
            low_rank_param_groups(model, switch_key="galore", rank=6, update_proj_gap=4),
            lr=5e-3,
            weight_decay=0.05,
        )
    if kind == "natural_galore":
        return NaturalGaLoreAdamW(
            low_rank_param_groups(model, switch_key="galore", rank=6, update_proj_gap=4, history_size=3),
            lr=5e-3,
            state_on_refresh="project",
        )
    if kind == "frugal_svd":
        return FRUGAL(
            low_rank_param_groups(model, switch_key="frugal", density=0.3, update_proj_gap=4), lr=5e-3
        )
    if kind == "frugal_random":
        return FRUGAL(
            low_rank_param_groups(
                model, switch_key="frugal", density=0.3, update_proj_gap=4, projection="random"
            ),
            lr=5e-3,
            state_on_refresh="project",
        )
    return FRUGAL(
        low_rank_param_groups(
            model, switch_key="frugal", density=0.5, update_proj_gap=4, projection="blockwise"
        ),
        lr=5e-3,
    )


@pytest.mark.parametrize(
    "kind", ["galore", "natural_galore", "frugal_svd", "frugal_random", "frugal_blockwise"]
)
def test_checkpoint_resume_is_bit_exact(kind: str, tmp_path) -> None:
    batches = llama_batches(10, seed=3)
    straight = make_tiny_llama()
    straight_opt = _make(kind, straight)
    _train(straight, straight_opt, batches)

    first = make_tiny_llama()
    first_opt = _make(kind, first)
    _train(first, first_opt, batches[:6])  # stops mid refresh period (refreshes at steps 0, 4, 8)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first.state_dict(), "optim": first_opt.state_dict()}, path)
    for state in first_opt.state.values():  # the state holds tensors only, so state_dict() is complete
        assert all(isinstance(v, torch.Tensor) for v in state.values())

    resumed = make_tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed_opt = _make(kind, resumed)
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["optim"])
    _train(resumed, resumed_opt, batches[6:])

    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
