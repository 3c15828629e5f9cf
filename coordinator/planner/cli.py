"""``lepton plan``: plan placement offline from a snapshot file, and explain it.

Registered by lepton.coordinator.cli through ``register(subparsers)``.
"""

from __future__ import annotations

import json
import os
import sys

HELP = "plan placement for a fleet snapshot (offline)"
DESCRIPTION = (
    "Plan which model runs on which device for a fleet snapshot (JSON; see docs/planner.md, or write the live "
    "fleet with `lepton coordinator snapshot`), exactly as the coordinator would, and print the plan: status, "
    "solver path, objective, solve time, placement per device, routes per stream with their latency "
    "(transfer, propagation, compute, queueing), unserved streams, and the model loads and unloads against "
    "the snapshot's current placement."
)


def register(subparsers) -> None:
    """Add ``plan`` to the ``lepton`` parser."""
    p = subparsers.add_parser("plan", help=HELP, description=DESCRIPTION)
    p.add_argument("--snapshot", required=True, metavar="FILE", help="fleet snapshot JSON to plan for")
    p.add_argument("--json", action="store_true", help="print the plan (or the explanation) as JSON")
    p.add_argument("--explain", metavar="STREAM",
                   help="explain one stream: every device that could serve it, its latency terms, and why it "
                   "was or was not chosen")
    p.add_argument("--greedy", action="store_true", help="the greedy baseline instead of the optimised plan")
    p.set_defaults(func=run)


def run(args) -> int:
    """Entry point of ``lepton plan``."""
    from lepton.coordinator import planner
    from lepton.coordinator.snapshot import load_snapshot

    snap = load_snapshot(args.snapshot)
    if args.explain and args.explain not in {s.id for s in snap.streams}:
        from lepton.errors import ConfigError

        raise ConfigError(f"--explain: no stream {args.explain!r} in {args.snapshot}")
    if not snap.streams:  # valid (a coordinator with no devices yet writes such a file), but likely not meant
        print(f"lepton: note: {args.snapshot} has {len(snap.devices)} device(s) and no streams: nothing to plan",
              file=sys.stderr)
    result = planner.greedy(snap) if args.greedy else planner.plan(snap)
    if args.explain:
        info = planner.explain(snap, args.explain, result)
        if args.json:
            _dump(info)
        else:
            from lepton.coordinator.planner.render import print_explain

            print_explain(info)
        return 0
    if args.json:
        _dump(result.to_json())
    else:
        from lepton.coordinator.planner.render import print_plan

        print_plan(result)
    return 0


def _dump(obj) -> None:
    from lepton.coordinator.planner.result import _finite

    try:  # an infinite figure (a device planned to exactly 100%: unbounded queueing) is null, as in Plan.to_json
        json.dump(_finite(obj), sys.stdout, indent=2, sort_keys=False, allow_nan=False)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `lepton plan --json | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
