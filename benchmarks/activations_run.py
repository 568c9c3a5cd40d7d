"""benchmarks/activations.py's run: the no-offload baseline, then every strategy at every budget side by side,
each a row of the JSON (a failed strategy is a visible row)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from benchmarks.activations_memtier import PLAN_MARGIN, memtier_plan, tier_bandwidth
from benchmarks.activations_torch import (
    block_sac_stats,
    compiled_blocks,
    sac_decisions,
    sac_module_info,
    selective_checkpoint,
)
from benchmarks.activations_trainer import (
    Baseline,
    Config,
    Trainer,
    bench_plan,
    block_call_of,
    measure_baseline,
    prepared,
    progress,
)
from planner.model import ModelSpec


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000] + "\n" + traceback.format_exc(limit=-3)[-1500:]


@dataclasses.dataclass(kw_only=True)
class Bench:
    """What every strategy run reads: the trainer, the measured baseline and the measured costs."""

    cfg: Config
    spec: ModelSpec
    tr: Trainer
    base: Baseline
    profiles: list[Any]  # offload.activations.BlockProfile per block
    block_call: tuple[tuple[Any, ...], dict[str, Any]]  # block 0's (args, kwargs) as the model calls it
    param_bytes: int
    tier_bps: tuple[float, float]  # (write, read) the MIP plans with
    sac: tuple[Any, dict[str, Any]] | None = None  # (SACStats of one block, ModuleInfo), built on first use
    # partitioner budget -> (block profiles, no-offload Baseline) measured under compile, on first use
    compiled_costs: dict[float, tuple[list[Any], Baseline]] = dataclasses.field(default_factory=dict)
    start_params: list[torch.Tensor] = dataclasses.field(default_factory=list)  # see `attempt`

    @property
    def base_s(self) -> float:
        return float(self.base.step["median_s"])

    @property
    def saved_total(self) -> int:
        return sum(p.saved_bytes for p in self.profiles)

    def budget(self, frac: float) -> int:
        return int(frac * self.base.act_peak_bytes)

    def planning_budget(self, frac: float) -> int:
        """What every strategy that plans against a budget is given: the budget less the same margin
        (PLAN_MARGIN) memtier plans to, so no competitor is asked to land exactly on the line."""
        return int(self.budget(frac) * (1 - PLAN_MARGIN))

    def measure(self, install: Callable[[], Any]) -> dict[str, Any]:
        """Step time (median) and activation peak with `install()`'s context active."""
        t0 = time.perf_counter()
        # no-offload steps right before: the ratio is taken against them, so that load from other processes
        # drifting during the run (a shared machine) moves both sides of it
        adjacent_steps = self.tr.timed(self.cfg.steps, 0)
        adjacent = adjacent_steps["median_s"]
        with install() as extra:
            timing = self.tr.timed(self.cfg.steps, self.cfg.warmup)
            peak = self.tr.activation_peak()
            installed = dict(extra) if isinstance(extra, Mapping) else {}
        return {
            "step": timing,
            "adjacent_base_s": adjacent,
            "adjacent_base_min_s": min(adjacent_steps["times_s"]),
            "act_peak_bytes": peak,
            "wall_s": time.perf_counter() - t0,
            "installed": installed,
        }

    def row(
        self, strategy: str, frac: float, measured: dict[str, Any] | None, **extra: Any
    ) -> dict[str, Any]:
        budget = self.budget(frac)
        row: dict[str, Any] = {"strategy": strategy, "budget_fraction": frac, "budget_bytes": budget, **extra}
        if measured is not None:
            med = measured["step"]["median_s"]
            base_s = measured.get("adjacent_base_s", self.base_s)
            row.update(
                status="ok",
                step_s=med,
                base_step_s=base_s,
                step_ratio=med / base_s,
                # fastest step / fastest adjacent no-offload step: less moved by bursts of load from other
                # processes than the medians (both sides' fastest steps are the least disturbed ones)
                step_ratio_min=min(measured["step"]["times_s"])
                / measured.get("adjacent_base_min_s", min(self.base.step["times_s"])),
                step_ratio_to_first_baseline=med / self.base_s,
                times_s=measured["step"]["times_s"],
                warmup_s=measured["step"]["warmup_s"],
                act_peak_bytes=measured["act_peak_bytes"],
                peak_over_budget=measured["act_peak_bytes"] / budget,
                fits=measured["act_peak_bytes"] <= budget,
                losses=measured["step"]["losses"],
            )
            if not all(math.isfinite(x) for x in measured["step"]["losses"]):
                # a strategy whose steps break the training is not a result: the row says so, never a ratio
                row.update(status="error", error="non-finite loss in its timed steps", fits=False)
        row.setdefault("status", "not_run")
        return row

    def attempt(self, strategy: str, fracs: Sequence[float], fn: Callable[[], list[dict[str, Any]]]):
        """`fn()`'s rows, or one error row per budget when it raises (a failed strategy is a visible row).
        Every strategy starts from the parameters the baseline ended with (`start_params`), so one that breaks
        them (non-finite values) is caught in its own row and never carried into the next."""
        with torch.no_grad():
            for p, p0 in zip(self.tr.model.parameters(), self.start_params, strict=True):
                p.copy_(p0)
        try:
            rows = fn()
        except Exception as exc:  # noqa: BLE001 - recorded with its message, the run goes on
            rows = [self.row(strategy, f, None, status="error", error=_error(exc)) for f in fracs]
        finite = all(bool(torch.isfinite(p).all()) for p in self.tr.model.parameters())
        for r in rows:
            r["params_finite_after"] = finite
            if not finite and r.get("status") == "ok":
                r.update(status="error", error="non-finite parameters after its steps", fits=False)
            progress(_summary(r))
        return rows

    # ---- strategies
    def recompute_all(self) -> list[dict[str, Any]]:
        import offload
        from planner.plan import ActivationPolicy

        acts = tuple(
            ActivationPolicy(layer=i, keep_fraction=0.0, recompute_fraction=1.0)
            for i in range(len(self.profiles))
        )
        plan = bench_plan(self.spec, self.cfg, acts)
        m = self.measure(lambda: offload.apply(self.tr.model, None, plan))
        return [self.row("recompute_all", f, m) for f in self.cfg.budgets]

    def memtier(self, frac: float) -> list[dict[str, Any]]:
        return self._memtier("memtier", frac, [(None, self.profiles, self.base)])

    def memtier_compile(self, frac: float) -> list[dict[str, Any]]:
        """memtier's plan on compiled blocks: per block keep / swap a token share / recompute, on top of the
        partitioner's own budget inside every block, chosen among the compile_budget strategy's shares, 1.0
        and the share refined for this budget (`refined_share`), each measured (saved tensors, forward times,
        step), by the MIP's predicted step time."""
        from offload.activations import CompileOptions

        shares = sorted({1.0, *(round(self.compile_share(f), 4) for f in self.cfg.budgets)}, reverse=True)
        for share in shares:
            self._compiled_costs(share)
        refined = self.refined_share(frac)
        if refined is not None:
            self._compiled_costs(refined)
            shares.append(refined)
        candidates = []
        for share in shares:
            options = CompileOptions(backend=self.cfg.compile_backend, activation_memory_budget=share)
            candidates.append((options, *self.compiled_costs[share]))
        return self._memtier("memtier_compile", frac, candidates)

    def _compiled_costs(self, share: float) -> None:
        """Measure the compiled blocks' costs at partitioner budget `share` once (`compiled_costs`)."""
        from benchmarks.activations_compile import compiled_costs
        from offload.activations import CompileOptions

        if share in self.compiled_costs:
            return
        options = CompileOptions(backend=self.cfg.compile_backend, activation_memory_budget=share)
        costs = compiled_costs(self.tr, self.spec, self.cfg, self.base, self.profiles, options)
        self.compiled_costs[share] = costs
        progress(
            f"under compile (partitioner budget {share:.2f}): blocks save "
            f"{sum(p.saved_bytes for p in costs[0]) / 2**20:.1f} MiB (eager {self.saved_total / 2**20:.1f}), "
            f"no-offload peak {costs[1].act_peak_bytes / 2**20:.1f} MiB, {costs[1].step['median_s']:.3f} s/step"
        )

    def refined_share(self, frac: float) -> float | None:
        """The partitioner budget whose compiled no-offload peak would land on the planning line, interpolated
        linearly between the two measured budgets whose peaks bracket it; None when none do or it was measured.

        A budget given as a share of the eager saved bytes (`compile_share`) can land far under the line:
        the min-cut saves less than eager does even at 1.0 (fusion), so the share recomputes more than the
        budget asks. memtier measures the budget it plans on rather than trusting that mapping."""
        line = self.planning_budget(frac)
        peaks = sorted(
            (share, base.act_peak_bytes) for share, (_profiles, base) in self.compiled_costs.items()
        )
        for (lo, p_lo), (hi, p_hi) in zip(peaks, peaks[1:], strict=False):
            if p_lo <= line < p_hi:
                share = round(lo + (line - p_lo) / (p_hi - p_lo) * (hi - lo), 4)
                return None if share in self.compiled_costs else share
        return None

    def _best_plan(self, budget_bytes: int, candidates: Sequence[tuple[Any, Any, Baseline]]):
        """The fastest (by the MIP's predicted step) fitting plan over the candidates, or the last infeasible
        answer; with the candidate's (options, profiles, base)."""
        best = None
        for cand in candidates:
            _options, profiles, base = cand
            mp = memtier_plan(
                cfg=self.cfg, spec=self.spec, profiles=profiles, base=base, tier_bps=self.tier_bps,
                budget_bytes=budget_bytes,
            )  # fmt: skip
            if best is None or (
                mp["fits"] and (not best[0]["fits"] or mp["predicted_step_s"] < best[0]["predicted_step_s"])
            ):
                best = (mp, cand)
        assert best is not None  # candidates is never empty
        return best

    def _memtier(self, name: str, frac: float, candidates: Sequence[tuple[Any, Any, Baseline]]):
        """memtier's budget search: plan, measure the plan's activation peak once, and while it is above the
        line (the budget less half the planning margin) re-plan for the budget less the excess, or less the
        measured-over-predicted gap if that is more (up to 4 times)."""
        from benchmarks.activations_compile import applied, grad_check, swap_recompute_summary

        budget = self.budget(frac)
        line = int(budget * (1 - PLAN_MARGIN / 2))
        shrink, calibration = 0, []
        for _ in range(4):
            mp, (options, profiles, base) = self._best_plan(budget - shrink, candidates)
            if not mp["fits"]:
                break
            with applied(self.tr, mp["plan"], compile=options):
                self.tr.step()  # warm-up (compiles)
                peak = self.tr.activation_peak()
            calibration.append(
                {"shrink_bytes": shrink, "predicted_peak": mp["predicted_peak"], "measured_peak": peak}
            )
            if peak <= line:
                break
            # re-plan for the budget less the excess, and at least so far below it that the MIP's own target
            # ((budget - shrink) x (1 - PLAN_MARGIN)) plus what the runtime measured beyond the plan's predicted
            # peak lands on the line
            gap = max(0, peak - mp["predicted_peak"])
            shrink = max(shrink + peak - line, budget - int((line - gap) / (1 - PLAN_MARGIN)))
        sol = mp["solution"]
        info: dict[str, Any] = {
            "mip_status": sol.status, "tighten": mp["tighten"], "mip_seconds": sol.seconds, "calibration": calibration,
        }  # fmt: skip
        if options is not None:
            info.update(compile_backend=options.backend, partitioner_budget=options.activation_memory_budget)
        if not mp["fits"] or calibration[-1]["measured_peak"] > line:
            info.update(shortfall_bytes=sol.shortfall_bytes, floor_bytes=mp.get("floor_bytes"))
            if calibration:  # the MIP found plans, but none measured under the line
                info["lowest_measured_peak_bytes"] = min(c["measured_peak"] for c in calibration)
            return [self.row(name, frac, None, status="infeasible", **info)]
        plan = mp["plan"]
        if options is not None:
            info.update(grad_check(self.tr, plan, options))
        m = self.measure(lambda: applied(self.tr, plan, compile=options))
        steps_run = self.cfg.warmup + self.cfg.steps + 1  # the timed steps and the profiled one
        info.update(swap_recompute_summary(profiles, plan.activations, m["installed"], steps_run))
        if "compiled" in m["installed"]:  # per block: compiled, or eager and why (never silently)
            info["compiled_blocks"] = m["installed"]["compiled"]
        return [
            self.row(
                name,
                frac,
                m,
                predicted_step_s=mp["predicted_step_s"],
                # the MIP's added seconds on top of the adjacent no-offload step, from the step it planned on:
                # the eager no-offload one (ratio 1), or the compiled one for memtier_compile
                predicted_step_ratio=base.step["median_s"] / self.base_s
                + sol.objective_s / m["adjacent_base_s"],
                predicted_act_peak_bytes=mp["predicted_peak"],
                modes=mp["modes"],
                swap_fractions=mp["swap_fractions"],
                added_s=sol.objective_s,
                **info,
            )
        ]

    def sac_milp(self, frac: float) -> list[dict[str, Any]]:
        if self.sac is None:
            args, kwargs = self.block_call
            stats = block_sac_stats(self.tr.blocks[0], args, kwargs)
            info = sac_module_info(
                stats=stats, profiles=self.profiles, base=self.base, param_bytes=self.param_bytes
            )
            self.sac = (stats, info)
            progress(f"sac stats: {len(stats.func_names)} ops per block, {sum(stats.runtimes):.1f} ms")
        stats, module_info = self.sac
        dec = sac_decisions(
            stats=stats,
            module_info=module_info,
            budget_bytes=self.planning_budget(frac),
            param_bytes=self.param_bytes,
        )
        info = {k: v for k, v in dec.items() if k != "save"}
        info["planned_budget_bytes"] = self.planning_budget(frac)
        if not dec["feasible"]:
            return [self.row("sac_milp", frac, None, status="infeasible", **info)]
        save = dec["save"]
        m = self.measure(lambda: selective_checkpoint(list(self.tr.blocks), save))
        seen = m["installed"]
        info.update(
            saved_ops={str(i): sum(s) for i, s in save.items()},
            ops_per_block=len(stats.func_names),
            policy_calls_per_block={str(k): v for k, v in seen.items()},
            op_alignment_ok=all(v == len(stats.func_names) for v in seen.values()),
        )
        return [self.row("sac_milp", frac, m, **info)]

    def compiled(self, name: str, fracs: Sequence[float], share: float) -> list[dict[str, Any]]:
        backend = self.cfg.compile_backend
        m = self.measure(lambda: compiled_blocks(list(self.tr.blocks), backend=backend, budget=share))
        info = {"compile_backend": backend, "compile_budget_fraction": share}
        return [self.row(name, f, m, **info) for f in fracs]

    def compile_share(self, frac: float) -> float:
        """The share of the blocks' saved bytes a budget leaves after the bytes no block policy touches."""
        head = max(0, self.base.act_peak_bytes - self.saved_total)
        return min(1.0, max(0.0, (self.planning_budget(frac) - head) / self.saved_total))


DEFINITIONS = {
    "act_peak_bytes": "peak bytes allocated during one training step above the bytes live at its start "
    "(params, grads, optimizer state, batch); torch.profiler allocator accounting, main thread",
    "budget_bytes": "budget_fraction x the no-offload act_peak_bytes",
    "fits": "act_peak_bytes <= budget_bytes",
    "step_ratio": "median step time / median no-offload step time measured right before it (base_step_s)",
    "step_ratio_min": "fastest step time / fastest of the no-offload steps measured right before it",
    "predicted_step_ratio": "memtier: 1 + the MIP's added seconds / base_step_s",
    "swap_bytes_per_step_measured": "memtier: bytes the swap engine wrote to the tier over the strategy's steps / "
    "steps (planned: the block profiles' swapped share under the plan)",
    "recomputed_saved_bytes": "memtier: saved bytes the recomputed blocks do not hold (their saved bytes less "
    "their inputs; under compile: the compiled blocks' saved bytes)",
    "floor_bytes": "memtier, infeasible budgets: the lowest runtime-predicted peak (every block recomputed, or "
    "every block swapped whole); lowest_measured_peak_bytes: the lowest peak its plans measured (calibration)",
    "grad_max_abs_diff": "memtier_compile: largest |gradient difference| against the compiled model without memtier, "
    "same parameters and batch (grad_within_tol: torch.allclose at atol = rtol = grad_tol)",
    "compile_budget_fraction": "activation_memory_budget given to the partitioner: (budget x (1 - PLAN_MARGIN) - the no-offload "
    "peak's bytes outside the blocks' saved tensors) / the blocks' saved bytes, clamped to [0, 1]",
}


def run(cfg: Config) -> dict[str, Any]:
    from launch.measure.probe import measure_disk
    from offload.activations import profile_blocks

    started = time.perf_counter()
    os.makedirs(cfg.swap_dir, exist_ok=True)
    spec, tr, loss_handle = prepared(cfg)
    param_bytes = sum(p.numel() * p.element_size() for p in tr.model.parameters())
    progress(
        f"{spec.name} x{spec.num_layers} layers, {param_bytes / 2**20:.0f} MiB params, batch {cfg.batch}x"
        f"{cfg.seq_len}, loss {cfg.loss}, {cfg.threads} thread(s)"
    )
    try:
        base = measure_baseline(tr, cfg)
        progress(
            f"no offload: {base.step['median_s']:.3f} s/step, activation peak "
            f"{base.act_peak_bytes / 2**20:.1f} MiB "
            f"(MemTracker {base.memtracker_act_peak_bytes / 2**20:.1f} MiB)"
        )
        profiles = profile_blocks(tr.model, tr.ids)
        disk_w, disk_r, direct = measure_disk(cfg.swap_dir, cfg.disk_probe_mib << 20)
        tier_w, tier_r = tier_bandwidth(cfg.swap_dir, [b for b, _ in profiles[0].saved_tensors])
        progress(
            f"NVMe at {cfg.swap_dir}: file I/O write {disk_w / 1e9:.2f} / read {disk_r / 1e9:.2f} GB/s "
            f"(O_DIRECT {direct}); the tier on one block's {len(profiles[0].saved_tensors)} saved tensors "
            f"({profiles[0].saved_bytes / 2**20:.1f} MiB): write {tier_w / 1e9:.2f} / read "
            f"{tier_r / 1e9:.2f} GB/s"
        )
        bench = Bench(
            cfg=cfg,
            spec=spec,
            tr=tr,
            base=base,
            profiles=profiles,
            block_call=block_call_of(tr),
            param_bytes=param_bytes,
            tier_bps=(tier_w, tier_r) if cfg.bandwidth == "tier" else (disk_w, disk_r),
            start_params=[p.detach().clone() for p in tr.model.parameters()],
        )
        fracs = cfg.budgets
        baseline_m = {"step": base.step, "act_peak_bytes": base.act_peak_bytes}
        rows = [bench.row("no_offload", f, baseline_m) for f in fracs]
        if "recompute_all" in cfg.strategies:
            rows += bench.attempt("recompute_all", fracs, bench.recompute_all)
        for f in fracs:
            for name in ("memtier", "memtier_compile", "sac_milp"):
                if name in cfg.strategies:
                    rows += bench.attempt(name, [f], functools.partial(getattr(bench, name), f))
            if "compile_budget" in cfg.strategies:
                share = bench.compile_share(f)
                rows += bench.attempt(
                    "compile_budget", [f], lambda f=f, s=share: bench.compiled("compile_budget", [f], s)
                )
        if "compile_nobudget" in cfg.strategies:
            rows += bench.attempt(
                "compile_nobudget", fracs, lambda: bench.compiled("compile_nobudget", fracs, 1.0)
            )
    finally:
        if loss_handle is not None:
            loss_handle.remove()
    stats = bench.sac[0] if bench.sac is not None else None
    return {
        "question": "What does an activation memory budget cost in step time?",
        "config": dataclasses.asdict(cfg),
        "definitions": DEFINITIONS,
        "model": dataclasses.asdict(spec),
        "param_bytes": param_bytes,
        "baseline": dataclasses.asdict(base),
        "block_profile": dataclasses.asdict(profiles[0]),
        "nvme": {
            "path": cfg.swap_dir,
            "planned_with": cfg.bandwidth,
            "file_write_bps": disk_w,
            "file_read_bps": disk_r,
            "tier_write_bps": tier_w,
            "tier_read_bps": tier_r,
            "direct_io": direct,
        },
        "sac_stats": None
        if stats is None
        else {
            "ops": len(stats.func_names),
            "op_memory_bytes": sum(stats.memory),
            "op_runtime_ms": sum(stats.runtimes),
        },
        "rows": rows,
        "elapsed_s": time.perf_counter() - started,
    }


def _summary(row: dict[str, Any]) -> str:
    head = f"{row['strategy']} @ {row['budget_fraction']:.0%}"
    if row["status"] != "ok":
        return f"{head}: {row['status']} {row.get('error', '').splitlines()[0] if row.get('error') else ''}"
    pred = f" (predicted x{row['predicted_step_ratio']:.2f})" if "predicted_step_ratio" in row else ""
    return (
        f"{head}: x{row['step_ratio']:.2f}{pred}, peak {row['act_peak_bytes'] / 2**20:.1f} MiB vs budget "
        f"{row['budget_bytes'] / 2**20:.1f} MiB -> {'fits' if row['fits'] else 'EXCEEDS'}"
    )
