"""The swap/recompute MIP against its baselines, on a stored instance and on random ones (real CBC solves)."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.mip.activations import (
    FIT_TOL_REL,
    GRANULARITIES,
    STRATEGIES,
    ActivationBudget,
    ActivationInputError,
    ActivationSettings,
    LayerCost,
    evaluate_fractions,
    greedy,
    keep_all,
    least_device_bytes,
    recompute_all,
    solve_activations,
    solve_mip,
)
from planner.mip.common import MipSettings, SolverSettingsError
from planner.plan import ActivationPolicy
from planner.schema import build, to_plain

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
GB = 10**9
TOL_S = 1e-9  # seconds: objectives are compared exactly up to float noise


def load_fixture() -> tuple[list[LayerCost], ActivationBudget]:
    with open(os.path.join(FIXTURES, "activations_llama7b_32k.json"), encoding="utf-8") as f:
        data = json.load(f)
    return [build(LayerCost, c) for c in data["costs"]], build(ActivationBudget, data["budget"])


def fast(granularity: str = "layer", time_limit_s: float = 2.0, solver: str = "cbc") -> ActivationSettings:
    return ActivationSettings(
        recompute_granularity=granularity,  # type: ignore[arg-type]
        mip=MipSettings(time_limit_s=time_limit_s, solver=solver),  # type: ignore[arg-type]
    )


def fractions(sol):  # type: ignore[no-untyped-def]
    return (
        [p.keep_fraction for p in sol.policies],
        [p.swap_fraction for p in sol.policies],
        [p.recompute_fraction for p in sol.policies],
    )


def assert_consistent(sol, costs, budget, granularity: str) -> None:  # type: ignore[no-untyped-def]
    """A fitting solution's numbers are what the shared cost model says of its policies."""
    assert sol.fits
    assert [p.layer for p in sol.policies] == [c.layer for c in costs]
    for p in sol.policies:
        assert isinstance(p, ActivationPolicy)
        assert p.swap_tier == budget.tier
        assert min(p.keep_fraction, p.swap_fraction, p.recompute_fraction) >= 0.0
        if granularity == "layer":
            assert p.recompute_fraction in (0.0, 1.0)
    cost = evaluate_fractions(costs, budget, *fractions(sol))
    assert sol.device_bytes == math.ceil(float(cost.device_bytes))
    assert sol.device_bytes <= budget.device_bytes * (1 + FIT_TOL_REL) + 2
    assert sol.tier_bytes <= budget.tier_capacity_bytes * (1 + FIT_TOL_REL) + 2
    assert sol.objective_s == pytest.approx(float(cost.objective_s), abs=TOL_S)
    assert sol.objective_s == pytest.approx(sol.recompute_s + sol.exposed_transfer_s, abs=TOL_S)


# ---- the stored instance ---------------------------------------------------------------------------


def test_fixture_mip_never_worse_than_any_baseline() -> None:
    costs, budget = load_fixture()
    base = {name: STRATEGIES[name](costs, budget, fast()) for name in ("keep_all", "recompute_all", "greedy")}
    # 146 GB of activations do not stay on a 40 GB budget; recompute-all and the greedy fit
    assert base["keep_all"].status == "infeasible"
    assert base["keep_all"].shortfall_bytes == base["keep_all"].device_bytes - budget.device_bytes > 0
    assert base["recompute_all"].status == "feasible" and base["greedy"].status == "feasible"
    mip = solve_activations(costs, budget, settings=fast(time_limit_s=10.0))
    assert mip.strategy == "mip"
    # 32 identical blocks: the search over the recompute count proves it (plain CBC branching cannot)
    assert mip.status == "optimal"
    assert mip.gap is not None and 0.0 <= mip.gap <= 1e-4
    assert_consistent(mip, costs, budget, "layer")
    for b in base.values():
        if b.fits:
            assert mip.objective_s <= b.objective_s + TOL_S
    # the tier is the binding resource: swapping is used, and recompute-all costs 3x more
    assert mip.tier_bytes > 0.9 * budget.tier_capacity_bytes
    assert base["recompute_all"].objective_s > 3 * mip.objective_s


def test_fixture_token_granularity_is_a_relaxation_of_layer() -> None:
    costs, budget = load_fixture()
    token = solve_mip(costs, budget, fast("token"))
    layer = solve_mip(costs, budget, fast("layer", time_limit_s=10.0))
    assert token.status == "optimal" and token.gap == 0.0  # an LP: always proven
    assert_consistent(token, costs, budget, "token")
    assert layer.status == "optimal"
    # token-wise recompute can only help, and here it does (by ~2%)
    assert token.objective_s < layer.objective_s
    assert any(p.kind == "mixed" for p in token.policies)  # part-recomputed, part-kept blocks


def test_highs_and_cbc_agree_on_the_fixture() -> None:
    costs, budget = load_fixture()
    highs = solve_mip(costs, budget, fast(solver="highs", time_limit_s=10.0))
    cbc = solve_mip(costs, budget, fast(time_limit_s=10.0))
    assert highs.status == "optimal" and highs.gap == pytest.approx(0.0, abs=1e-4)
    assert_consistent(highs, costs, budget, "layer")
    assert highs.objective_s == pytest.approx(cbc.objective_s, rel=1e-4)


# ---- the model itself, by hand --------------------------------------------------------------------


def test_cost_model_by_hand() -> None:
    # two blocks: act 10 GB, input 1 GB; fwd, bwd, recompute 1 s each; tier at 5 GB/s (2 s per block)
    costs = [
        LayerCost(layer=i, act_bytes=10 * GB, input_bytes=GB, fwd_time_s=1, bwd_time_s=1, recompute_time_s=1)
        for i in range(2)
    ]
    budget = ActivationBudget(
        device_bytes=100 * GB, tier_capacity_bytes=100 * GB, tier_write_bps=5e9, tier_read_bps=5e9
    )
    # block 0 swapped, block 1 recomputed: swap-out 2 s - fwd(1) = 1 s exposed; the prefetch of
    # block 0 hides behind block 1's backward + recompute (2 s); recompute 1 s.
    # peaks: block 0: 10 GB; block 1: 0 resident + 10 + 10 of block 0 in flight = 20 GB
    cost = evaluate_fractions(costs, budget, [0, 0], [1, 0], [0, 1])
    assert float(cost.exposed_transfer_s) == pytest.approx(1.0)
    assert float(cost.recompute_s) == pytest.approx(1.0)
    assert cost.layer_peaks.tolist() == pytest.approx([10 * GB, 20 * GB])
    assert float(cost.tier_bytes) == pytest.approx(10 * GB)
    # block 1 kept: the prefetch has only its 1 s backward to hide behind, 1 s more is exposed
    cost = evaluate_fractions(costs, budget, [0, 1], [1, 0], [0, 0])
    assert float(cost.exposed_transfer_s) == pytest.approx(2.0)
    assert float(cost.recompute_s) == 0.0
    # the last block's transfer has no compute to hide behind: 5 GB at 5 GB/s, both ways
    cost = evaluate_fractions(costs, budget, [1, 0.5], [0, 0.5], [0, 0])
    assert float(cost.exposed_transfer_s) == pytest.approx(2.0)
    assert cost.layer_peaks.tolist() == pytest.approx([10 * GB, 20 * GB])
    # all recomputed: block 1's peak is block 0's kept input + its own activations
    cost = evaluate_fractions(costs, budget, [0, 0], [0, 0], [1, 1])
    assert cost.layer_peaks.tolist() == pytest.approx([10 * GB, 11 * GB])


def test_hidden_swap_costs_nothing_and_is_chosen() -> None:
    # transfers of 2 GB at 10 GB/s take 0.2 s < the neighbour's 1 s of compute
    costs = [
        LayerCost(
            layer=i, act_bytes=2 * GB, input_bytes=GB // 10, fwd_time_s=1, bwd_time_s=2, recompute_time_s=1
        )
        for i in range(6)
    ]
    budget = ActivationBudget(
        device_bytes=7 * GB, tier_capacity_bytes=50 * GB, tier_write_bps=10e9, tier_read_bps=10e9
    )
    sol = solve_mip(costs, budget, fast())
    assert sol.status == "optimal" and sol.gap == pytest.approx(0.0, abs=1e-6)
    assert_consistent(sol, costs, budget, "layer")
    assert sol.recompute_s == 0.0
    # only the last block cannot hide its transfer; it stays on the device
    assert sol.objective_s == pytest.approx(0.0, abs=1e-6)
    assert sol.policies[-1].swap_fraction == pytest.approx(0.0, abs=1e-6)
    assert sum(p.swap_fraction for p in sol.policies) > 1.0
    assert recompute_all(costs, budget).objective_s == pytest.approx(6.0)


def test_keep_all_when_it_fits() -> None:
    costs = [
        LayerCost(
            layer=i, act_bytes=GB, input_bytes=GB // 8, fwd_time_s=0.1, bwd_time_s=0.2, recompute_time_s=0.1
        )
        for i in range(4)
    ]
    budget = ActivationBudget(device_bytes=4 * GB)
    for strategy in ("mip", "greedy", "keep_all"):
        sol = solve_activations(costs, budget, strategy=strategy, settings=fast())
        assert sol.objective_s == 0.0 and sol.device_bytes == 4 * GB
        assert all(p.kind == "keep" for p in sol.policies)
    assert solve_activations(costs, budget, settings=fast()).status == "optimal"


def test_infeasible_reports_the_shortfall() -> None:
    # no tier; blocks of 10 GB keeping a 1 GB input: recompute-all peaks at 1 + 1 + 10 = 12 GB
    costs = [
        LayerCost(layer=i, act_bytes=10 * GB, input_bytes=GB, fwd_time_s=1, bwd_time_s=2, recompute_time_s=1)
        for i in range(3)
    ]
    budget = ActivationBudget(device_bytes=11 * GB)
    sol = solve_mip(costs, budget, fast())
    assert sol.status == "infeasible"
    assert sol.policies == ()
    assert sol.shortfall_bytes == GB
    assert sol.device_bytes == 12 * GB == least_device_bytes(costs, budget)
    for baseline in (keep_all, recompute_all, greedy):
        assert baseline(costs, budget).status == "infeasible"
    assert recompute_all(costs, budget).shortfall_bytes == GB
    # a tier does not help here: a swapped block is still in flight while the next one is whole on
    # the device (10 + 10 GB), so recompute-all stays the least-memory plan
    tiered = ActivationBudget(
        device_bytes=11 * GB, tier_capacity_bytes=100 * GB, tier_write_bps=1e10, tier_read_bps=1e10
    )
    assert least_device_bytes(costs, tiered) == 12 * GB
    assert solve_mip(costs, tiered, fast()).shortfall_bytes == GB


# ---- random instances: never worse than any baseline ----------------------------------------------


def random_instance(rng: random.Random) -> tuple[list[LayerCost], ActivationBudget, str]:
    n = rng.randint(2, 9)
    costs = []
    for i in range(n):
        act = rng.randint(1, 40) * GB // 4
        fwd = rng.uniform(0.01, 1.0)
        costs.append(
            LayerCost(
                layer=i,
                act_bytes=act,
                input_bytes=act // rng.randint(2, 20),
                fwd_time_s=fwd,
                bwd_time_s=fwd * rng.uniform(1.0, 3.0),
                recompute_time_s=fwd * rng.uniform(0.5, 1.2),
            )
        )
    total = sum(c.act_bytes for c in costs)
    # the device budget sweeps from a little under recompute-all's peak to above keep-all's
    floor = max(sum(c.input_bytes for c in costs[:i]) + costs[i].act_bytes for i in range(n))
    share = rng.choice([0.0, 1.0, rng.uniform(-0.2, 1.05)])  # boundaries included
    budget = ActivationBudget(
        device_bytes=max(0, int(floor + (total - floor) * share)),
        tier_capacity_bytes=int(total * rng.uniform(0.05, 1.0)) if rng.random() < 0.6 else 0,
        tier_write_bps=rng.uniform(1e9, 5e10),
        tier_read_bps=rng.uniform(1e9, 5e10),
    )
    return costs, budget, rng.choice(GRANULARITIES)


def check_never_worse(costs, budget, granularity) -> bool:  # type: ignore[no-untyped-def]
    """Assert the MIP is never worse than any baseline; True when it is strictly better than all."""
    mip = solve_mip(costs, budget, fast(granularity, time_limit_s=2.0))
    baselines = [keep_all(costs, budget), recompute_all(costs, budget), greedy(costs, budget)]
    fitting = [b for b in baselines if b.fits]
    if mip.status == "infeasible":
        assert not fitting
        assert mip.shortfall_bytes > 0 and mip.policies == ()
        assert mip.device_bytes > budget.device_bytes
        # the least peak is at most what any baseline reaches
        assert mip.device_bytes <= min(b.device_bytes for b in baselines) + 1
        return False
    assert_consistent(mip, costs, budget, granularity)
    for b in fitting:
        assert mip.objective_s <= b.objective_s + TOL_S, (b.strategy, b.objective_s, mip.objective_s)
    return bool(fitting) and mip.objective_s < min(b.objective_s for b in fitting) - 1e-6


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False))
def test_random_instances_mip_never_worse(rng: random.Random) -> None:
    check_never_worse(*random_instance(rng))


def test_seeded_instances_mip_never_worse_and_sometimes_better() -> None:
    rng = random.Random(0)
    outcomes = [check_never_worse(*random_instance(rng)) for _ in range(40)]
    # the MIP is not just the best baseline again: it strictly wins on a good share of instances
    assert sum(outcomes) >= 5


def uneven_blocks(n: int) -> list[LayerCost]:
    """70B-like blocks at 32k tokens with +-15% per-layer variation (benchmarks/activations_solver.py)."""
    act, inp = 34 * 32768 * 8192, 2 * 32768 * 8192
    fwd = (24 * 32768 * 8192**2 + 4 * 32768**2 * 8192) / 156e12
    out = []
    for i in range(n):
        f = 1.0 + 0.3 * (((i * 7919) % 13) / 12.0 - 0.5)
        out.append(
            LayerCost(
                layer=i,
                act_bytes=int(act * f),
                input_bytes=inp,
                fwd_time_s=fwd * f,
                bwd_time_s=2 * fwd * f,
                recompute_time_s=fwd * f,
            )
        )
    return out


@pytest.mark.parametrize("n", [8, 16])
def test_cbc_and_highs_agree_on_uneven_blocks(n: int) -> None:
    # regression: with a MIP start, CBC once proved a non-optimal plan "optimal" here (8 blocks)
    costs = uneven_blocks(n)
    total = sum(c.act_bytes for c in costs)
    budget = ActivationBudget(
        device_bytes=int(0.3 * total),
        tier_capacity_bytes=int(0.45 * total),
        tier_write_bps=25e9,
        tier_read_bps=25e9,
    )
    cbc = solve_mip(costs, budget, fast(time_limit_s=5.0))
    highs = solve_mip(costs, budget, fast(solver="highs", time_limit_s=5.0))
    assert cbc.status == highs.status == "optimal"
    assert cbc.objective_s == pytest.approx(highs.objective_s, rel=1e-3)
    base = greedy(costs, budget).objective_s
    assert cbc.objective_s <= base + TOL_S
    if n == 16:
        # uneven blocks: the greedy is beaten. (At 8 blocks it was too, by a partial swap whose kept share
        # the forward then held twice -- the whole block in flight beside its kept copy -- which the MIP
        # now counts: that plan did not fit.)
        assert cbc.objective_s < base - 1e-6


def test_a_partly_swapped_block_is_whole_in_flight_during_the_next_forward() -> None:
    """Until its swap-out completes (during the next block's forward) a partly swapped block holds its whole
    saved storage beside the compact copy of its kept share; with swap_out_early nothing is in flight."""
    costs = [LayerCost(layer=i, act_bytes=10 * GB, input_bytes=GB, fwd_time_s=1.0, bwd_time_s=2.0,
                       recompute_time_s=1.0) for i in range(2)]  # fmt: skip
    # no prefetch; the forward moment holds 5 GB less than the backward one (no backward temporaries)
    tier = dict(tier_capacity_bytes=100 * GB, tier_write_bps=1e12, tier_read_bps=1e12, prefetch=False,
                forward_slack_bytes=5 * GB)  # fmt: skip
    late = ActivationBudget(device_bytes=100 * GB, **tier)
    early = ActivationBudget(device_bytes=100 * GB, swap_out_early=True, **tier)
    k, s, r = [0.6, 1.0], [0.4, 0.0], [0.0, 0.0]
    # block 1's forward: block 0's kept 6 GB + its whole 10 GB in flight + block 1's 10 GB, less the slack;
    # its backward: block 0's kept 6 GB + block 1's 10 GB
    assert float(evaluate_fractions(costs, late, k, s, r).layer_peaks[1]) == (6 + 10 + 10 - 5) * GB
    assert float(evaluate_fractions(costs, early, k, s, r).layer_peaks[1]) == (6 + 10) * GB
    # in 16 GB the backward lets block 0 keep 6 GB, but the forward then holds 21: the MIP keeps at most
    # 1 GB (forward 1 + 10 + 10 - 5), where counting only the swapped share in flight it kept 6
    sol = solve_mip(costs, ActivationBudget(device_bytes=16 * GB, **tier), fast())
    assert sol.fits and sol.device_bytes <= 16 * GB
    assert sol.policies[0].keep_fraction <= 0.1 + 1e-6 and sol.policies[0].recompute_fraction == 0.0


# ---- records and bad input --------------------------------------------------------------------------


def test_solution_feeds_the_plan() -> None:
    costs, budget = load_fixture()
    sol = greedy(costs, budget)
    report = sol.report()
    assert (report.problem, report.strategy, report.status) == ("activations", "greedy", "feasible")
    rebuilt = tuple(build(ActivationPolicy, to_plain(p)) for p in sol.policies)
    assert rebuilt == sol.policies


def test_bad_input_names_the_field() -> None:
    ok = dict(layer=0, act_bytes=GB, input_bytes=1, fwd_time_s=1.0, bwd_time_s=1.0, recompute_time_s=1.0)
    with pytest.raises(ActivationInputError, match="act_bytes"):
        LayerCost(**{**ok, "act_bytes": -1})
    with pytest.raises(ActivationInputError, match="fwd_time_s"):
        LayerCost(**{**ok, "fwd_time_s": float("nan")})
    with pytest.raises(ActivationInputError, match=r"costs\[1\]\.layer"):
        keep_all([LayerCost(**ok), LayerCost(**ok)], ActivationBudget(device_bytes=GB))
    with pytest.raises(ActivationInputError, match="tier_write_bps"):
        ActivationBudget(device_bytes=GB, tier_capacity_bytes=GB, tier_read_bps=1e9)
    with pytest.raises(ActivationInputError, match="strategy"):
        solve_activations([LayerCost(**ok)], ActivationBudget(device_bytes=GB), strategy="magic")
    with pytest.raises(ActivationInputError, match="recompute_granularity"):
        ActivationSettings(recompute_granularity="block")  # type: ignore[arg-type]
    with pytest.raises(SolverSettingsError, match="time_limit_s"):
        MipSettings(time_limit_s=0)
    with pytest.raises(ActivationInputError, match="costs"):
        keep_all([], ActivationBudget(device_bytes=GB))


def test_tail_bytes_at_the_loss_are_budgeted():
    """The loss's buffers meet every block's resident share: a tail makes the MIP shed more."""
    from planner.mip.activations import ActivationBudget, LayerCost, solve_activations

    costs = [
        LayerCost(
            layer=i, act_bytes=100, input_bytes=10, fwd_time_s=1.0, bwd_time_s=2.0, recompute_time_s=1.0
        )
        for i in range(4)
    ]
    free = solve_activations(costs, ActivationBudget(device_bytes=400))
    assert free.strategy in ("mip", "keep_all") and all(p.keep_fraction == 1 for p in free.policies)
    tight = solve_activations(costs, ActivationBudget(device_bytes=400, tail_bytes=250))
    assert tight.fits and tight.device_bytes <= 400
    resident = sum(p.keep_fraction * 100 + p.recompute_fraction * 10 for p in tight.policies)
    assert resident + 250 <= 400
    for strategy in ("greedy", "keep_all"):
        sol = solve_activations(costs, ActivationBudget(device_bytes=400, tail_bytes=250), strategy=strategy)
        assert not sol.fits or sol.device_bytes <= 400
