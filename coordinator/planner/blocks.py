"""Re-solving a block of streams with every other stream held where it is.

Two users: relax-and-fix (the block is the streams that touch a fractional
x of the LP, everything else keeps its LP routes) and the large-fleet path
(large-neighbourhood search: from the greedy plan, blocks of streams are
re-solved as small MILPs one after another until the time limit). A block's
MILP sees the capacity the other streams use as reserved, keeps the models
those streams need, and may only improve: the routes it starts from are a
feasible solution of it.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from lepton.coordinator.planner import formulation
from lepton.coordinator.planner.greedy import Solution, clean, objective
from lepton.coordinator.planner.problem import Problem

log = logging.getLogger(__name__)


def usage(prob: Problem, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cpu ms/s, uplink Mbit/s, downlink Mbit/s) per device of the shares y."""
    n_dev = len(prob.dev_ids)
    cpu = np.bincount(prob.p_d, weights=prob.s_rate[prob.p_s] * prob.p_compute * y, minlength=n_dev)
    ys = np.where(prob.p_local, 0.0, y)
    a = prob.input_mbps()[prob.p_s] * ys
    b = prob.reply_mbps()[prob.p_s] * ys
    origin = prob.s_origin[prob.p_s]
    up = np.bincount(origin, weights=a, minlength=n_dev) + np.bincount(prob.p_d, weights=b, minlength=n_dev)
    down = np.bincount(prob.p_d, weights=a, minlength=n_dev) + np.bincount(origin, weights=b, minlength=n_dev)
    return cpu, up, down


def _block(prob: Problem, sol: Solution, streams: np.ndarray):
    """The MILP of a block: (in_block mask, sub-problem, its pairs in prob, its x-pairs in prob,
    formulation, x-pairs other streams use)."""
    n_dev = len(prob.dev_ids)
    in_block = np.zeros(prob.n_streams, bool)
    in_block[streams] = True
    others = np.where(in_block[prob.p_s], 0.0, sol.y)
    cpu, up, down = usage(prob, others)
    used_x = np.zeros(prob.x_m.size, bool)
    used_x[prob.p_x[others > 0]] = True
    sub, pair_idx, x_idx = prob.subset(np.flatnonzero(in_block))
    outside = used_x.copy()
    outside[x_idx] = False
    mem = np.bincount(prob.x_d[outside], weights=prob.model_mem[prob.x_m[outside]], minlength=n_dev)
    form = formulation.build(sub, formulation.Reserved(cpu, mem, up, down))
    return in_block, pair_idx, x_idx, form, used_x


def _merge(sol: Solution, in_block, pair_idx, form, v: np.ndarray) -> Solution:
    y, u = sol.y.copy(), sol.u.copy()
    block_y = v[form.nx:form.nx + form.ny]
    y[pair_idx] = np.where(block_y > 1e-9, block_y, 0.0)  # solver noise would pin models in later blocks
    u[in_block] = v[form.nx + form.ny:form.nx + form.ny + form.ns]
    return Solution(x=sol.x, y=y, u=u)


def resolve(prob: Problem, sol: Solution, streams: np.ndarray, deadline: float, *,
            fix_one: np.ndarray | None = None, fix_zero: np.ndarray | None = None) -> Solution | None:
    """Best routes for `streams` given everyone else's in `sol` (exact MILP);
    None if the MILP found nothing in time.

    fix_one / fix_zero: bool per x-pair of prob, bounds for the block's binaries.
    """
    from lepton.coordinator.planner.solve import milp_arrays

    in_block, pair_idx, x_idx, form, used_x = _block(prob, sol, streams)
    var_lb, var_ub = form.var_lb.copy(), form.var_ub.copy()
    keep = used_x[x_idx] if fix_one is None else used_x[x_idx] | fix_one[x_idx]
    var_lb[: form.nx][keep] = 1.0
    if fix_zero is not None:
        var_ub[: form.nx][fix_zero[x_idx] & ~keep] = 0.0
    res = milp_arrays(form, relax=False, time_limit=deadline - time.monotonic(), gap=prob.params.mip_gap,
                      var_lb=var_lb, var_ub=var_ub)
    if res.x is None:
        return None
    return clean(prob, _merge(sol, in_block, pair_idx, form, res.x))


def relax_and_fix_block(prob: Problem, sol: Solution, streams: np.ndarray, deadline: float) -> Solution | None:
    """A block by relax-and-fix: its LP, then an exact MILP over the streams
    the LP routes over a fractional x (HiGHS spends seconds on cuts and
    heuristics at the root of a whole block; the LP and the small rest are fast)."""
    from lepton.coordinator.planner.solve import INTEGRAL_TOL, milp_arrays

    in_block, pair_idx, x_idx, form, used_x = _block(prob, sol, streams)
    var_lb = form.var_lb.copy()
    var_lb[: form.nx][used_x[x_idx]] = 1.0
    lp = milp_arrays(form, relax=True, time_limit=deadline - time.monotonic(), gap=0.0, var_lb=var_lb)
    if lp.x is None:
        return None
    merged = _merge(sol, in_block, pair_idx, form, lp.x)
    xs = np.zeros(prob.x_m.size)
    xs[x_idx] = lp.x[: form.nx]
    frac = (xs > INTEGRAL_TOL) & (xs < 1 - INTEGRAL_TOL)
    if not frac.any():
        return clean(prob, merged)
    free = np.unique(prob.p_s[frac[prob.p_x] & (merged.y > INTEGRAL_TOL)])
    if free.size == 0:
        return clean(prob, merged)
    return resolve(prob, merged, free, deadline, fix_one=~frac & (xs >= 0.5), fix_zero=~frac & (xs < 0.5))


def improve(prob: Problem, sol: Solution, deadline: float, block: int, seed: int = 0) -> tuple[Solution, int]:
    """Large-neighbourhood search: re-solve random blocks of `block` streams
    until the deadline; keeps a block's result only if the whole plan improves.
    Returns (best solution, blocks solved)."""
    rng = np.random.default_rng(seed)
    best, best_obj = sol, objective(prob, sol)
    solved = 0
    per_block = None
    while True:
        for blk in np.array_split(rng.permutation(prob.n_streams), max(1, round(prob.n_streams / block))):
            left = deadline - time.monotonic()
            if left <= 0.05 or (per_block is not None and left < per_block):
                return best, solved
            t0 = time.monotonic()
            new = relax_and_fix_block(prob, best, blk, deadline)
            took = time.monotonic() - t0
            per_block = took if per_block is None else 0.7 * per_block + 0.3 * took
            solved += 1
            if new is not None:
                new_obj = objective(prob, new)
                if new_obj < best_obj - 1e-9 * abs(best_obj):
                    best, best_obj = new, new_obj
            log.debug("block %d (%.2f s): objective %.4f", solved, took, best_obj / max(prob.n_streams, 1))
        if prob.n_streams <= block:
            return best, solved
