"""The solver chain: exact MILP, relax-and-fix, LP rounding + greedy repair, greedy;
and for large fleets a large-neighbourhood search over blocks of streams.

Every path ends in a Solution that is compared with greedy's on the same
objective; the better one is returned, so a plan is never worse than greedy.
scipy is imported here, lazily, only when a plan is actually computed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from lepton.coordinator.planner import blocks
from lepton.coordinator.planner.formulation import Formulation
from lepton.coordinator.planner.greedy import Solution, clean, greedy_solution, objective
from lepton.coordinator.planner.problem import Problem

log = logging.getLogger(__name__)

INTEGRAL_TOL = 1e-6
EXACT_SHARE = 0.5  # of the time limit the exact MILP may use before relax-and-fix runs
RELAX_SHARE = 0.85  # ... and relax-and-fix, before blocks improve greedy with the rest


@dataclass
class Outcome:
    """What a path produced."""

    sol: Solution
    path: str
    status: str
    gap: float | None = None
    bound: float | None = None  # lower bound on the internal objective
    notes: list[str] = field(default_factory=list)


def milp_arrays(form: Formulation, *, relax: bool, time_limit: float, gap: float, var_lb=None, var_ub=None):
    """scipy.optimize.milp (HiGHS) on a Formulation, with optional variable bounds."""
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


def _rel_gap(value: float, bound: float | None) -> float | None:
    if bound is None:
        return None
    return max(0.0, (value - bound) / max(abs(value), 1e-9))


def _num(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def exact(prob: Problem, form: Formulation, deadline: float) -> Outcome | None:
    """Branch and bound over the whole pruned problem."""
    res = milp_arrays(form, relax=False, time_limit=deadline - time.monotonic(), gap=prob.params.mip_gap)
    if res.x is None:
        log.info("exact MILP found no solution in time (%s)", res.message)
        return None
    status = "optimal" if res.status == 0 else "feasible"
    notes = [] if res.status == 0 else [f"MILP stopped: {res.message}"]
    return Outcome(clean(prob, _split(form, res.x)), "milp", status, _num(getattr(res, "mip_gap", None)),
                   _num(getattr(res, "mip_dual_bound", None)), notes)


def relax_and_fix(prob: Problem, form: Formulation, deadline: float) -> Outcome | None:
    """Solve the LP; fix x at 0 or 1 where the LP is integral; MILP over the rest.

    The MILP is restricted to the streams the LP routes over a fractional x; every
    other stream keeps its LP routes (their capacity reserved). Falls to LP
    rounding + greedy repair if that MILP finds nothing in time.
    """
    lp = milp_arrays(form, relax=True, time_limit=deadline - time.monotonic(), gap=0.0)
    if lp.x is None:
        log.info("LP relaxation not solved in time (%s)", lp.message)
        return None
    bound = float(lp.fun) if lp.status == 0 else None
    xs = lp.x[: form.nx]
    frac = (xs > INTEGRAL_TOL) & (xs < 1 - INTEGRAL_TOL)
    if not frac.any():
        status = "optimal" if lp.status == 0 else "feasible"
        return Outcome(clean(prob, _split(form, lp.x)), "relax-and-fix", status, None if bound is None else 0.0, bound,
                       ["LP relaxation was integral"])
    y_lp = np.where(lp.x[form.nx:form.nx + form.ny] > INTEGRAL_TOL, lp.x[form.nx:form.nx + form.ny], 0.0)
    free = np.unique(prob.p_s[frac[prob.p_x] & (y_lp > INTEGRAL_TOL)])
    note = f"relax-and-fix: {int(frac.sum())} of {form.nx} binaries fractional, {free.size} streams re-solved"
    start = Solution(x=xs > 0.5, y=y_lp, u=lp.x[form.nx + form.ny:form.nx + form.ny + form.ns])
    if free.size == 0:  # the fractional x carry no traffic: dropping them changes nothing
        sol = clean(prob, start)
        return Outcome(sol, "relax-and-fix", "feasible", _rel_gap(objective(prob, sol), bound), bound, [note])
    sol = blocks.resolve(prob, start, free, deadline, fix_one=~frac & (xs >= 0.5), fix_zero=~frac & (xs < 0.5))
    if sol is None:
        log.info("relax-and-fix MILP found nothing in time; rounding the LP")
        return lp_round(prob, form, lp.x, bound, [note])
    return Outcome(sol, "relax-and-fix", "feasible", _rel_gap(objective(prob, sol), bound), bound, [note])


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
    return Outcome(sol, "lp-round", "feasible", _rel_gap(objective(prob, sol), bound), bound, notes)


def large(prob: Problem, start: Solution, deadline: float) -> Outcome:
    """Large fleets: improve the greedy plan block by block until the deadline."""
    block = prob.params.block_streams
    sol, solved = blocks.improve(prob, start, deadline, block)
    sweeps = solved * block / max(prob.n_streams, 1)
    return Outcome(sol, "lns", "feasible", None, None,
                   [f"large fleet: greedy, then {solved} blocks of ~{block} streams re-solved as MILPs "
                    f"({sweeps:.1f} sweeps) within the time limit; no global bound"])


def solve(prob: Problem, form_of, started: float) -> tuple[Outcome, Solution, float]:
    """Run the chain within params.time_limit_s.

    form_of: a callable building the Formulation (only built on paths that
    solve the whole problem). Returns (best outcome, greedy solution, greedy objective).
    """
    limit = prob.params.time_limit_s
    # leave time to turn the solution into a Plan (about 0.1 s per 10,000 streams) within the limit
    deadline = started + limit - min(0.1 * limit, 0.05 + 2e-5 * prob.n_streams)
    g_sol = greedy_solution(prob)
    greedy = Outcome(g_sol, "greedy", "feasible")
    g_obj = objective(prob, g_sol)
    best = None
    try:
        if prob.n_streams > prob.params.large_fleet_streams:
            best = large(prob, g_sol, deadline)
        else:
            form = form_of(prob)
            if form.nx <= prob.params.exact_max_binaries:
                best = exact(prob, form, started + EXACT_SHARE * limit)
            if best is None:
                best = relax_and_fix(prob, form, started + RELAX_SHARE * limit)
            if best is None:  # the LP did not finish: improve greedy block by block with what is left
                best = large(prob, g_sol, deadline)
    except (ValueError, MemoryError) as exc:  # HiGHS refusing an instance must not stop planning
        log.warning("solver failed (%s); using greedy", exc)
        greedy.notes.append(f"solver failed: {exc}")
    if best is None or objective(prob, best.sol) > g_obj * (1 + 1e-9) + 1e-9:
        if best is not None:
            greedy.notes.append(f"the {best.path} plan was worse than greedy's; greedy kept")
            greedy.bound = best.bound
            greedy.gap = _rel_gap(g_obj, best.bound)
        best = greedy
    return best, g_sol, g_obj
