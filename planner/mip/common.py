"""Shared plumbing of the planner's MIPs: solver settings, one solve call, a typed outcome.

Every MIP is written with PuLP and solved by its bundled CBC (HiGHS through highspy
as an alternative), with an explicit time limit and relative gap. `run_mip` returns
what happened as a typed `MipOutcome` (status, objective, best bound, gap, seconds):
no `-1` sentinels, no exceptions for an infeasible model.

CBC does not hand PuLP its best bound, so it is read from CBC's own summary
("Lower bound:" after "Result - Stopped on time limit"); HiGHS reports it directly
(`getInfo().mip_dual_bound`).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from planner.errors import SpecError
from planner.plan import SolverStatus as SolverStatus  # SolverReport.status, defined with it

SolverName = Literal["cbc", "highs"]
SOLVERS: tuple[SolverName, ...] = ("cbc", "highs")


class SolverSettingsError(SpecError):
    """A solver setting out of range (names the field)."""


@dataclass(frozen=True, kw_only=True)
class MipSettings:
    """How long and how exactly a MIP is solved."""

    time_limit_s: float = field(default=10.0, metadata={"positive": True})  # wall-clock seconds
    gap_rel: float = field(default=1e-4, metadata={"min": 0.0})  # stop when (obj - bound) / |obj| <= this
    solver: SolverName = "cbc"
    threads: int = field(default=1, metadata={"positive": True})  # 2 cores, shared with other work

    def __post_init__(self) -> None:
        if not (isinstance(self.time_limit_s, int | float) and self.time_limit_s > 0):
            raise SolverSettingsError(f"must be > 0 seconds, got {self.time_limit_s!r}", field="time_limit_s")
        if not (isinstance(self.gap_rel, int | float) and 0.0 <= self.gap_rel < 1.0):
            raise SolverSettingsError(f"must be in [0, 1), got {self.gap_rel!r}", field="gap_rel")
        if self.solver not in SOLVERS:
            raise SolverSettingsError(f"expected one of {SOLVERS}, got {self.solver!r}", field="solver")
        if not (isinstance(self.threads, int) and self.threads >= 1):
            raise SolverSettingsError(f"must be an integer >= 1, got {self.threads!r}", field="threads")


MipOutcomeStatus = Literal["optimal", "time_limit", "infeasible", "no_solution"]


@dataclass(frozen=True, kw_only=True)
class MipOutcome:
    """What one solver run produced (variable values are left on the PuLP variables)."""

    status: MipOutcomeStatus  # no_solution: stopped (time limit) before finding any feasible point
    objective: float | None  # the incumbent's objective in model units; None without a solution
    bound: float | None  # best proven bound on the objective (a lower bound: models minimise)
    gap: float | None  # (objective - bound) / |objective|; None when unknown
    seconds: float  # wall-clock seconds of the solver call

    @property
    def has_solution(self) -> bool:
        return self.status in ("optimal", "time_limit")


def relative_gap(objective: float, bound: float | None) -> float | None:
    """(objective - bound) / max(|objective|, tiny): the gap convention of CBC and HiGHS."""
    if bound is None or not math.isfinite(bound):
        return None
    return max(0.0, (objective - bound) / max(abs(objective), 1e-12))


_CBC_BOUND = re.compile(r"^Lower bound:\s+(\S+)", re.MULTILINE)
_CBC_RESULT = re.compile(r"^Result - (.*)$", re.MULTILINE)


def run_mip(problem: Any, settings: MipSettings, *, warm_start: bool = False) -> MipOutcome:
    """Solve the minimisation `problem` (a pulp.LpProblem) under `settings`.

    With `warm_start`, the variables' initial values (`setInitialValue`) are given to the
    solver as a starting incumbent, so the answer is never worse than that start.
    """
    import pulp

    if problem.sense != pulp.LpMinimize:
        raise SolverSettingsError("run_mip solves minimisation problems only", field="problem.sense")
    start = time.perf_counter()
    # CBC hands back a pure LP's start point unchanged as "optimal"; an LP needs no start anyway
    warm_start = warm_start and problem.isMIP()
    if settings.solver == "highs":
        outcome = _run_highs(problem, settings, warm_start=warm_start)
    else:
        outcome = _run_cbc(problem, settings, warm_start=warm_start)
    return MipOutcome(
        status=outcome[0],
        objective=outcome[1],
        bound=outcome[2],
        gap=relative_gap(outcome[1], outcome[2]) if outcome[1] is not None else None,
        seconds=time.perf_counter() - start,
    )


def _status_from_pulp(problem: Any) -> MipOutcomeStatus:
    import pulp

    if problem.status == pulp.LpStatusInfeasible:
        return "infeasible"  # CBC's "Integer infeasible" carries no solution status of its own
    if problem.sol_status == pulp.LpSolutionOptimal:
        return "optimal"
    if problem.sol_status == pulp.LpSolutionIntegerFeasible:
        return "time_limit"
    if problem.sol_status in (pulp.LpSolutionInfeasible, pulp.LpSolutionUnbounded):
        return "infeasible"
    return "no_solution"


def _run_cbc(
    problem: Any, settings: MipSettings, *, warm_start: bool
) -> tuple[MipOutcomeStatus, float | None, float | None]:
    import pulp

    with tempfile.TemporaryDirectory(prefix="memtier-cbc-") as tmp:
        log_path = os.path.join(tmp, "cbc.log")
        solver = pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=settings.time_limit_s,
            gapRel=settings.gap_rel,
            threads=settings.threads,
            warmStart=warm_start,
            logPath=log_path,
        )
        failed = False
        try:
            problem.solve(solver)
        except pulp.PulpSolverError:
            failed = True  # CBC exited abnormally: reported as no solution, the caller falls back
        try:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                log = f.read()
        except OSError:
            log = ""
        if os.environ.get("MEMTIER_CBC_LOG"):
            with open(os.environ["MEMTIER_CBC_LOG"], "w", encoding="utf-8") as f:
                f.write(log)
    if failed:
        return "no_solution", None, None
    status = _status_from_pulp(problem)
    if status not in ("optimal", "time_limit"):
        return status, None, None
    objective = float(pulp.value(problem.objective) or 0.0)
    bound: float | None = objective if status == "optimal" else None
    m = _CBC_BOUND.search(log)
    if m:
        try:
            bound = min(objective, float(m.group(1)))
        except ValueError:
            pass
    result = _CBC_RESULT.search(log)
    if status == "optimal" and result and "time limit" in result.group(1).lower():
        status = "time_limit"  # PuLP reports CBC's stopped-on-time incumbent as optimal in some versions
    return status, objective, bound


def _run_highs(
    problem: Any, settings: MipSettings, *, warm_start: bool
) -> tuple[MipOutcomeStatus, float | None, float | None]:
    import pulp

    class _WarmHiGHS(pulp.HiGHS):  # type: ignore[misc, name-defined]
        # PuLP's HiGHS API class ignores initial values; hand them to highspy before run()
        def callSolver(self, lp: Any) -> None:
            if warm_start:
                import highspy

                sol = highspy.HighsSolution()
                sol.col_value = [float(v.varValue or 0.0) for v in lp.variables()]
                sol.value_valid = True
                lp.solverModel.setSolution(sol)
            lp.solverModel.run()

    solver = _WarmHiGHS(
        msg=False, timeLimit=settings.time_limit_s, gapRel=settings.gap_rel, threads=settings.threads
    )
    problem.solve(solver)
    status = _status_from_pulp(problem)
    if status not in ("optimal", "time_limit"):
        return status, None, None
    objective = float(pulp.value(problem.objective) or 0.0)
    info = problem.solverModel.getInfo()
    reported = float(getattr(info, "mip_dual_bound", objective))
    bound: float | None = min(reported, objective)
    if not problem.isMIP() or not math.isfinite(reported):
        bound = objective if status == "optimal" else None  # an LP (no integers) reports no MIP bound
    return status, objective, bound
