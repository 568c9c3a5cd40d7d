"""The low-memory optimizers at their defaults train a small Llama on real text about as well as AdamW.

The cheap pin of ``benchmarks/optimizer_convergence.py`` (issue 22, item 7): a 2-layer, 64-wide Llama
trained on the byte-level corpus that ships with memtier, the same initial weights, batches and learning
rate for every optimizer; GaLore, Natural GaLore and FRUGAL get only a rank (or nothing). Measured for this
test: the defaults end at 0.88-1.05x AdamW's loss (seeds 0 and 1), the defaults before issue 22 (GaLore
``scale=0.25``; Natural GaLore ``scale=0.25``, ``damping=1e-3`` and an unnormalised preconditioner) at
1.46-1.66x, so the bound of 1.15x separates them.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from optim import FRUGAL, GaLoreAdamW, NaturalGaLoreAdamW, low_rank_param_groups
from tests.optim.helpers import make_tiny_llama

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "corpus.txt"
HIDDEN, FFN, LAYERS, VOCAB = 64, 176, 2, 128  # the corpus is ASCII: byte values < 128
RANK = HIDDEN // 4  # GaLore's ratio for its 60M Llama (rank 128 at width 512)
STEPS, LR, BATCH, SEQ, TAIL = 150, 3e-3, 8, 64, 10
BOUND = 1.15  # final loss / AdamW's

Build = Callable[[torch.nn.Module], torch.optim.Optimizer]

DEFAULTS: dict[str, Build] = {
    "galore": lambda m: GaLoreAdamW(low_rank_param_groups(m, switch_key="galore", rank=RANK), lr=LR),
    "natural_galore": lambda m: NaturalGaLoreAdamW(
        low_rank_param_groups(m, switch_key="galore", rank=RANK), lr=LR
    ),
    "frugal": lambda m: FRUGAL(low_rank_param_groups(m, switch_key="frugal"), lr=LR),
}


def _train(build: Build) -> list[float]:
    raw = CORPUS.read_bytes()
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    model = make_tiny_llama(seed=0, vocab=VOCAB, hidden=HIDDEN, ffn=FFN, layers=LAYERS)
    opt = build(model)
    losses = []
    for step in range(STEPS):
        # consecutive windows of the corpus, the same for every optimizer (as examples/train_lm.py reads it)
        starts = [((step * BATCH + j) * SEQ) % (len(tokens) - SEQ) for j in range(BATCH)]
        ids = torch.stack([tokens[s : s + SEQ] for s in starts])
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _final(losses: list[float]) -> float:
    return sum(losses[-TAIL:]) / TAIL


@functools.cache
def _adamw_final() -> float:
    losses = _train(lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.0))
    return _final(losses)


@pytest.mark.parametrize("kind", list(DEFAULTS))
def test_defaults_train_a_small_llama_about_as_well_as_adamw(kind: str) -> None:
    losses = _train(DEFAULTS[kind])
    assert all(math.isfinite(v) for v in losses)
    ratio = _final(losses) / _adamw_final()
    assert ratio <= BOUND, f"{kind} at its defaults ended at {ratio:.2f}x AdamW's loss"


def test_the_bound_rejects_the_papers_scale_at_adamws_learning_rate() -> None:
    # Guards the test above against a vacuous pass: GaLore's published scale (0.25) belongs with a 10x
    # larger lr; at AdamW's lr it trains the projected weights a quarter as fast (measured 1.46-1.58x).
    losses = _train(
        lambda m: GaLoreAdamW(low_rank_param_groups(m, switch_key="galore", rank=RANK), lr=LR, scale=0.25)
    )
    assert _final(losses) / _adamw_final() > BOUND


def _one_matrix_optimizer(kind: str, w: torch.nn.Parameter) -> torch.optim.Optimizer:
    group = {"params": [w], "update_proj_gap": 2}
    if kind == "frugal":
        return FRUGAL([{**group, "frugal": True}], lr=1e-2)
    cls = NaturalGaLoreAdamW if kind == "natural_galore" else GaLoreAdamW
    return cls([{**group, "galore": True, "rank": 8}], lr=1e-2)


@pytest.mark.parametrize("kind", list(DEFAULTS))
def test_rank_deficient_and_zero_gradients_stay_finite(kind: str) -> None:
    # A rank-one gradient (fewer directions than the rank), then all-zero gradients, across refreshes:
    # no warning (these gradients are finite) and no NaN in the weights or the state.
    w = torch.nn.Parameter(torch.randn(20, 12))
    opt = _one_matrix_optimizer(kind, w)
    rank_one = torch.outer(torch.arange(1.0, 21.0), torch.ones(12))
    for g in (rank_one, rank_one, torch.zeros(20, 12), torch.zeros(20, 12), rank_one):
        w.grad = g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        assert torch.isfinite(w).all()
        assert all(torch.isfinite(value).all() for value in opt.state[w].values())
    # From a fresh start, zero gradients only: there is nothing to follow, so the weights do not move.
    v = torch.nn.Parameter(torch.randn(20, 12))
    opt = _one_matrix_optimizer(kind, v)
    before = v.detach().clone()
    for _ in range(3):
        v.grad = torch.zeros(20, 12)
        opt.step()
    assert torch.equal(v.detach(), before)
