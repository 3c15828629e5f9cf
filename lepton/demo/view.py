"""The demo's live terminal view (rich)."""

from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from lepton.demo.observe import Observer


def _routes_for(plan: dict | None, origin: str, stream: str) -> list[dict]:
    if not plan:
        return []
    routes = plan["routes"]
    return routes.get(stream) or routes.get(f"{origin}.{stream}") or []


def devices_table(obs: Observer, roles: dict[str, str]) -> Table:
    t = Table(title="devices", expand=True, title_justify="left")
    for col in ("device", "role", "state", "load", "outbox", "gen", "models (reported)", "p50 invoke ms"):
        t.add_column(col)
    for dev in sorted(obs.devices.values(), key=lambda d: d.id):
        style = {"online": "green", "offline": "red"}.get(dev.state, "yellow")
        models = ", ".join(f"{k}{'' if v == 'loaded' else ' (' + v + ')'}" for k, v in sorted(dev.models.items())) or "-"
        timings = ", ".join(f"{k} {v:.1f}" for k, v in sorted(dev.timings.items())) or "-"
        t.add_row(dev.id, roles.get(dev.id, ""), f"[{style}]{dev.state}[/]",
                  "-" if dev.load1 is None else f"{dev.load1:.2f}", "-" if dev.outbox is None else str(dev.outbox),
                  "-" if dev.generation is None else str(dev.generation), models, timings)
    return t


def streams_table(obs: Observer, plan: dict | None) -> Table:
    t = Table(title="streams (planned latency ms: transfer + propagation + compute + queueing)", expand=True,
              title_justify="left")
    for col in ("stream", "model", "planned on (share)", "xfer", "prop", "comp", "queue", "total",
                "results", "computed on", "e2e p50 ms", "last output"):
        t.add_column(col)
    now = time.time()
    for (origin, stream), s in sorted(obs.streams.items()):
        routes = _routes_for(plan, origin, stream)
        share = " ".join(f"{r['device']} {r['share']:.0%}" for r in routes) or "-"

        def w(key: str) -> str:
            total = sum(r["share"] for r in routes)
            return f"{sum(r[key] * r['share'] for r in routes) / total:.1f}" if total else "-"

        fresh = "" if now - s.last_at < 5 else " [red](stalled)[/]"
        on = ", ".join(f"{d} {n}" for d, n in s.computed_on.most_common(2))
        p50 = s.p50_ms()
        t.add_row(f"{origin}/{stream}", s.model, share, w("transfer_ms"), w("propagation_ms"), w("compute_ms"),
                  w("queueing_ms"), w("total_ms"), str(s.results), on, "-" if p50 is None else f"{p50:.0f}",
                  s.last_output + fresh)
    return t


def render(obs: Observer, roles: dict[str, str], started: float, duration: float | None) -> Panel:
    """Devices, streams with the plan's latency breakdown, the last plan and recent events."""
    with obs.lock:
        plan = obs.last_plan()
        body = [devices_table(obs, roles), streams_table(obs, plan)]
        if plan:
            unserved = ", ".join(f"{k} {v:.0%}" for k, v in plan["unserved"].items() if v > 1e-4) or "none"
            body.append(f"plan #{plan['id']} ({plan['trigger']}) via {plan['path']}: objective "
                        f"{plan['objective']:.1f} ms, solved in {plan['solve_s'] * 1000:.0f} ms; "
                        f"unserved: {unserved}; placements published: {obs.desired_count}")
        body += [time.strftime("%H:%M:%S ", time.localtime(ts)) + text for ts, text in obs.events]
    elapsed = time.time() - started
    clock = f"{elapsed:.0f}s" + (f" / {duration:.0f}s" if duration else " (Ctrl-C stops)")
    return Panel(Group(*body), title=f"lepton demo  {clock}  coordinator {obs.coordinator}", border_style="blue")
