"""Human output of ``lepton plan``: rich tables."""

from __future__ import annotations

from typing import Any

from lepton.coordinator.planner.result import Plan

MAX_ROWS = 200  # longer tables are cut, with a line saying how many rows were left out


def _console():
    import sys

    from rich.console import Console

    # piped output (docs, logs) gets room for the route table instead of rich's 80 columns
    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _summary(p: Plan) -> str:
    gap = "unknown" if p.gap is None else f"{p.gap:.2%}"
    lines = [
        f"status {p.status}, path {p.path}, objective {p.objective:.3f} ms, gap {gap}, solved in {p.solve_s:.2f} s",
        f"mean latency {p.mean_latency_ms:.2f} ms (with queueing); {len(p.loads)} load(s), {len(p.unloads)} unload(s)",
    ]
    if p.greedy_objective is not None:
        better = (p.greedy_objective - p.objective) / p.greedy_objective if p.greedy_objective else 0.0
        lines.append(f"greedy objective {p.greedy_objective:.3f} ms ({better:+.1%} by this plan)")
    if p.stats:
        lines.append(", ".join(f"{k} {v}" for k, v in p.stats.items()))
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def print_plan(p: Plan) -> None:
    """Status, placement per device, routes per stream, unserved, loads/unloads."""
    from rich.table import Table

    con = _console()
    con.print(_summary(p), highlight=False)
    place = Table(title="placement", title_justify="left")
    place.add_column("device")
    place.add_column("models")
    for dev, models in list(p.placement.items())[:MAX_ROWS]:
        place.add_row(dev, ", ".join(models))
    con.print(place)
    _cut(con, len(p.placement))
    routes = Table(title="routes (ms)", title_justify="left")
    for col in ("stream", "device", "share", "transfer", "propagation", "compute", "queueing", "total", "util"):
        routes.add_column(col, justify="left" if col in ("stream", "device") else "right")
    n = 0
    for sid, rs in p.routes.items():
        for r in rs:
            n += 1
            if n <= MAX_ROWS:
                routes.add_row(sid, r.device, f"{r.share:.0%}", _ms(r.transfer_ms), _ms(r.propagation_ms),
                               _ms(r.compute_ms), _ms(r.queueing_ms), _ms(r.total_ms), f"{r.utilization:.0%}")
    con.print(routes)
    _cut(con, n)
    if p.unserved:
        con.print("unserved: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(p.unserved.items())), highlight=False)
    if p.inactive:
        con.print("not planned (origin offline): " + ", ".join(p.inactive), highlight=False)
    if p.loads:
        con.print("load: " + ", ".join(f"{m} on {d}" for m, d in p.loads[:MAX_ROWS]), highlight=False)
    if p.unloads:
        con.print("unload: " + ", ".join(f"{m} from {d}" for m, d in p.unloads[:MAX_ROWS]), highlight=False)


def _cut(con, n: int) -> None:
    if n > MAX_ROWS:
        con.print(f"... {n - MAX_ROWS} more rows (use --json for all)", highlight=False)


def print_explain(info: dict[str, Any]) -> None:
    """One stream: where it goes and every nearby device's latency and verdict."""
    from rich.table import Table

    con = _console()
    slo = "none" if info["slo_ms"] is None else f"{info['slo_ms']:g} ms"
    con.print(f"stream {info['stream']}: origin {info['origin']}, model {info['model']}, "
              f"{info['rate_hz']:g} Hz, SLO {slo}, unserved {info['unserved']:.0%}", highlight=False)
    if info.get("note"):
        con.print(info["note"], highlight=False)
    t = Table(title="devices by static latency (ms)", title_justify="left")
    for col in ("device", "transfer", "propagation", "compute", "static", "share", "verdict"):
        t.add_column(col, justify="right" if col not in ("device", "verdict") else "left")
    for row in info["devices"]:
        t.add_row(row["device"], _ms(row["transfer_ms"]), _ms(row["propagation_ms"]), _ms(row["compute_ms"]),
                  _ms(row["static_ms"]), f"{row['share']:.0%}", row["verdict"])
    con.print(t)
    if info.get("more"):
        con.print(f"... {info['more']} more devices, none serving this stream", highlight=False)
