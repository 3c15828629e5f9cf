"""The demo's live terminal view (rich).

Below ``WIDE`` columns (an 80-column terminal) the tables keep the columns that
matter and drop the latency breakdown, the roles and where results were
computed, so device and stream names are never cut.
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from lepton.coordinator.fleetview import stream_keys
from lepton.demo.observe import Observer

WIDE = 180  # terminal columns from which the full tables fit


def _routes_for(plan: dict | None, key: str, origin: str, stream: str) -> list[dict]:
    """The plan's routes of one stream. The plan names it as the coordinator's snapshot does
    (coordinator.fleetview.stream_keys): *key*, computed from the streams seen here; a stream id
    shared with a stream not seen yet is qualified by its origin there."""
    if not plan:
        return []
    routes = plan["routes"]
    return routes.get(key) or routes.get(f"{origin}.{stream}") or []


def planned_cpu(plan: dict | None) -> dict[str, float]:
    """Device -> share of its inference CPU the last plan fills (devices it gives no work: absent)."""
    if not plan:
        return {}
    out: dict[str, float] = {}
    for routes in plan["routes"].values():
        for r in routes:
            if r.get("utilization") is not None:
                out[r["device"]] = r["utilization"]
    return out


def _table(title: str, wide: bool) -> Table:
    return Table(title=title, expand=True, title_justify="left", box=box.HEAVY_HEAD if wide else box.SIMPLE_HEAD,
                 pad_edge=wide)


def devices_table(obs: Observer, roles: dict[str, str], plan: dict | None = None, wide: bool = True) -> Table:
    t = _table("devices (cpu: share of the device's inference CPU the last plan fills)", wide)
    t.add_column("device", no_wrap=True)
    if wide:
        t.add_column("role", no_wrap=True)
    t.add_column("state", no_wrap=True)
    t.add_column("cpu", justify="right", no_wrap=True)
    t.add_column("outbox", justify="right", no_wrap=True)
    t.add_column("gen", justify="right", no_wrap=True)
    if wide:
        t.add_column("models (reported)")
        t.add_column("p50 invoke ms")
    else:
        t.add_column("models (p50 invoke ms)")
    cpu = planned_cpu(plan)
    for dev in sorted(obs.devices.values(), key=lambda d: d.id):
        style = {"online": "green", "offline": "red"}.get(dev.state, "yellow")
        row = [dev.id] + ([roles.get(dev.id, "")] if wide else [])
        row += [f"[{style}]{dev.state}[/]", "-" if plan is None or dev.state == "offline" else f"{cpu.get(dev.id, 0.0):.0%}",
                "-" if dev.outbox is None else str(dev.outbox), "-" if dev.generation is None else str(dev.generation)]
        state = {k: "" if v == "loaded" else f" ({v})" for k, v in dev.models.items()}
        if wide:
            row.append(", ".join(f"{k}{s}" for k, s in sorted(state.items())) or "-")
            row.append(", ".join(f"{k} {v:.1f}" for k, v in sorted(dev.timings.items())) or "-")
        else:
            names = sorted(set(state) | set(dev.timings))
            row.append("\n".join(f"{k}{state.get(k, '')}" + (f" {dev.timings[k]:.1f}" if k in dev.timings else "")
                                 for k in names) or "-")
        t.add_row(*row)
    return t


def streams_table(obs: Observer, plan: dict | None, wide: bool = True) -> Table:
    if wide:
        title = "streams (planned latency ms: transfer + propagation + compute + queueing)"
        cols = ("stream", "model", "planned on (share)", "xfer", "prop", "comp", "queue", "total",
                "results", "computed on", "e2e p50 ms", "last output")
    else:
        title = "streams (plan: planned latency ms; e2e: measured p50 ms)"
        cols = ("stream", "planned on", "plan", "e2e", "results", "last output")
    t = _table(title, wide)
    numbers = ("xfer", "prop", "comp", "queue", "total", "plan", "e2e", "results", "e2e p50 ms")
    for col in cols:
        t.add_column(col, no_wrap=col == "stream" or col in numbers or (col == "planned on" and not wide),
                     justify="right" if col in numbers else "left")
    now = time.time()
    keys = stream_keys(list(obs.streams))  # the ids the coordinator's plan uses: bare, qualified or salted
    for (origin, stream), s in sorted(obs.streams.items()):
        routes = _routes_for(plan, keys[(origin, stream)], origin, stream)
        share = (" " if wide else "\n").join(f"{r['device']} {r['share']:.0%}" for r in routes) or "-"

        def w(key: str) -> str:
            total = sum(r["share"] for r in routes)
            return f"{sum(r[key] * r['share'] for r in routes) / total:.1f}" if total else "-"

        fresh = "" if now - s.last_at < 5 else " [red](stalled)[/]"
        p50 = s.p50_ms()
        e2e = "-" if p50 is None else f"{p50:.0f}"
        if wide:
            on = ", ".join(f"{d} {n}" for d, n in s.computed_on.most_common(2))
            t.add_row(f"{origin}/{stream}", s.model, share, w("transfer_ms"), w("propagation_ms"), w("compute_ms"),
                      w("queueing_ms"), w("total_ms"), str(s.results), on, e2e, s.last_output + fresh)
        else:
            t.add_row(f"{origin}/{stream}", share, w("total_ms"), e2e, str(s.results), s.last_output + fresh)
    return t


def render(obs: Observer, roles: dict[str, str], started: float, duration: float | None,
           width: int | None = None) -> Panel:
    """Devices, streams with the plan's latency breakdown, the last plan and recent events.

    *width*: the terminal's columns (None: wide); below ``WIDE`` the compact tables.
    """
    wide = width is None or width >= WIDE
    with obs.lock:
        plan = obs.last_plan()
        body = [devices_table(obs, roles, plan, wide), streams_table(obs, plan, wide)]
        if plan:
            unserved = ", ".join(f"{k} {v:.0%}" for k, v in plan["unserved"].items() if v > 1e-4) or "none"
            body.append(f"plan #{plan['id']} ({plan['trigger']}) via {plan['path']}: objective "
                        f"{plan['objective']:.1f} ms, solved in {plan['solve_s'] * 1000:.0f} ms; "
                        f"unserved: {unserved}; placements published: {obs.desired_count}")
        body += [time.strftime("%H:%M:%S ", time.localtime(ts)) + text for ts, text in obs.events]
    elapsed = time.time() - started
    clock = f"{elapsed:.0f}s" + (f" / {duration:.0f}s" if duration else " (Ctrl-C stops)")
    return Panel(Group(*body), title=f"lepton demo  {clock}  coordinator {obs.coordinator}", border_style="blue")
