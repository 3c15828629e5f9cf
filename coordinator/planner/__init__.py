"""The placement planner: a pure function from a fleet snapshot to a plan.

No MQTT, no SQL: the coordinator feeds it a Snapshot and publishes what it
returns; ``lepton plan --snapshot FILE`` runs the same function offline.
See docs/planner.md for the formulation and the fallback chain.

    plan(snapshot)      MILP (HiGHS) -> relax-and-fix -> LP rounding + greedy repair,
                        never worse than greedy
    greedy(snapshot)    the greedy baseline alone
    explain(snapshot, stream_id, plan=None)  every candidate device of one stream and why it was (not) used
"""

from __future__ import annotations

import time
from typing import Any

from lepton.coordinator.planner.result import Plan, RouteCost
from lepton.coordinator.snapshot import Snapshot, load_snapshot

__all__ = ["Plan", "RouteCost", "plan", "greedy", "explain"]


def _problem(snapshot):
    from lepton.coordinator.planner.problem import build_problem

    return build_problem(load_snapshot(snapshot))


def _stats(prob, form=None) -> dict[str, int]:
    out = {"devices": len(prob.dev_ids), "streams": prob.n_streams, "candidate_routes": int(prob.p_s.size),
           "binaries": int(prob.x_m.size)}
    if form is not None:
        out.update(variables=form.n_vars, constraints=form.n_rows, nonzeros=int(form.A.nnz))
    return out


def plan(snapshot: Snapshot | dict[str, Any]) -> Plan:
    """Plan placement for a snapshot (a Snapshot, or a dict validated as one).

    Raises ConfigError for an invalid snapshot; never for an infeasible one
    (what cannot be served is reported in ``Plan.unserved``).
    """
    from lepton.coordinator.planner import formulation, solve
    from lepton.coordinator.planner.result import make_plan

    started = time.monotonic()
    prob = _problem(snapshot)
    if prob.n_streams == 0 or prob.p_s.size == 0:
        return _trivial(prob, started)
    built = []

    def form_of(p):
        built.append(formulation.build(p))
        return built[-1]

    best, _, g_obj = solve.solve(prob, form_of, started)
    return make_plan(prob, best.sol, status=best.status, path=best.path, gap=best.gap, bound=best.bound,
                     solve_s=time.monotonic() - started, greedy_obj=g_obj,
                     stats=_stats(prob, built[0] if built else None), notes=best.notes)


def _trivial(prob, started: float) -> Plan:
    """No stream, or no stream with any device able to serve it: all unserved."""
    import numpy as np

    from lepton.coordinator.planner.greedy import Solution
    from lepton.coordinator.planner.result import make_plan

    sol = Solution(x=np.zeros(prob.x_m.size, bool), y=np.zeros(prob.p_s.size), u=np.ones(prob.n_streams))
    status = "empty" if prob.n_streams == 0 else "optimal"
    return make_plan(prob, sol, status=status, path="greedy", gap=0.0 if prob.n_streams else None, bound=None,
                     solve_s=time.monotonic() - started, stats=_stats(prob),
                     notes=[] if prob.n_streams == 0 else ["no device can serve any stream"])


def greedy(snapshot: Snapshot | dict[str, Any]) -> Plan:
    """The greedy plan alone (the baseline every MILP plan is checked against)."""
    from lepton.coordinator.planner.greedy import greedy_solution, objective
    from lepton.coordinator.planner.result import make_plan

    started = time.monotonic()
    prob = _problem(snapshot)
    sol = greedy_solution(prob)
    return make_plan(prob, sol, status="feasible", path="greedy", gap=None, bound=None,
                     solve_s=time.monotonic() - started, greedy_obj=objective(prob, sol), stats=_stats(prob))


def explain(snapshot: Snapshot | dict[str, Any], stream_id: str, result: Plan | None = None) -> dict[str, Any]:
    """Every device that could serve one stream, its latency terms and why it
    was or was not used. ConfigError if the stream is unknown."""
    from lepton.coordinator.planner.why import explain_stream

    snap = load_snapshot(snapshot)
    return explain_stream(snap, stream_id, result if result is not None else plan(snap))
