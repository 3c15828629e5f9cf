"""Planner benchmark: synthetic fleets of 100, 1000 and 10,000 devices (20 models,
one stream per device), planned by the MILP chain and by greedy in the same run.

    python benchmarks/planner.py [--sizes 100,1000,10000] [--seed 1] [--queueing both|off|on]
                                 [--time-limit 100=5,1000=5,10000=30] [--lp-bound] [--json]

Per fleet it prints the model size (variables, constraints, binaries of the
full MILP over the pruned candidates), the solver path, wall-clock time of
plan() (snapshot validation excluded, candidate choice and greedy included),
the objective (rate-weighted mean latency + penalties, ms), the gap to the LP
bound where the path has one, and the ratio against greedy measured in the
same run: objective gain, and mean latency including M/D/1 queueing.
With --lp-bound, plans that have no bound (the large-fleet path) are
measured against the LP relaxation of the full pruned MILP, solved without a
time limit (minutes at 10,000 devices).

Targets: 1000 x 20 within 1% of optimal in <= 1 s; 10,000 devices in <= 30 s;
>= 10% better than greedy on average.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from lepton.coordinator.planner import formulation, greedy, plan
from lepton.coordinator.planner.problem import build_problem
from lepton.coordinator.planner.synthetic import random_fleet
from lepton.coordinator.snapshot import load_snapshot

DEFAULT_LIMITS = {100: 5.0, 1000: 5.0, 10000: 30.0}


def lp_bound(form) -> float | None:
    """Optimal value of the LP relaxation (internal scale), no time limit."""
    from lepton.coordinator.planner.solve import milp_arrays

    res = milp_arrays(form, relax=True, time_limit=1e6, gap=0.0)
    return float(res.fun) if res.status == 0 else None


def measure(n: int, seed: int, queueing: bool, limit: float, want_bound: bool = False) -> dict:
    """Plan one fleet both ways; return the figures of one table row."""
    snap = load_snapshot(random_fleet(n, n_models=20, seed=seed, queueing=queueing, time_limit_s=limit))
    prob = build_problem(snap)
    form = formulation.build(prob)  # size of the full MILP, for the table only
    t0 = time.monotonic()
    base = greedy(snap)
    greedy_s = time.monotonic() - t0
    t0 = time.monotonic()
    best = plan(snap)
    plan_s = time.monotonic() - t0
    gap, bound_s = best.gap, None
    if gap is None and want_bound:
        t0 = time.monotonic()
        bound = lp_bound(form)
        bound_s = time.monotonic() - t0
        gap = None if bound is None else max(0.0, (best.objective - bound / prob.n_streams) / best.objective)
    gain = (base.objective - best.objective) / base.objective if base.objective else 0.0
    lat_gain = (base.mean_latency_ms - best.mean_latency_ms) / base.mean_latency_ms if base.mean_latency_ms else 0.0
    return {
        "devices": n, "queueing": queueing, "streams": prob.n_streams, "routes": int(prob.p_s.size),
        "variables": form.n_vars, "constraints": form.n_rows, "binaries": form.nx, "path": best.path,
        "status": best.status, "plan_s": plan_s, "greedy_s": greedy_s, "time_limit_s": limit,
        "objective": best.objective, "greedy_objective": base.objective, "gain_vs_greedy": gain,
        "gap": gap, "bound_s": bound_s, "mean_latency_ms": best.mean_latency_ms, "greedy_latency_ms": base.mean_latency_ms,
        "latency_gain": lat_gain, "unserved": len(best.unserved), "greedy_unserved": len(base.unserved),
        "loads": len(best.loads), "greedy_loads": len(base.loads),
    }


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="planner benchmark (objective and latency in ms; gain = (greedy - plan) / greedy)")
    cols = ["devices", "queue", "vars", "rows", "bins", "path", "plan s", "greedy s", "objective", "greedy obj",
            "gain", "gap", "lat+q", "greedy lat+q", "lat gain", "unserved", "loads (greedy)"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            str(r["devices"]), "on" if r["queueing"] else "off", str(r["variables"]), str(r["constraints"]),
            str(r["binaries"]), r["path"], f"{r['plan_s']:.2f}", f"{r['greedy_s']:.2f}", f"{r['objective']:.3f}",
            f"{r['greedy_objective']:.3f}", f"{r['gain_vs_greedy']:+.1%}",
            "n/a" if r["gap"] is None else f"{r['gap']:.2%}" + ("*" if r.get("bound_s") else ""), f"{r['mean_latency_ms']:.2f}",
            f"{r['greedy_latency_ms']:.2f}", f"{r['latency_gain']:+.1%}", f"{r['unserved']} ({r['greedy_unserved']})",
            f"{r['loads']} ({r['greedy_loads']})",
        )
    Console(width=200).print(t)
    if any(r.get("bound_s") for r in rows):
        print("* gap against the full LP relaxation solved after the run: "
              + ", ".join(f"{r['devices']} devices {r['bound_s']:.0f} s" for r in rows if r.get("bound_s")))
    for q in sorted({r["queueing"] for r in rows}):
        sel = [r for r in rows if r["queueing"] == q]
        print(f"queue term {'on' if q else 'off'}: mean objective gain vs greedy "
              f"{sum(r['gain_vs_greedy'] for r in sel) / len(sel):+.1%}, mean latency (with queueing) gain "
              f"{sum(r['latency_gain'] for r in sel) / len(sel):+.1%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000", help="fleet sizes, comma-separated")
    ap.add_argument("--seed", type=int, default=1, help="fleet generator seed")
    ap.add_argument("--queueing", choices=("both", "off", "on"), default="both", help="objective with the queue term")
    ap.add_argument("--time-limit", default="", help="per size, e.g. 1000=5,10000=30 (defaults: 5 s, 30 s at 10k)")
    ap.add_argument("--lp-bound", action="store_true", help="solve the full LP (slow) for paths without a bound")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    limits = dict(DEFAULT_LIMITS)
    for item in filter(None, args.time_limit.split(",")):
        size, secs = item.split("=")
        limits[int(size)] = float(secs)
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.queueing]
    plan(random_fleet(20, n_models=3, seed=0))  # imports (scipy, HiGHS) out of the timings
    rows = []
    for q in modes:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(measure(n, args.seed, q, limits.get(n, 5.0 if n < 5000 else 30.0), args.lp_bound))
            print(f"  {n} devices, queue term {'on' if q else 'off'}: {rows[-1]['plan_s']:.2f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
