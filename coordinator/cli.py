"""``lepton coordinator``, ``lepton status``, ``lepton events`` (and the planner's ``lepton plan``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lepton.brokerfiles import reason
from lepton.coordinator.status import EVENT_KINDS
from lepton.errors import ConfigError


def register(subparsers) -> None:
    """Add the coordinator's subcommands to the ``lepton`` parser."""
    _add_coordinator(subparsers)
    _add_status(subparsers)
    _add_events(subparsers)
    _add_results(subparsers)
    try:
        from lepton.coordinator.planner.cli import register as register_planner
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("lepton.coordinator.planner"):
            raise
    else:
        register_planner(subparsers)


def _add_coordinator(subparsers) -> None:
    p = subparsers.add_parser(
        "coordinator",
        help="run the fleet coordinator (ingest, placement, model server)",
        description="Run the coordinator: follows the fleet over MQTT, stores results exactly once, plans which "
        "model runs on which device and publishes placements, and serves model files over HTTP.",
    )
    group = p.add_mutually_exclusive_group()
    # Its own dest: `lepton coordinator --config FILE snapshot` reads the database FILE names (the snapshot's
    # --config default would overwrite a shared one).
    group.add_argument("--config", metavar="FILE", dest="coordinator_config",
                       help="coordinator TOML config (defaults for every key left out): run the coordinator "
                       "with it (before 'plans', 'snapshot' or 'backup': read the database it names)")
    group.add_argument("--check-config", metavar="FILE", help="validate FILE and what start-up needs of it (files "
                       "readable, directories there), changing nothing, and exit: 0 if valid, 2 with the reason")
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="coordinator_command", metavar="SUBCOMMAND")
    snap = _db_command(
        sub, "snapshot", _snapshot,
        help="write the live fleet as a planner snapshot",
        description="Write the fleet as the coordinator sees it as a snapshot JSON for `lepton plan --snapshot`, "
        "so any live decision can be replayed and explained offline.",
    )
    snap.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    snap.add_argument("--plan", metavar="ID", help="the exact snapshot a recorded plan was made from "
                      "(an id from `lepton coordinator plans`, or 'last') instead of the fleet now")

    pl = _db_command(
        sub, "plans", _plans,
        help="the plans the coordinator made, newest last",
        description="The plans the coordinator recorded (it keeps the last 200): when, what set each off (a "
        "timer, a device gone or born, a stream added, measured compute or links drifting), the solver's "
        "status and path, objective and gap, solve time, how many devices' placements changed, and what was "
        "left unserved. Replay one offline: `lepton coordinator snapshot --plan ID --out s.json`, then "
        "`lepton plan --snapshot s.json --explain STREAM`.",
    )
    pl.add_argument("--limit", type=_count, default=20, metavar="N", help="newest N plans (default 20)")
    pl.add_argument("--json", action="store_true", help="print JSON")


    back = _db_command(
        sub, "backup", _backup,
        help="copy the fleet database, consistent, while the coordinator runs",
        description="Copy the coordinator's database (fleet registry, results, acks, plans, events) to OUT with "
        "SQLite's online backup: one consistent moment, taken while the coordinator keeps writing (WAL "
        "readers never block it). The copy is checked (integrity_check) before it is renamed into place. "
        "To restore: stop the coordinator, put the copy at [db] path (remove the old file's -wal and -shm), "
        "start it.",
    )
    back.add_argument("out", metavar="OUT", help="the copy to write (refused if it exists, unless --force)")
    back.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _add_status(subparsers) -> None:
    st = _db_command(
        subparsers, "status", _status, help="the fleet as the coordinator sees it",
        description="Devices (liveness, load, outbox depth, acked results, desired and reported placement, "
        "routes; a device clock a minute or more off is marked) and the last plan, read from the coordinator's "
        "database.",
    )
    st.add_argument("--json", action="store_true", help="print JSON")


def _add_events(subparsers) -> None:
    ev = _db_command(
        subparsers, "events", _events, help="what changed in the fleet and why",
        description="The coordinator's event log: devices born, gone offline or stale, placements published, "
        "models that failed to load, streams left unserved or skipped (recorded when the set of them changes), "
        "plans that failed, steps of the wall clock.",
    )
    ev.add_argument("--limit", type=_count, default=50, metavar="N", help="newest N events (default 50)")
    ev.add_argument("--device", default="", metavar="ID", help="only this device")
    ev.add_argument("--kind", default="", help="only this kind: " + ", ".join(EVENT_KINDS))
    ev.add_argument("--json", action="store_true", help="print JSON")


def _add_results(subparsers) -> None:
    res = _db_command(
        subparsers, "results", _results, help="the results the coordinator stored, newest last",
        description="Results as the coordinator stored them (exactly once, kept [db] keep_results_days): when "
        "each arrived, the device and stream, its seq, the model and the device that ran it, the invoke time, "
        "capture to storage (E2E), and what it found (the top class and score, an anomaly verdict, else its "
        "output). --json prints each result as its device sent it, one JSON object per line, with received_at. "
        "--follow keeps printing results as they are stored until Ctrl-C.",
    )
    res.add_argument("--device", default="", metavar="ID", help="only this device's results")
    res.add_argument("--stream", default="", metavar="ID", help="only this stream (STREAM, or DEVICE/STREAM)")
    res.add_argument("--since", metavar="WHEN", help="only results stored since WHEN: a duration back from now "
                     "(90s, 15m, 2h, 7d) or a local date or time (2026-11-27, 2026-11-27T08:00)")
    res.add_argument("--limit", type=_count, default=20, metavar="N", help="newest N results (default 20)")
    res.add_argument("--follow", "-f", action="store_true", help="then print new results as they are stored")
    res.add_argument("--interval", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)
    res.add_argument("--json", action="store_true", help="one JSON object per result and line (JSON Lines)")


def _db_command(subparsers, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand that reads the coordinator's database: --db, or the [db] path of --config."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("--db", metavar="DB", help="coordinator database (default: [db] path of --config, else "
                   "/var/lib/lepton/coordinator.db; a coordinator installed from a provision bundle keeps it in "
                   "/var/lib/lepton-coordinator/)")
    p.add_argument("--config", metavar="FILE", help="take the database path from this coordinator config")
    p.set_defaults(func=func)
    return p


def _db_path(args) -> str:
    from lepton.coordinator.config import load_config

    if args.db:
        if getattr(args, "config", None):
            raise ConfigError("--db and --config both name a database: give one")
        return args.db
    return load_config(args.config or getattr(args, "coordinator_config", None)).db.path


def _run(args) -> int:
    from lepton.coordinator.config import check_files, load_config
    from lepton.errors import naming_config

    if args.check_config:
        cfg = load_config(args.check_config)
        with naming_config(args.check_config):
            check_files(cfg)
        print(f"{args.check_config}: valid (broker {cfg.broker.host}:{cfg.broker.port}, db {cfg.db.path})")
        return 0
    if not args.coordinator_config:  # the defaults name a broker on this host: never join one by accident
        raise ConfigError("the coordinator needs --config FILE (every key: docs/coordinator.md); "
                          "`lepton coordinator --help` lists its subcommands")
    from lepton.coordinator.app import Coordinator

    return Coordinator(load_config(args.coordinator_config), args.coordinator_config).run()


def _snapshot(args) -> int:
    from lepton.coordinator import fleetview
    from lepton.coordinator.db import open_readonly
    from lepton.coordinator.registry import FleetRegistry

    reg = FleetRegistry(open_readonly(_db_path(args)))
    if args.plan:
        return _write(_recorded(reg, args.plan), args.out)
    params = reg.meta("planner")
    if params is None:
        raise ConfigError("the database has no planner parameters yet: start the coordinator on it once")
    defaults = reg.meta("defaults", {})
    view = fleetview.build(reg, params, **defaults)
    try:
        from lepton.coordinator.snapshot import load_snapshot
    except ModuleNotFoundError:
        pass
    else:
        load_snapshot(view.snapshot)  # what we write must be what `lepton plan` accepts
    return _write(view.snapshot, args.out)


def _backup(args) -> int:
    import sqlite3

    from lepton.coordinator.db import open_readonly

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out}: exists (give --force to replace it)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out}: no such directory {out.parent}")
    source = open_readonly(_db_path(args))
    tmp = out.with_name(f".{out.name}.part")
    try:
        tmp.unlink(missing_ok=True)
        copy = sqlite3.connect(str(tmp))
        try:
            source.conn.backup(copy)  # all pages in one step: one consistent snapshot of the WAL database
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            verdict = copy.execute("PRAGMA integrity_check").fetchone()[0]
            counts = {t: copy.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("devices", "results")}
        finally:
            copy.close()
        if verdict != "ok":
            raise ConfigError(f"the copy failed its integrity check ({verdict}); {out} not written")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"{out}: cannot write the copy: {reason(exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)
        source.close()
    print(f"wrote {out}: {counts['devices']} devices, {counts['results']} results, "
          f"{out.stat().st_size / 2**20:.1f} MiB, integrity ok", file=sys.stderr)
    return 0


def _recorded(reg, plan_id: str) -> dict:
    sql = "SELECT id, snapshot FROM plans " + ("ORDER BY id DESC LIMIT 1" if plan_id == "last" else "WHERE id = ?")
    try:
        args = [] if plan_id == "last" else [int(plan_id)]
    except ValueError:
        raise ConfigError(f"--plan {plan_id!r}: give a plan id (a number) or 'last'") from None
    rows = list(reg.db.query(sql, args))
    if not rows or not rows[0]["snapshot"]:
        raise ConfigError(f"no recorded plan {plan_id!r} in this database")
    return json.loads(rows[0]["snapshot"])


def _write(snapshot: dict, out: str | None) -> int:
    text = json.dumps(snapshot, indent=2) + "\n"
    if out:
        try:
            Path(out).write_text(text)
        except OSError as exc:
            raise ConfigError(f"--out {out}: cannot write: {reason(exc)}") from None
        print(f"wrote {out}: {len(snapshot['devices'])} devices, {len(snapshot['streams'])} streams", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _plans(args) -> int:
    from lepton.coordinator.db import open_readonly
    from lepton.coordinator.status import plans, render_plans

    rows = plans(open_readonly(_db_path(args)), args.limit)
    print(json.dumps(rows, indent=2) if args.json else render_plans(rows))
    return 0


def _status(args) -> int:
    from lepton.coordinator.db import open_readonly
    from lepton.coordinator.status import fleet_status, render_status

    status = fleet_status(open_readonly(_db_path(args)))
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def _events(args) -> int:
    from lepton.coordinator.db import open_readonly
    from lepton.coordinator.status import events, render_events

    rows = events(open_readonly(_db_path(args)), args.limit, args.device, args.kind)
    print(json.dumps(rows, indent=2) if args.json else render_events(rows))
    return 0


def _results(args) -> int:
    from lepton.coordinator import results as view
    from lepton.coordinator.db import open_readonly

    since = view.parse_since(args.since) if args.since else None
    db = open_readonly(_db_path(args))
    devices, stream = view.scope(db, args.device, args.stream)
    # The follower's snapshot first, the listing up to it: nothing stored in between is missed or shown twice.
    follower = view.Follower(db, devices[0] if args.device or "/" in args.stream else "", stream) \
        if args.follow else None
    rows = view.newest(db, devices, stream, args.limit, since, upto=follower.hi if follower else None)
    header = True

    def show(batch: list[dict]) -> None:
        nonlocal header
        if args.json:
            for r in batch:
                print(json.dumps(r, separators=(",", ":")))
        elif batch:
            print(view.render_results(batch, header=header))
            header = False
        sys.stdout.flush()

    show(rows)
    if not rows and not args.json:
        print("no results" + (" yet; following" if follower else ""), flush=True)
    while follower is not None:
        time.sleep(max(args.interval, 0.05))
        show(follower.poll())
    return 0


def _count(text: str) -> int:
    """A number of rows, 1 or more (SQLite would read a negative LIMIT as no limit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give 1 or more")
    return value
