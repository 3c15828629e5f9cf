"""Why a stream is served where it is: every device's latency terms and verdict."""

from __future__ import annotations

from typing import Any

import numpy as np

from lepton.coordinator.planner.problem import build_problem, route_terms
from lepton.coordinator.planner.result import Plan
from lepton.coordinator.snapshot import Snapshot
from lepton.errors import ConfigError

SHOW = 20  # devices listed besides those that serve the stream


def explain_stream(snap: Snapshot, stream_id: str, result: Plan, show: int = SHOW) -> dict[str, Any]:
    """Candidates of one stream sorted by static latency, with a reason each.

    Returns {"stream", "origin", "model", "rate_hz", "slo_ms", "routes",
    "unserved", "devices": [{device, transfer_ms, propagation_ms, compute_ms,
    static_ms, share, verdict}], "more": how many devices were not listed}.
    """
    spec = next((s for s in snap.streams if s.id == stream_id), None)
    if spec is None:
        raise ConfigError(f"--explain: no stream {stream_id!r} in the snapshot")
    out: dict[str, Any] = {
        "stream": spec.id, "origin": spec.origin, "model": spec.model, "rate_hz": spec.rate_hz,
        "slo_ms": spec.slo_ms, "routes": [r.__dict__ for r in result.routes.get(stream_id, [])],
        "unserved": result.unserved.get(stream_id, 0.0), "devices": [], "more": 0,
    }
    prob = build_problem(snap)
    if stream_id not in prob.stream_ids:
        out["note"] = f"origin {spec.origin!r} is offline: the stream is not planned"
        return out
    s = prob.stream_ids.index(stream_id)
    n_dev = len(prob.dev_ids)
    d = np.arange(n_dev)
    with np.errstate(invalid="ignore"):
        transfer, prop, comp = route_terms(prob, np.full(n_dev, s), d)
    static = transfer + prop + comp
    cand = set(prob.p_d[prob.s_start[s]:prob.s_start[s + 1]].tolist())
    shares = {r.device: r.share for r in result.routes.get(stream_id, [])}
    order = np.argsort(np.where(np.isnan(static), np.inf, static), kind="stable")
    rows = []
    for i in order:
        dev = prob.dev_ids[i]
        if len(rows) >= show and dev not in shares:
            continue
        rows.append({
            "device": dev, "transfer_ms": _f(transfer[i]), "propagation_ms": _f(prop[i]),
            "compute_ms": _f(comp[i]), "static_ms": _f(static[i]), "share": shares.get(dev, 0.0),
            "verdict": _verdict(prob, spec, s, i, static[i], cand, shares.get(dev, 0.0)) or
                       _not_chosen(prob, result, spec, s, i, static, shares),
        })
    out["devices"] = rows
    out["more"] = n_dev - len(rows)
    return out


def _f(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _verdict(prob, spec, s: int, d: int, static: float, cand: set, share: float) -> str:
    m = prob.s_model[s]
    if share > 0:
        return f"serves {share:.0%}"
    if not prob.online[d]:
        return "offline"
    if prob.cpu[d] <= 0:
        return "no usable CPU"
    if not np.isfinite(prob.compute[m, d]):
        return f"no compute time for {spec.model} here (model cannot run)"
    if prob.model_mem[m] > prob.mem[d]:
        return f"{spec.model} needs {prob.model_mem[m]:g} MB, device has {prob.mem[d]:g} MB"
    if not np.isfinite(static):
        return "no link for offloading"
    if spec.slo_ms is not None and static > spec.slo_ms:
        return f"static latency {static:.1f} ms exceeds the SLO {spec.slo_ms:g} ms"
    if d not in cand:
        return f"not among the {prob.params.candidates_k} lowest-latency devices"
    return ""


def _not_chosen(prob, result: Plan, spec, s: int, d: int, static: np.ndarray, shares: dict) -> str:
    """Why a candidate that could serve the stream does not: the load its model would need against what it
    would save, or how full the plan leaves it."""
    dev = prob.dev_ids[d]
    index = {name: i for i, name in enumerate(prob.dev_ids)}
    part = sum(share for other, share in shares.items() if other in index)
    # The mean latency of the part served: a stream partly unserved is not faster for the share left out.
    served = sum(share * static[index[other]] for other, share in shares.items() if other in index) / part \
        if part > 0 else 0.0
    saving = served - static[d] if part > 0 else 0.0
    weighted = float(prob.weight[s]) * saving
    used = max((r.utilization for rs in result.routes.values() for r in rs if r.device == dev), default=0.0)
    cap = prob.params.utilization_cap
    needs_load = (prob.s_model[s], d) not in prob.current and spec.model not in result.placement.get(dev, [])
    unserved = result.unserved.get(spec.id, 0.0)
    full = f"full: the plan uses {used:.0%} of its CPU (cap {cap:.0%})" if used >= cap - 0.01 else ""
    if unserved > 1e-4:  # what keeps this device from the share left out
        left_out = unserved * float(prob.unserved_cost[s])  # what leaving it out costs the plan
        if needs_load and prob.load_cost > 0 and \
                left_out <= prob.load_cost + unserved * float(prob.weight[s]) * static[d]:
            return (f"{spec.model} is not loaded here: a load costs {prob.load_cost:g} ms in the plan, more than "
                    f"leaving {unserved:.0%} of the stream unserved ({left_out:.1f} ms)")
        if full:
            return f"{full}; the stream is {unserved:.0%} unserved"
        held = sum(float(prob.model_mem[prob.model_names.index(name)])
                   for name in result.placement.get(dev, []) if name in prob.model_names)
        if spec.model not in result.placement.get(dev, []) and held + float(prob.model_mem[prob.s_model[s]]) > prob.mem[d]:
            return (f"no memory left for {spec.model} ({held:g} of {prob.mem[d]:g} MB held by the plan's models); "
                    f"the stream is {unserved:.0%} unserved")
        if dev != spec.origin:
            return (f"the stream is {unserved:.0%} unserved, yet this device takes none of it ({used:.0%} of its CPU "
                    f"used): the links between it and {spec.origin} have no room left, or the {result.path} path "
                    f"left it out")
        return (f"the stream is {unserved:.0%} unserved, yet its origin takes no more of it ({used:.0%} of its CPU "
                f"used): the {result.path} path left it out")
    if needs_load and prob.load_cost > 0 and saving > 0 and weighted <= prob.load_cost:
        return (f"{spec.model} is not loaded here: a load costs {prob.load_cost:g} ms in the plan, more than the "
                f"{weighted:.1f} ms it would save ({saving:.1f} ms faster x rate weight {prob.weight[s]:.2f})")
    held_on = [prob.dev_ids[o] for s_, o in sorted(prob.routed) if s_ == s]
    hold = prob.params.route_hold
    if held_on and dev not in held_on and saving > 0 and (1 + hold) * static[d] >= served:
        return (f"{saving:.1f} ms faster than where the stream is served, within the {hold:.0%} a stream must gain "
                f"to move (params.route_hold) from the routes in force ({', '.join(held_on)})")
    if full:
        return full
    return f"candidate, not used: others are cheaper for the fleet as a whole ({used:.0%} of its CPU used)"
