"""benchmarks/activations.py's ``memtier`` strategy: the activation MIP fed with measured costs, its plan
checked against the runtime's predicted peak (and tightened while it exceeds), swapping to the NVMe tier."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.activations_trainer import Baseline, Config, bench_plan
from planner.model import ModelSpec

MAX_TIGHTEN = 6  # memtier: re-solves with a tighter MIP budget when the measured-profile check exceeds it


def tier_bandwidth(path: str, sizes: Sequence[int], *, rounds: int = 3) -> tuple[float, float]:
    """Effective (write, read) bytes/s of the NVMe tier `offload.apply` builds, on tensors of `sizes` bytes.

    Each round puts every tensor and waits for the tier, then gets every one back: what one swapped block
    costs, per-tensor overheads included (launch.measure.probe.measure_disk streams 1 MiB blocks of one file).
    Best of `rounds`.
    """
    from offload.tiers import make_tier
    from offload.tiers.factory import tier_settings
    from planner.plan import TierPlan

    total = sum(sizes)
    kind, settings = tier_settings(TierPlan(kind="nvme", capacity_bytes=2 * total + (64 << 20), path=path))
    tensors = [torch.randn(max(1, n // 4)) for n in sizes]
    nbytes = sum(t.numel() * 4 for t in tensors)
    best_w = best_r = math.inf
    with make_tier(kind, **settings) as tier:
        for _ in range(rounds):
            t0 = time.perf_counter()
            handles = [tier.put(t) for t in tensors]
            tier.synchronize()
            t1 = time.perf_counter()
            for h in handles:
                tier.get(h)
            t2 = time.perf_counter()
            for h in handles:
                tier.free(h)
            best_w, best_r = min(best_w, t1 - t0), min(best_r, t2 - t1)
    return nbytes / best_w, nbytes / best_r


# share of a budget memtier's plan leaves unused for the runtime predictor's error
PLAN_MARGIN = 0.02


def pinned_peak_bytes(profiles: Sequence[Any], policies: Sequence[Any], *, head_bytes: int) -> int:
    """The forward-time and loss-time peaks under `policies`, with the runtime's swap sources in flight.

    NOTE: `offload.activations` keeps a swapped tensor's source storage alive until its copy to the tier is
    done, and the compact copy of its kept share is made then (on CPU; on GPU at once), so at the end of
    block l's forward (where the engine waits for block l-1's copies) all of block l-1's saved storage and
    its kept share are alive for a moment; at the loss (before the model's forward hook drains the engine)
    the same holds for the last swapped block. The planner's MIP counts only the swapped share (s x act) in
    flight; on a block swapped at s = 0.39 the measured peak was (1 - s) x act above it.
    """
    resident = [p.resident_bytes(pol) for p, pol in zip(profiles, policies)]
    peak = below = 0
    for l, p in enumerate(profiles):
        pinned = profiles[l - 1].saved_bytes if l and policies[l - 1].mode == "swap" else 0
        peak = max(peak, below + p.forward_peak_bytes + pinned)
        below += resident[l]
    last_pinned = profiles[-1].saved_bytes if policies[-1].mode == "swap" else 0
    return max(peak, below + head_bytes + last_pinned)


def floor_bytes(profiles: Sequence[Any], cfg: Config, head: int) -> int:
    """The lowest activation peak memtier's runtime can reach (runtime-predicted, as the plans are checked):
    every block recomputed, or every block's saved tensors swapped whole, whichever is lower. A budget under
    it has no plan."""
    from offload.activations import BlockPolicy, predict_activation_peak_bytes

    peaks = []
    for mode in ("recompute", "swap"):
        pols = [
            BlockPolicy(layer=i, mode=mode, swap_fraction=1.0, swap_tier="nvme") for i in range(len(profiles))
        ]
        peak = predict_activation_peak_bytes(profiles, pols, head_bytes=head)
        if cfg.check == "runtime":
            peak = max(peak, pinned_peak_bytes(profiles, pols, head_bytes=head))
        peaks.append(peak)
    return min(peaks)


def memtier_plan(
    *,
    cfg: Config,
    spec: ModelSpec,
    profiles: Sequence[Any],
    base: Baseline,
    tier_bps: tuple[float, float],
    budget_bytes: int,
) -> dict[str, Any]:
    """Solve the activation MIP for `budget_bytes` from measured costs (`profiles`: one
    offload.activations.BlockProfile per block; `tier_bps`: the (write, read) bytes/s it plans with); a Plan
    swapping to NVMe."""
    from planner.mip.activations import LayerCost
    from planner.plan import TierPlan

    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    saved_total = sum(p.saved_bytes for p in profiles)
    # what the no-offload peak holds beyond the blocks' saved tensors (embeddings, loss buffers, gradients
    # of activations): counted at the loss, where the MIP's `tail_bytes` sits
    head = max(0, base.act_peak_bytes - saved_total)
    bwd_per_fwd = base.bwd_total_s / max(base.fwd_total_s, 1e-9)
    costs = [
        LayerCost(
            layer=i,
            act_bytes=p.saved_bytes,
            input_bytes=p.input_bytes,
            fwd_time_s=base.block_fwd_s[i],
            # per-block backward is not hooked (full backward hooks change the graph): the step's measured
            # backward/forward ratio times the block's forward
            bwd_time_s=base.block_fwd_s[i] * bwd_per_fwd,
            recompute_time_s=base.block_fwd_s[i],
        )
        for i, p in enumerate(profiles)
    ]
    write_bps, read_bps = tier_bps
    tier_cap = int(saved_total * 1.25) + (64 << 20)
    # the plan aims 2% under the budget: the runtime's predicted peak is within about 1% of the measured one
    target = int(budget_bytes * (1 - PLAN_MARGIN))
    device_bytes = target
    tries = []
    best_fit: tuple[Any, int] | None = None  # the fastest solution whose runtime-predicted peak fits
    for strategy in ("mip", "recompute_all"):
        for _ in range(MAX_TIGHTEN if strategy == "mip" else 1):
            sol, peak = _solve_checked(
                costs, profiles, cfg, head, device_bytes, strategy, write_bps, read_bps, tier_cap, device_kind
            )
            tries.append({"strategy": strategy, "device_bytes": device_bytes, "status": sol.status,
                          "predicted_peak": peak})  # fmt: skip
            if not sol.fits or peak is None:
                break
            if peak <= target:
                if best_fit is None or sol.objective_s < best_fit[0].objective_s:
                    best_fit = (sol, peak)
                break
            device_bytes -= peak - target
        # the MIP's budget, tightened by the runtime's excess, can pass below what recompute-all needs in the
        # MIP's own (coarser) accounting: recompute-all itself is then the other candidate
        device_bytes = target
    if best_fit is not None:
        sol, peak = best_fit
        tries.append({"chosen": sol.strategy, "predicted_peak": peak})
    out: dict[str, Any] = {"tighten": tries, "solution": sol, "fits": best_fit is not None}
    if best_fit is None:
        out["shortfall_bytes"] = sol.shortfall_bytes
        out["floor_bytes"] = floor_bytes(profiles, cfg, head)
        return out
    out["floor_bytes"] = floor_bytes(profiles, cfg, head)
    tiers = (TierPlan(kind="nvme", capacity_bytes=tier_cap, path=cfg.swap_dir),)
    out["plan"] = bench_plan(spec, cfg, sol.policies, tiers)
    out["predicted_peak"] = peak
    out["predicted_step_s"] = base.step["median_s"] + sol.objective_s
    out["modes"] = "".join(
        "R" if a.recompute_fraction >= 0.5 else ("S" if a.swap_fraction > 0 else "K") for a in sol.policies
    )
    out["swap_fractions"] = [round(a.swap_fraction, 4) for a in sol.policies]
    return out


def _solve_checked(
    costs: Any, profiles: Any, cfg: Any, head: int, device_bytes: int, strategy: str,
    write_bps: float, read_bps: float, tier_cap: int, device_kind: str,
) -> tuple[Any, int | None]:  # fmt: skip
    """One activation solve for `device_bytes` and the runtime's predicted peak of its plan (None: no fit)."""
    from offload.activations import BlockPolicy, predict_activation_peak_bytes
    from planner.mip.activations import ActivationBudget, prefetch_helps, solve_activations, transfer_overlap

    ab = ActivationBudget(
        device_bytes=max(0, device_bytes),
        tier_capacity_bytes=tier_cap,
        tier_write_bps=write_bps,
        tier_read_bps=read_bps,
        tier="nvme",
        tail_bytes=head,
        # the planner's rules for this device (a CPU here: the copies compete with compute)
        transfer_overlap=transfer_overlap(device_kind),
        prefetch=prefetch_helps(device_kind, "nvme"),
    )
    sol = solve_activations(costs, ab, strategy=strategy)
    if not sol.fits:
        return sol, None
    policies = [BlockPolicy.from_plan(a, index=i) for i, a in enumerate(sol.policies)]
    peak = predict_activation_peak_bytes(profiles, policies, head_bytes=head)
    if cfg.check == "runtime":
        peak = max(peak, pinned_peak_bytes(profiles, policies, head_bytes=head))
    return sol, peak
