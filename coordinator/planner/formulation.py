"""The MILP as sparse arrays for scipy.optimize.milp (HiGHS).

Columns: x[m,d] (binary, model m held on d), y[s,d] (share of stream s on d),
u[s] (unserved share), and with the queue term q[d] (mean number waiting).
Rows, in order: assignment (sum_d y + u = 1), linking (one y[s,d] <= x[m,d]
row per pair: disaggregated, so the LP relaxation is nearly tight), memory,
CPU, uplink, downlink per device (rows that cannot bind are left out), and
the queue tangents. Units are ms and Mbit/s so coefficients stay near 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lepton.coordinator.planner import queueing
from lepton.coordinator.planner.problem import Problem


@dataclass
class Formulation:
    """c @ v subject to lb <= A v <= ub, var_lb <= v <= var_ub, v[:nx] integral."""

    c: np.ndarray
    A: object  # scipy.sparse.csr_array
    lb: np.ndarray
    ub: np.ndarray
    var_lb: np.ndarray
    var_ub: np.ndarray
    nx: int
    ny: int
    ns: int
    nq: int
    q_dev: np.ndarray  # device of each q column

    @property
    def n_vars(self) -> int:
        return self.c.size

    @property
    def n_rows(self) -> int:
        return self.lb.size

    def integrality(self, relax: bool = False) -> np.ndarray:
        out = np.zeros(self.n_vars, dtype=np.uint8)
        if not relax:
            out[: self.nx] = 1
        return out


@dataclass
class Reserved:
    """Capacity per device already taken by streams outside a sub-problem."""

    cpu_ms: np.ndarray  # ms of inference per second
    mem: np.ndarray  # MB held by models those streams use
    up: np.ndarray  # Mbit/s
    down: np.ndarray

    @classmethod
    def none(cls, n_dev: int) -> "Reserved":
        z = np.zeros(n_dev)
        return cls(z, z, z, z)


class _Rows:
    """Accumulates COO triplets row block by row block."""

    def __init__(self) -> None:
        self.r, self.c, self.v, self.lb, self.ub = [], [], [], [], []
        self.n = 0

    def block(self, rows, cols, vals, lb, ub) -> None:
        self.r.append(np.asarray(rows, dtype=np.int64) + self.n)
        self.c.append(np.asarray(cols, dtype=np.int64))
        self.v.append(np.asarray(vals, dtype=float))
        self.lb.append(np.asarray(lb, dtype=float))
        self.ub.append(np.asarray(ub, dtype=float))
        self.n += len(lb)

    def matrix(self, n_vars: int):
        from scipy.sparse import coo_array

        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
        A = coo_array((cat(self.v, float), (cat(self.r, np.int64), cat(self.c, np.int64))), shape=(self.n, n_vars))
        return A.tocsr(), cat(self.lb, float), cat(self.ub, float)


def _per_device(rows: _Rows, dev: np.ndarray, cols: np.ndarray, vals: np.ndarray, rhs: np.ndarray) -> None:
    """Add sum(vals[dev == d] * v[cols]) <= rhs[d] for each device d that can bind.

    A row is kept only if its largest possible left side (all positive
    coefficients at 1) exceeds its right side.
    """
    n_dev = rhs.size
    worst = np.bincount(dev, weights=np.maximum(vals, 0), minlength=n_dev)
    binding = np.flatnonzero(worst > rhs + 1e-9)
    if binding.size == 0:
        return
    row_of = np.full(n_dev, -1)
    row_of[binding] = np.arange(binding.size)
    keep = row_of[dev] >= 0
    rows.block(row_of[dev[keep]], cols[keep], vals[keep], np.full(binding.size, -np.inf), rhs[binding])


def build(prob: Problem, reserved: Reserved | None = None) -> Formulation:
    """Build the MILP of a Problem; `reserved` capacity is taken off every device first."""
    nx, ny, ns = prob.x_m.size, prob.p_s.size, prob.n_streams
    x0, y0, u0 = 0, nx, nx + ny
    res = reserved or Reserved.none(len(prob.dev_ids))
    cap = prob.params.utilization_cap
    rows = _Rows()
    pairs = np.arange(ny)
    # assignment: sum_d y[s,d] + u[s] = 1
    rows.block(np.concatenate([prob.p_s, np.arange(ns)]), np.concatenate([y0 + pairs, u0 + np.arange(ns)]),
               np.ones(ny + ns), np.ones(ns), np.ones(ns))
    # linking, disaggregated: y[s,d] - x[m,d] <= 0
    rows.block(np.concatenate([pairs, pairs]), np.concatenate([y0 + pairs, x0 + prob.p_x]),
               np.concatenate([np.ones(ny), -np.ones(ny)]), np.full(ny, -np.inf), np.zeros(ny))
    _per_device(rows, prob.x_d, x0 + np.arange(nx), prob.model_mem[prob.x_m], prob.mem - res.mem)
    cpu_ms = prob.s_rate[prob.p_s] * prob.p_compute
    _per_device(rows, prob.p_d, y0 + pairs, cpu_ms, 1000.0 * prob.cpu * cap - res.cpu_ms)
    _link_rows(prob, rows, y0, u0, cap * prob.up - res.up, cap * prob.down - res.down)
    c = np.concatenate([
        np.where(prob.x_current, 0.0, prob.load_cost),
        prob.weight[prob.p_s] * prob.p_cost,
        prob.unserved_cost,
    ])
    var_ub = np.ones(nx + ny + ns)
    q_dev = np.zeros(0, int)
    if prob.params.queueing:
        c, var_ub, q_dev = _queue_rows(prob, rows, c, var_ub, y0, cpu_ms, res.cpu_ms)
    A, lb, ub = rows.matrix(c.size)
    return Formulation(c=c, A=A, lb=lb, ub=ub, var_lb=np.zeros(c.size), var_ub=var_ub,
                       nx=nx, ny=ny, ns=ns, nq=q_dev.size, q_dev=q_dev)


def _link_rows(prob: Problem, rows: _Rows, y0: int, u0: int, room_up: np.ndarray, room_down: np.ndarray) -> None:
    """Uplink and downlink per device, in Mbit/s.

    What origin o sends for stream s is a_s * (share served elsewhere)
    = a_s * (1 - u_s - y[s,o]); writing it so keeps each row as sparse as the
    pairs of its own device instead of touching every remote pair.
    """
    a, b = prob.input_mbps(), prob.reply_mbps()
    ns, n_dev = prob.n_streams, len(prob.dev_ids)
    local = prob.p_local
    remote = np.flatnonzero(~local)
    loc = np.flatnonzero(local)
    s_all = np.arange(ns)
    for own, served, room in ((a, b, room_up), (b, a, room_down)):
        # own: what the origin sends (up) / receives (down); served: the same at the serving device
        const = np.bincount(prob.s_origin, weights=own, minlength=n_dev)
        dev = np.concatenate([prob.s_origin, prob.p_d[loc], prob.p_d[remote]])
        cols = np.concatenate([u0 + s_all, y0 + loc, y0 + remote])
        vals = np.concatenate([-own, -own[prob.p_s[loc]], served[prob.p_s[remote]]])
        rhs = room - const
        # the worst case of a row is const + sum of remote terms: compare against the room
        worst = np.bincount(prob.p_d[remote], weights=served[prob.p_s[remote]], minlength=n_dev) + const
        binding = worst > room + 1e-9
        keep = binding[dev] & (vals != 0)
        _binding_rows(rows, dev[keep], cols[keep], vals[keep], rhs, binding)


def _binding_rows(rows: _Rows, dev, cols, vals, rhs, binding) -> None:
    idx = np.flatnonzero(binding)
    if idx.size == 0:
        return
    row_of = np.full(rhs.size, -1)
    row_of[idx] = np.arange(idx.size)
    rows.block(row_of[dev], cols, vals, np.full(idx.size, -np.inf), rhs[idx])


def _queue_rows(prob: Problem, rows: _Rows, c, var_ub, y0: int, cpu_ms: np.ndarray, res_cpu_ms: np.ndarray):
    """q[d] >= slope_k * rho_d + icpt_k, rho_d = (reserved + sum cpu_ms * y) / (1000 cpu_d).

    The objective weight turns sum_d Lq_d into the rate-weighted mean wait
    (Little's law), scaled like the rest of the internal objective.
    """
    dev = np.unique(prob.p_d)
    q_col0 = c.size
    slope, icpt = queueing.tangents(prob.params.utilization_cap)
    q_of = np.full(len(prob.dev_ids), -1)
    q_of[dev] = q_col0 + np.arange(dev.size)
    rho_coef = cpu_ms / (1000.0 * prob.cpu[prob.p_d])
    rho_res = res_cpu_ms[dev] / (1000.0 * prob.cpu[dev])
    ny = prob.p_s.size
    pos = np.searchsorted(dev, prob.p_d)  # q index of each pair's device
    # highest utilisation each device can reach: tangents touching above it never bind
    rho_top = np.minimum(rho_res + np.bincount(pos, weights=rho_coef, minlength=dev.size),
                         prob.params.utilization_cap)
    keep = queueing.needed(prob.params.utilization_cap, rho_top)
    for k in range(slope.size):
        on = keep[k]
        row_of = np.full(dev.size, -1)
        row_of[on] = np.arange(int(on.sum()))
        pk = on[pos]
        r = np.concatenate([row_of[pos[pk]], row_of[on]])
        cols = np.concatenate([y0 + np.flatnonzero(pk), q_of[dev[on]]])
        vals = np.concatenate([slope[k] * rho_coef[pk], -np.ones(int(on.sum()))])
        rows.block(r, cols, vals, np.full(int(on.sum()), -np.inf), -icpt[k] - slope[k] * rho_res[on])
    c = np.concatenate([c, np.full(dev.size, 1000.0 / prob.mean_rate)])
    var_ub = np.concatenate([var_ub, np.full(dev.size, np.inf)])
    return c, var_ub, dev
