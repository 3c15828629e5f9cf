"""Solutions, their objective, and the greedy planner (the baseline and last fallback).

Greedy takes streams by decreasing rate and sends each to its cheapest
candidate (latency, plus a load penalty where the model is not yet there)
that still has CPU, memory and link room under the utilisation cap, splitting
a stream over several devices when one cannot take all of it. When the
objective has the queue term (params.queueing), a candidate's cost also
holds what the stream adds to that term at the device's current load, so
greedy chases the same objective as the MILP it is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lepton.coordinator.planner import queueing
from lepton.coordinator.planner.problem import Problem

EPS = 1e-9
SHARE_EPS = 1e-6  # shares below this are solver noise, not routes


@dataclass
class Solution:
    """Values of the decision variables: x per x-pair, y per route pair, u per stream."""

    x: np.ndarray
    y: np.ndarray
    u: np.ndarray


def clean(prob: Problem, sol: Solution) -> Solution:
    """Drop noise shares, renormalise, and hold exactly the models that serve something."""
    y = np.where(sol.y > SHARE_EPS, sol.y, 0.0)
    y = np.clip(y, 0.0, 1.0)
    served = np.bincount(prob.p_s, weights=y, minlength=prob.n_streams)
    over = served > 1.0
    if over.any():
        y = y / np.where(over, served, 1.0)[prob.p_s]
        served = np.minimum(served, 1.0)
    u = np.where(1.0 - served > SHARE_EPS, 1.0 - served, 0.0)
    x = np.bincount(prob.p_x, weights=(y > 0), minlength=prob.x_m.size) > 0
    return Solution(x=x, y=y, u=u)


def device_load(prob: Problem, sol: Solution) -> np.ndarray:
    """CPU utilisation of each device under a solution (fraction of its cores)."""
    n_dev = len(prob.dev_ids)
    busy = np.bincount(prob.p_d, weights=prob.s_rate[prob.p_s] * prob.p_compute * sol.y, minlength=n_dev)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(prob.cpu > 0, busy / (1000.0 * np.where(prob.cpu > 0, prob.cpu, 1)), 0.0)


def objective(prob: Problem, sol: Solution) -> float:
    """Internal objective (rate-weighted latency sum + penalties) of a cleaned solution."""
    total = float(np.dot(prob.weight[prob.p_s] * prob.p_cost, sol.y))
    total += float(np.dot(prob.unserved_cost, sol.u))
    total += prob.load_cost * int(np.count_nonzero(sol.x & ~prob.x_current))
    if prob.params.queueing and prob.n_streams:
        rho = device_load(prob, sol)
        used = np.unique(prob.p_d[sol.y > 0])
        total += float(queueing.lq_pwl(rho[used], prob.params.utilization_cap).sum()) * 1000.0 / prob.mean_rate
    return total


class _Capacity:
    """What is left on each device while greedy assigns shares."""

    def __init__(self, prob: Problem) -> None:
        cap = prob.params.utilization_cap
        self.cpu = 1000.0 * prob.cpu * cap
        self.mem = prob.mem.copy()
        self.up = cap * prob.up
        self.down = cap * prob.down

    def room(self, prob: Problem, p: int, a: float, b: float) -> float:
        """Largest share of pair p's stream that fits on its device and links."""
        s, d = prob.p_s[p], prob.p_d[p]
        share = 1.0
        need = prob.s_rate[s] * prob.p_compute[p]
        if need > 0:
            share = min(share, self.cpu[d] / need)
        o = prob.s_origin[s]
        if d != o:
            for left, use in ((self.up[o], a), (self.down[d], a), (self.up[d], b), (self.down[o], b)):
                if use > 0:
                    share = min(share, left / use)
        return share

    def take(self, prob: Problem, p: int, share: float, a: float, b: float) -> None:
        s, d = prob.p_s[p], prob.p_d[p]
        self.cpu[d] -= share * prob.s_rate[s] * prob.p_compute[p]
        o = prob.s_origin[s]
        if d != o:
            self.up[o] -= share * a
            self.down[d] -= share * a
            self.up[d] -= share * b
            self.down[o] -= share * b


def _queue_cost(prob: Problem, capy: _Capacity, s: int, idx: np.ndarray) -> np.ndarray:
    """Increase of the queue term (internal scale) if all of stream s went to each of pairs idx."""
    d = prob.p_d[idx]
    full = 1000.0 * np.where(prob.cpu[d] > 0, prob.cpu[d], 1.0)
    cap = prob.params.utilization_cap
    rho = (full * cap - capy.cpu[d]) / full
    add = prob.s_rate[s] * prob.p_compute[idx] / full
    grow = queueing.lq_pwl(rho + add, cap) - queueing.lq_pwl(rho, cap)
    return grow * 1000.0 / prob.mean_rate


def greedy_solution(prob: Problem, held: np.ndarray | None = None) -> Solution:
    """Greedy assignment; `held` (bool per x-pair) marks models already placed
    (their memory is reserved and they cost no load): the LP-rounding repair."""
    held = np.zeros(prob.x_m.size, bool) if held is None else held.copy()
    capy = _Capacity(prob)
    np.subtract.at(capy.mem, prob.x_d[held], prob.model_mem[prob.x_m[held]])
    y = np.zeros(prob.p_s.size)
    u = np.ones(prob.n_streams)
    a_all, b_all = prob.input_mbps(), prob.reply_mbps()
    total = prob.p_cost
    for s in np.argsort(-prob.s_rate, kind="stable"):
        lo, hi = prob.s_start[s], prob.s_start[s + 1]
        if lo == hi:
            continue
        idx = np.arange(lo, hi)
        free = held[prob.p_x[idx]] | prob.x_current[prob.p_x[idx]]
        cost = prob.weight[s] * total[idx] + np.where(free, 0.0, prob.load_cost)
        if prob.params.queueing:
            cost = cost + _queue_cost(prob, capy, s, idx)
        remaining = 1.0
        for p in idx[np.argsort(cost, kind="stable")]:
            if remaining <= EPS:
                break
            xi = prob.p_x[p]
            mm = prob.model_mem[prob.x_m[xi]]
            if not held[xi] and capy.mem[prob.p_d[p]] < mm - EPS:
                continue
            share = min(remaining, capy.room(prob, p, a_all[s], b_all[s]))
            if share <= EPS:
                continue
            load = 0.0 if (held[xi] or prob.x_current[xi]) else prob.load_cost
            if prob.weight[s] * total[p] * share + load >= prob.unserved_cost[s] * share:
                continue  # cheaper to leave this share unserved
            if not held[xi]:
                held[xi] = True
                capy.mem[prob.p_d[p]] -= mm
            capy.take(prob, p, share, a_all[s], b_all[s])
            y[p] += share
            remaining -= share
        u[s] = max(remaining, 0.0)
    return clean(prob, Solution(x=held, y=y, u=u))
