"""Natural GaLore: the Woodbury preconditioner and the optimizer around it."""

from __future__ import annotations

import copy

import torch

from optim import GaLoreAdamW, NaturalGaLoreAdamW, low_rank_param_groups
from optim.updates import woodbury_natural_gradient
from tests.optim.helpers import llama_batches, llama_loss, make_tiny_llama


def _dense_reference(g: torch.Tensor, history: torch.Tensor, damping: float) -> torch.Tensor:
    # lambda (lambda I + G G^T)^{-1} g by a dense d x d solve in float64.
    rows = history.reshape(history.shape[0], -1).double()
    filled = rows[rows.norm(dim=1) > 0]
    lam = damping * float((filled**2).sum(dim=1).mean())
    fisher = lam * torch.eye(rows.shape[1], dtype=torch.float64) + rows.t() @ rows
    return lam * torch.linalg.solve(fisher, g.reshape(-1).double()).reshape(g.shape)


def test_woodbury_equals_the_dense_inverse_fisher() -> None:
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(5, 6, 7, generator=gen)
    g = history[0].clone()  # the current gradient is part of the window, as in the paper
    for damping in (1e-3, 1e-1, 10.0):
        reference = _dense_reference(g, history, damping)
        in_window = woodbury_natural_gradient(g, history, damping=damping, current_slot=0)
        torch.testing.assert_close(in_window.double(), reference, rtol=1e-4, atol=1e-7)
        general = woodbury_natural_gradient(g, history, damping=damping)
        # The general form subtracts nearly equal vectors when lambda is small: looser in float32.
        torch.testing.assert_close(general.double(), reference, rtol=1e-2, atol=1e-5)


def test_woodbury_ignores_empty_history_slots() -> None:
    gen = torch.Generator().manual_seed(1)
    history = torch.zeros(4, 3, 5)
    history[:2] = torch.randn(2, 3, 5, generator=gen)
    g = torch.randn(3, 5, generator=gen)
    torch.testing.assert_close(
        woodbury_natural_gradient(g, history, damping=0.01).double(),
        _dense_reference(g, history, 0.01),
        rtol=2e-4,
        atol=1e-6,
    )
    # With nothing stored yet the gradient passes through unchanged.
    assert torch.equal(woodbury_natural_gradient(g, torch.zeros(4, 3, 5), damping=0.01), g)


def test_preconditioner_damps_directions_seen_before() -> None:
    # After many gradients along e1, a new gradient with equal e1 and e2 parts is turned towards e2:
    # the empirical Fisher is large along e1, so its inverse shrinks that component.
    history = torch.zeros(4, 2)
    history[:3, 0] = 1.0
    g = torch.tensor([1.0, 1.0])
    history[3] = g
    out = woodbury_natural_gradient(g, history, damping=0.1)
    assert out[1] > 2 * out[0] > 0


def test_history_is_a_ring_of_the_latest_low_rank_gradients() -> None:
    w = torch.nn.Parameter(torch.randn(12, 8))
    opt = NaturalGaLoreAdamW([w], galore=True, rank=3, history_size=2, update_proj_gap=100, svd="exact")
    grads = [torch.randn(12, 8) for _ in range(3)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    basis = opt.state[w]["basis"]  # right basis, 3 x 8
    history = opt.state[w]["history"]
    assert history.shape == (2, 12, 3)
    # Slot = step index mod 2: step 3 (index 2) overwrote slot 0, step 2 is in slot 1.
    torch.testing.assert_close(history[0], grads[2] @ basis.t())
    torch.testing.assert_close(history[1], grads[1] @ basis.t())


def test_natural_galore_differs_from_galore_and_trains_a_small_llama() -> None:
    model = make_tiny_llama()
    twin = copy.deepcopy(model)
    settings = {"rank": 8, "update_proj_gap": 5}
    natural = NaturalGaLoreAdamW(
        low_rank_param_groups(model, switch_key="galore", history_size=4, **settings), lr=1e-2
    )
    plain = GaLoreAdamW(low_rank_param_groups(twin, switch_key="galore", **settings), lr=1e-2)
    batches = llama_batches(12)
    with torch.no_grad():
        first = float(llama_loss(model, batches[0]))
    for ids in batches:
        for m, o in ((model, natural), (twin, plain)):
            o.zero_grad()
            llama_loss(m, ids).backward()
            o.step()
    with torch.no_grad():
        last = float(llama_loss(model, batches[0]))
    assert last < first - 0.3
    w_nat = model.model.layers[1].mlp.down_proj.weight
    w_gal = twin.model.layers[1].mlp.down_proj.weight
    assert (w_nat - w_gal).abs().max() > 1e-4
