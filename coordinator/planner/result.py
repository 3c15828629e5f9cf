"""The plan a planner run returns: placement, routes with their latency, changes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from lepton.coordinator.planner import queueing
from lepton.coordinator.planner.greedy import Solution, device_load, objective
from lepton.coordinator.planner.problem import Problem


@dataclass(frozen=True)
class RouteCost:
    """One device serving a share of a stream, and what its latency is made of (ms)."""

    device: str
    share: float
    transfer_ms: float
    propagation_ms: float
    compute_ms: float
    queueing_ms: float
    total_ms: float
    utilization: float  # CPU utilisation of the serving device under the plan


@dataclass
class Plan:
    """A placement and how it was found.

    status: "optimal" (proved within params.mip_gap), "feasible" (a valid plan,
    optimality not proved) or "empty" (nothing to plan). path: "milp",
    "relax-and-fix", "lns" (large fleets: greedy improved block by block),
    "lp-round" or "greedy". objective: rate-weighted mean
    latency plus penalties, ms. gap: relative gap to the best lower bound
    known (None when none is). unserved: stream -> share left unserved (only
    streams with a share > 0). inactive: streams whose origin is offline.
    """

    status: str
    path: str
    objective: float
    gap: float | None
    solve_s: float
    placement: dict[str, list[str]]
    routes: dict[str, list[RouteCost]]
    unserved: dict[str, float]
    loads: list[tuple[str, str]]
    unloads: list[tuple[str, str]]
    mean_latency_ms: float = 0.0
    bound: float | None = None
    greedy_objective: float | None = None
    inactive: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """JSON-serialisable dict (finite floats or null)."""
        out = asdict(self)
        out["loads"] = [{"model": m, "device": d} for m, d in self.loads]
        out["unloads"] = [{"model": m, "device": d} for m, d in self.unloads]
        return _finite(out)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def make_plan(prob: Problem, sol: Solution, *, status: str, path: str, gap, bound, solve_s: float,
              greedy_obj: float | None = None, stats: dict | None = None, notes: list[str] | None = None) -> Plan:
    """Turn a cleaned solution into a Plan (objectives reported per stream: ms)."""
    n = max(prob.n_streams, 1)
    placement: dict[str, list[str]] = {}
    for xi in np.flatnonzero(sol.x):
        placement.setdefault(prob.dev_ids[prob.x_d[xi]], []).append(prob.model_names[prob.x_m[xi]])
    placement = {d: sorted(ms) for d, ms in sorted(placement.items())}
    held = {(prob.x_m[xi], prob.x_d[xi]) for xi in np.flatnonzero(sol.x)}
    loads = sorted((prob.model_names[m], prob.dev_ids[d]) for m, d in held - prob.current)
    unloads = sorted((prob.model_names[m], prob.dev_ids[d]) for m, d in prob.current - held)
    routes = _routes(prob, sol)
    served_w = float(np.dot(prob.weight[prob.p_s], sol.y))
    latency = sum(r.total_ms * r.share * prob.weight[i] for i, rs in enumerate(routes.values()) for r in rs)
    unserved = {prob.stream_ids[s]: float(sol.u[s]) for s in np.flatnonzero(sol.u > 0)}
    return Plan(
        status=status, path=path, objective=objective(prob, sol) / n, gap=gap,
        bound=None if bound is None else bound / n, solve_s=solve_s,
        placement=placement, routes=routes, unserved=unserved, loads=loads, unloads=unloads,
        mean_latency_ms=latency / served_w if served_w > 0 else 0.0,
        greedy_objective=None if greedy_obj is None else greedy_obj / n,
        inactive=list(prob.inactive), stats=dict(stats or {}), notes=list(notes or []),
    )


def _routes(prob: Problem, sol: Solution) -> dict[str, list[RouteCost]]:
    """Routes per active stream (every active stream has an entry, maybe empty)."""
    used = np.flatnonzero(sol.y > 0)
    rho = device_load(prob, sol)
    lam = prob.s_rate[prob.p_s[used]] * sol.y[used] / 1000.0
    _, wait = queueing.device_waits(len(prob.dev_ids), prob.p_d[used], lam, prob.p_compute[used], prob.cpu)
    routes: dict[str, list[RouteCost]] = {sid: [] for sid in prob.stream_ids}
    for p in used:
        d = prob.p_d[p]
        t, pr, c, q = float(prob.p_transfer[p]), float(prob.p_prop[p]), float(prob.p_compute[p]), float(wait[d])
        routes[prob.stream_ids[prob.p_s[p]]].append(RouteCost(
            device=prob.dev_ids[d], share=float(sol.y[p]), transfer_ms=t, propagation_ms=pr, compute_ms=c,
            queueing_ms=q, total_ms=t + pr + c + q, utilization=float(rho[d]),
        ))
    for rs in routes.values():
        rs.sort(key=lambda r: -r.share)
    return routes
