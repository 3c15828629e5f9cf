"""The solver chain: exact MILP, relax-and-fix, LP rounding + greedy repair, greedy.

Every path ends in a Solution that is compared with greedy's on the same
objective; the better one is returned, so a plan is never worse than greedy.
scipy is imported here, lazily, only when a plan is actually computed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from lepton.coordinator.planner.formulation import Formulation
from lepton.coordinator.planner.greedy import Solution, clean, greedy_solution, objective
from lepton.coordinator.planner.problem import Problem

log = logging.getLogger(__name__)

INTEGRAL_TOL = 1e-6
EXACT_SHARE = 0.7  # of the time limit the exact MILP may use before the LP fallback runs


@dataclass
class Outcome:
    """What a path produced."""

    sol: Solution
    path: str
    status: str
    gap: float | None = None
    bound: float | None = None  # lower bound on the internal objective
    notes: list[str] = field(default_factory=list)


def _milp(form: Formulation, *, relax: bool, time_limit: float, gap: float, var_lb=None, var_ub=None):
    from scipy.optimize import Bounds, LinearConstraint, milp

    lb = form.var_lb if var_lb is None else var_lb
    ub = form.var_ub if var_ub is None else var_ub
    return milp(
        form.c,
        integrality=form.integrality(relax),
        bounds=Bounds(lb, ub),
        constraints=LinearConstraint(form.A, form.lb, form.ub),
        options={"time_limit": max(time_limit, 0.05), "mip_rel_gap": gap, "presolve": True, "disp": False},
    )


def _split(form: Formulation, v: np.ndarray) -> Solution:
    nx, ny = form.nx, form.ny
    return Solution(x=v[:nx] > 0.5, y=v[nx:nx + ny], u=v[nx + ny:nx + ny + form.ns])


def _rel_gap(value: float, bound: float) -> float:
    return max(0.0, (value - bound) / max(abs(value), 1e-9))


def exact(prob: Problem, form: Formulation, deadline: float) -> Outcome | None:
    """Branch and bound over the whole pruned problem."""
    res = _milp(form, relax=False, time_limit=deadline - time.monotonic(), gap=prob.params.mip_gap)
    if res.x is None:
        log.info("exact MILP found no solution in time (%s)", res.message)
        return None
    bound = getattr(res, "mip_dual_bound", None)
    gap = getattr(res, "mip_gap", None)
    status = "optimal" if res.status == 0 else "feasible"
    notes = [] if res.status == 0 else [f"MILP stopped: {res.message}"]
    return Outcome(clean(prob, _split(form, res.x)), "milp", status, _num(gap), _num(bound), notes)


def _num(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def relax_and_fix(prob: Problem, form: Formulation, deadline: float) -> Outcome | None:
    """Solve the LP; fix x at 0 or 1 where the LP is integral; MILP over the rest.

    Falls to LP rounding + greedy repair if the sub-MILP finds nothing in time.
    """
    lp = _milp(form, relax=True, time_limit=deadline - time.monotonic(), gap=0.0)
    if lp.x is None:
        log.info("LP relaxation not solved in time (%s)", lp.message)
        return None
    bound = float(lp.fun) if lp.status == 0 else None
    xs = lp.x[: form.nx]
    frac = (xs > INTEGRAL_TOL) & (xs < 1 - INTEGRAL_TOL)
    if not frac.any() and lp.status == 0:
        return Outcome(clean(prob, _split(form, lp.x)), "relax-and-fix", "optimal", 0.0, bound,
                       ["LP relaxation was integral"])
    var_lb, var_ub = form.var_lb.copy(), form.var_ub.copy()
    fixed_one = ~frac & (xs >= 0.5)
    fixed_zero = ~frac & (xs < 0.5)
    var_lb[: form.nx][fixed_one] = 1.0
    var_ub[: form.nx][fixed_zero] = 0.0
    res = _milp(form, relax=False, time_limit=deadline - time.monotonic(), gap=prob.params.mip_gap,
                var_lb=var_lb, var_ub=var_ub)
    note = f"relax-and-fix: {int(frac.sum())} of {form.nx} binaries fractional in the LP"
    if res.x is None:
        log.info("relax-and-fix sub-MILP found nothing in time; rounding the LP")
        return lp_round(prob, form, lp.x, bound, [note])
    sol = clean(prob, _split(form, res.x))
    gap = _rel_gap(objective(prob, sol), bound) if bound is not None else None
    return Outcome(sol, "relax-and-fix", "feasible", gap, bound, [note])


def lp_round(prob: Problem, form: Formulation, v: np.ndarray, bound: float | None, notes: list[str]) -> Outcome:
    """Round the LP placement (largest x first while memory fits), then greedy repair."""
    xs = v[: form.nx]
    held = np.zeros(form.nx, bool)
    mem_left = prob.mem.copy()
    for xi in np.argsort(-xs, kind="stable"):
        if xs[xi] < 0.5:
            break
        need = prob.model_mem[prob.x_m[xi]]
        if mem_left[prob.x_d[xi]] >= need:
            held[xi] = True
            mem_left[prob.x_d[xi]] -= need
    sol = greedy_solution(prob, held)
    gap = _rel_gap(objective(prob, sol), bound) if bound is not None else None
    return Outcome(sol, "lp-round", "feasible", gap, bound, notes)


def solve(prob: Problem, form: Formulation, started: float) -> tuple[Outcome, float]:
    """Run the chain within params.time_limit_s; returns (best outcome, greedy objective)."""
    limit = prob.params.time_limit_s
    deadline = started + limit
    greedy = Outcome(greedy_solution(prob), "greedy", "feasible")
    g_obj = objective(prob, greedy.sol)
    best = None
    try:
        if form.nx <= prob.params.exact_max_binaries:
            best = exact(prob, form, started + EXACT_SHARE * limit)
            if best is None:
                best = relax_and_fix(prob, form, deadline)
        else:
            best = relax_and_fix(prob, form, deadline)
    except (ValueError, MemoryError) as exc:  # HiGHS refusing an instance must not stop planning
        log.warning("solver failed (%s); using greedy", exc)
        greedy.notes.append(f"solver failed: {exc}")
    if best is None or objective(prob, best.sol) > g_obj * (1 + 1e-9) + 1e-9:
        if best is not None:
            greedy.notes.append(f"{best.path} plan was worse than greedy; greedy kept")
            greedy.bound = best.bound
        best = greedy
        if best.bound is not None:
            best.gap = _rel_gap(g_obj, best.bound)
    return best, g_obj
