"""From a plan to each device's ``placement/desired`` content.

A device is told the models to hold (name, version, sha256, size and the URL
to fetch each from), where each stream it originates is served (``routes``;
an empty list means unserved right now), and which streams of other devices
it serves (``serve``: origin -> stream ids). Its own locally served streams
appear in ``routes`` only.
"""

from __future__ import annotations

import json

from lepton.coordinator.fleetview import FleetView
from lepton.coordinator.http import model_url
from lepton.protocol import messages as m

MIN_SHARE = 1e-4  # shares below this are solver noise, not routing decisions
# A placement whose shares all moved less than this is not published again: a stream split by CPU or a link
# moves its shares with every rate or link measurement (links measure within +-3%: at 0.02 a split across a
# full downlink was re-sent at every timer plan), and a new generation each time would only make devices
# re-apply it.
SHARE_TOLERANCE = 0.05


def contents(plan, view: FleetView, base_url: str) -> dict[str, dict]:
    """Desired content (models, routes, serve) for every online device in the snapshot.

    Models are named at the versions the plan was made with (``view.known``), or at the version a
    device was told to keep (``view.versions``).
    """
    known = view.known
    routes = {key: [(rc.device, min(1.0, max(0.0, float(rc.share)))) for rc in plan.routes.get(key, [])
                    if rc.share > MIN_SHARE] for key in view.streams}
    out: dict[str, dict] = {}
    for dev in (d["id"] for d in view.snapshot["devices"] if d["online"]):
        refs = [_ref(view.versions.get((dev, name)) or known[name], base_url)
                for name in sorted(set(plan.placement.get(dev, []))) if name in known]
        own = {sid: [m.Route(device=d, share=round(s, 4)) for d, s in routes[key]]
               for key, (origin, sid) in view.streams.items() if origin == dev}
        serve: dict[str, list[str]] = {}
        for key, (origin, sid) in view.streams.items():
            if origin != dev and any(d == dev for d, _ in routes[key]):
                serve.setdefault(origin, []).append(sid)
        out[dev] = {"models": refs, "routes": own, "serve": {o: sorted(s) for o, s in sorted(serve.items())}}
    return out


def _ref(row: dict, base_url: str) -> m.ModelRef:
    return m.ModelRef(
        name=row["name"], version=row["version"], sha256=row["sha256"], size=row["size"],
        url=model_url(base_url, row["name"], row["version"]),
        manifest_url=model_url(base_url, row["name"], row["version"], "manifest.json"),
    )


def same(stored_json: str | None, content: dict) -> bool:
    """Whether a stored Desired already says what *content* says (generation and time aside)."""
    if not stored_json:
        return False
    old = json.loads(stored_json)
    new = json.loads(m.Desired(device="x", generation=0, ts=0, **content).model_dump_json())
    if old.get("models") != new["models"] or old.get("serve") != new["serve"]:
        return False
    before, after = old.get("routes") or {}, new["routes"]
    if set(before) != set(after):
        return False
    for sid, routes in after.items():
        was = {r["device"]: r["share"] for r in before[sid]}
        now = {r["device"]: r["share"] for r in routes}  # by device: two near-equal shares may swap places
        if set(was) != set(now) or any(_moved(was[d], now[d]) for d in now):
            return False
    return True


def _moved(a: float, b: float) -> bool:
    """A share moved enough to send again: by SHARE_TOLERANCE, or by half of itself and at least a point (0.049
    to 0.0002 is under the tolerance, but that device would serve 245 times its share). On the 4-decimal grid
    shares are published on, so that a move of exactly the tolerance counts either way."""
    d = round(abs(a - b), 4)
    return d >= SHARE_TOLERANCE or (d >= 0.01 and d >= 0.5 * max(a, b))


def describe(old_json: str | None, msg: m.Desired) -> str:
    """A one-line summary of what changed for the events log."""
    old = json.loads(old_json) if old_json else {}
    before = {r["name"] for r in old.get("models", [])}
    after = {r.name for r in msg.models}
    parts = [f"+{n}" for n in sorted(after - before)] + [f"-{n}" for n in sorted(before - after)]
    for sid, rs in msg.routes.items():
        parts.append(f"{sid}->" + ("unserved" if not rs else ",".join(f"{r.device}:{r.share:.2f}" for r in rs)))
    for origin, sids in msg.serve.items():
        parts.append(f"serves {origin}:{','.join(sids)}")
    return f"gen {msg.generation}: " + (" ".join(parts) or "nothing")
