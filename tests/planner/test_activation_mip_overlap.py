"""ActivationBudget.transfer_overlap: how much of the neighbour block's compute a swap hides behind.

On an accelerator a copy engine moves the bytes while kernels run (overlap 1, MEMO's premise); on a CPU
"device" the copy is a memcpy on the cores that compute (overlap 0): every swapped byte costs its copy time.
"""

from __future__ import annotations

import pytest

from planner.mip.activations import (
    ActivationBudget,
    ActivationInputError,
    LayerCost,
    evaluate_fractions,
    solve_activations,
    transfer_overlap,
)

BW = 1e9  # bytes/s both ways
ACT = 30_000_000  # bytes a block saves: 30 ms to copy out, 30 ms back


def _costs(n: int, *, recompute_s: float) -> list[LayerCost]:
    # forward 40 ms, backward 80 ms: a 30 ms copy hides entirely behind either neighbour window
    return [
        LayerCost(
            layer=i,
            act_bytes=ACT,
            input_bytes=ACT // 20,
            fwd_time_s=0.040,
            bwd_time_s=0.080,
            recompute_time_s=recompute_s,
        )
        for i in range(n)
    ]


def _budget(device_bytes: int, overlap: float) -> ActivationBudget:
    return ActivationBudget(
        device_bytes=device_bytes,
        tier_capacity_bytes=10 * ACT,
        tier_write_bps=BW,
        tier_read_bps=BW,
        transfer_overlap=overlap,
    )


def test_device_kind_sets_the_overlap():
    assert transfer_overlap("cpu") == 0.0
    assert transfer_overlap("cuda") == 1.0 and transfer_overlap("rocm") == 1.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "1"])
def test_overlap_outside_0_1_is_refused_naming_the_field(bad):
    with pytest.raises(ActivationInputError) as err:
        _budget(ACT, bad)
    assert err.value.field == "transfer_overlap" and isinstance(err.value, ValueError)


def test_without_overlap_every_swapped_byte_costs_its_copy_both_ways():
    costs = _costs(4, recompute_s=0.040)
    ones, zeros = [1.0] * 4, [0.0] * 4
    hidden = evaluate_fractions(costs, _budget(10 * ACT, 1.0), zeros, ones, zeros)
    exposed = evaluate_fractions(costs, _budget(10 * ACT, 0.0), zeros, ones, zeros)
    # with overlap only the last block's copies (no next block to hide behind) are exposed
    assert float(hidden.exposed_transfer_s) == pytest.approx(2 * ACT / BW)
    assert float(exposed.exposed_transfer_s) == pytest.approx(4 * 2 * ACT / BW)
    # memory does not depend on where the time goes
    assert float(hidden.device_bytes) == float(exposed.device_bytes)


def test_half_overlap_hides_half_the_window():
    costs = _costs(2, recompute_s=0.040)
    cost = evaluate_fractions(costs, _budget(10 * ACT, 0.5), [0.0, 1.0], [1.0, 0.0], [0.0, 0.0])
    # block 0's copy out (30 ms) against half of block 1's forward (20 ms), back (30 ms) against half of its
    # backward (40 ms)
    assert float(cost.exposed_transfer_s) == pytest.approx(0.010)


def test_cpu_recomputes_when_the_copy_is_dearer_and_an_accelerator_swaps():
    """A copy (2 x 30 ms) dearer than a recompute (20 ms): free when hidden, not on a CPU."""
    costs = _costs(6, recompute_s=0.020)
    budget_bytes = 3 * ACT  # keep-all needs 6 blocks: something must leave the device
    gpu = solve_activations(costs, _budget(budget_bytes, 1.0))
    cpu = solve_activations(costs, _budget(budget_bytes, 0.0))
    assert gpu.fits and cpu.fits
    swapped = lambda sol: sum(p.swap_fraction for p in sol.policies)  # noqa: E731
    recomputed = lambda sol: sum(p.recompute_fraction for p in sol.policies)  # noqa: E731
    assert swapped(gpu) > recomputed(gpu)
    assert recomputed(cpu) > swapped(cpu)
    # the CPU objective prices what it swaps at the full copy time
    assert cpu.objective_s == pytest.approx(cpu.recompute_s + cpu.exposed_transfer_s)
    assert cpu.exposed_transfer_s == pytest.approx(swapped(cpu) * 2 * ACT / BW, rel=1e-6)


def test_cpu_still_swaps_when_the_copy_is_cheaper_than_recompute():
    """The CPU case of memtier bench: a memcpy (2 x 3 ms here) far cheaper than recomputing (20 ms)."""
    costs = [
        LayerCost(layer=c.layer, act_bytes=ACT // 10, input_bytes=ACT // 200, fwd_time_s=0.02,
                  bwd_time_s=0.04, recompute_time_s=0.02)
        for c in _costs(6, recompute_s=0.02)
    ]  # fmt: skip
    cpu = solve_activations(costs, _budget(3 * ACT // 10, 0.0))
    assert cpu.fits
    assert sum(p.swap_fraction for p in cpu.policies) > sum(p.recompute_fraction for p in cpu.policies)
    assert cpu.exposed_transfer_s > 0
