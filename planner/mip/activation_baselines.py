"""The baseline activation strategies: "keep_all", "recompute_all" and MEMO-style "greedy".

Each returns an `ActivationSolution` scored by the same cost model as the MIP (`planner.mip.activation_costs`);
the MIP (`planner.mip.activations.solve_mip`) starts from the best of them and is never worse.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from planner.mip.activation_costs import (
    FIT_TOL_REL,
    ActivationBudget,
    ActivationSettings,
    ActivationSolution,
    LayerCost,
    PolicyCost,
    _cost,
    _fits,
    _Instance,
    _instance,
    _solution,
)

__all__ = ["greedy", "keep_all", "recompute_all"]


def keep_all(
    costs: Sequence[LayerCost], budget: ActivationBudget, settings: ActivationSettings | None = None
) -> ActivationSolution:
    """No offload, no recompute: every block keeps its activations on the device."""
    return _every_block("keep_all", costs, budget, keep=1.0, recompute=0.0)


def recompute_all(
    costs: Sequence[LayerCost], budget: ActivationBudget, settings: ActivationSettings | None = None
) -> ActivationSolution:
    """Full activation checkpointing: every block keeps only its input and is recomputed."""
    return _every_block("recompute_all", costs, budget, keep=0.0, recompute=1.0)


def _every_block(
    strategy: str, costs: Sequence[LayerCost], budget: ActivationBudget, *, keep: float, recompute: float
) -> ActivationSolution:
    """The same keep and recompute shares for every block (nothing swapped)."""
    started = time.perf_counter()
    inst = _instance(costs, budget.transfer_overlap)
    n = len(inst.costs)
    k, s, r = np.full(n, keep), np.zeros(n), np.full(n, recompute)
    return _solution(strategy, inst, budget, k, s, r, status=None, gap=None, started=started)


def _hidden_swap_share(inst: _Instance, budget: ActivationBudget) -> np.ndarray:
    """Share of each block whose swap-out and swap-in both hide behind block l+1 (MEMO's swap ratio)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        by_out = np.where(inst.act > 0, inst.out_window * budget.tier_write_bps / inst.act, 1.0)
        by_in = np.where(inst.act > 0, inst.bwd_next * budget.tier_read_bps / inst.act, 1.0)
    return np.clip(np.minimum(by_out, by_in), 0.0, 1.0)


def greedy(
    costs: Sequence[LayerCost], budget: ActivationBudget, settings: ActivationSettings | None = None
) -> ActivationSolution:
    """MEMO-style greedy: swap what hides behind compute, then buy the rest of the memory cheapest first.

    1. If keeping everything fits, keep everything.
    2. Swap each block's hidden share (its transfer fits in block l+1's compute), in forward
       order while the tier has room: it costs no time.
    3. While the plan does not fit: among "recompute block l" and "swap the rest of block l",
       take the move with the most bytes of excess removed per second added.
    Moves are whole-block, so the answer is valid for both recompute granularities.
    """
    started = time.perf_counter()
    inst = _instance(costs, budget.transfer_overlap)
    n = len(inst.costs)
    k, s, r = np.ones(n), np.zeros(n), np.zeros(n)
    cost = _cost(inst, budget, k, s, r)
    if _fits(cost, budget):
        return _solution("greedy", inst, budget, k, s, r, status=None, gap=None, started=started)

    if budget.can_swap:
        room = float(budget.tier_capacity_bytes)
        for layer, share in enumerate(_hidden_swap_share(inst, budget)):
            if inst.act[layer] <= 0 or room <= 0:
                continue
            take = min(float(share), room / inst.act[layer])
            s[layer], k[layer] = take, 1.0 - take
            room -= take * inst.act[layer]

    def excess(c: PolicyCost) -> np.ndarray:
        over_layers = np.maximum(0.0, c.layer_peaks - budget.device_bytes).sum(axis=-1)
        return over_layers + np.maximum(0.0, c.loss_peak - budget.device_bytes)

    for _ in range(2 * n + 1):
        cost = _cost(inst, budget, k, s, r)
        if _fits(cost, budget):
            break
        room = budget.tier_capacity_bytes - float(cost.tier_bytes)
        # candidate moves as a batch: rows 0..n-1 recompute block l, rows n..2n-1 swap the rest of block l
        K, S, R = (np.tile(a, (2 * n, 1)) for a in (k, s, r))
        idx = np.arange(n)
        K[idx, idx], S[idx, idx], R[idx, idx] = 0.0, 0.0, 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            more = (
                np.where(inst.act > 0, np.minimum(k, max(room, 0.0) / inst.act), 0.0)
                if budget.can_swap
                else 0 * k
            )
        S[n + idx, idx] += more
        K[n + idx, idx] -= more
        valid = np.concatenate([r < 1.0, more > 0])
        trial = _cost(inst, budget, K, S, R)
        gain = excess(cost) - excess(trial)
        added = trial.objective_s - cost.objective_s
        score = np.where(added > 1e-15, gain / np.maximum(added, 1e-15), np.inf)
        score = np.where(
            valid & (gain > 0) & (trial.tier_bytes <= budget.tier_capacity_bytes * (1 + FIT_TOL_REL) + 1.0),
            score,
            -np.inf,
        )
        best = int(np.argmax(score))
        if score[best] == -np.inf:
            break  # no move removes any excess: infeasible
        k, s, r = K[best].copy(), S[best].copy(), R[best].copy()
        k = np.maximum(0.0, 1.0 - s - r)
    return _solution("greedy", inst, budget, k, s, r, status=None, gap=None, started=started)
