"""``lepton demo``: a small fleet on this machine, with real models and live placement.

A private broker, a coordinator and five agents run as separate processes
(two weak camera devices, a sensor gateway, two inference workers). Midway a
worker is killed (its streams fail over) and a camera joins with a heavy
stream (a load spike); the coordinator replans each time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from lepton.errors import ConfigError
from lepton.protocol import DEFAULT_PREFIX

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run a small fleet on this machine with live placement",
        description="Start a private MQTT broker (Mosquitto when installed, else a built-in one), a coordinator "
        "and five agents with different capacities running the zoo models on synthetic camera and vibration "
        "streams. Shows devices, placement, the latency breakdown per stream and results live; kills a worker "
        "(failover) and adds a camera (load spike) on the way. Ctrl-C, SIGTERM or SIGHUP stops everything: "
        "every process it started is stopped, the temp dir is removed and the summary is printed.",
    )
    p.add_argument("--duration", type=_duration, default=0, metavar="S",
                   help="stop after S seconds (default: run until Ctrl-C; with --json, 60 s); the failover "
                   "and the spike happen at about 35%% and 60%% of it (the spike at least 12 s before the end)")
    p.add_argument("--json", action="store_true", help="no live view; print a JSON summary at the end")
    p.add_argument("--workdir", type=_workdir, metavar="DIR", help="keep configs, logs and databases here (default: a temp dir, removed)")
    p.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                   help="which private broker to start (default: mosquitto when installed)")
    p.set_defaults(func=_run)


def _duration(text: str) -> float:
    """--duration: seconds, finite and not negative (0: until stopped)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds >= 0 (0: run until stopped)")
    return value


def _workdir(text: str) -> Path:
    """--workdir: a directory we can write, or a path where one can be created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    existing = next((p for p in (path.absolute(), *path.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not writable")
    return path


class StopSignals:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP all ask the demo to stop the same way.

    The first one sets ``event``: the timeline ends at its next step, then every
    process the demo started is stopped, the temp dir removed and the summary
    printed. A second one before clean-up interrupts what is running (a slow
    start); once clean-up has begun, further ones are ignored so it can finish.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: str | None = None
        self.cleaning = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum, frame) -> None:
        if self.cleaning:
            return
        if self.event.is_set():
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.event.set()


def _run(args) -> int:
    from lepton.demo.scenario import Scenario

    if args.json and not args.duration:
        args.duration = 60.0
    with StopSignals() as stop:
        workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lepton-demo-"))
        scenario = None
        try:
            try:
                workdir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create --workdir {workdir}: {exc.strerror or exc}") from None
            scenario = Scenario(workdir, prefix=DEFAULT_PREFIX, duration=args.duration, broker=args.broker,
                                stop=stop.event)
            summary = scenario.run(live=not args.json)
        finally:
            stop.cleaning = True
            if scenario is not None:
                scenario.stop()
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        summary["stopped_by"] = stop.received
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
        if args.workdir:
            db = Path(args.workdir) / "coordinator.db"
            print(f"\nkept in {args.workdir}: configs, logs and databases; look back with\n"
                  f"  lepton status --db {db}\n  lepton events --db {db}\n  lepton results --db {db} --limit 50")
    return 0 if summary["ok"] else 1


def _print_summary(summary: dict) -> None:
    stopped = f" (stopped by {summary['stopped_by']})" if summary.get("stopped_by") else ""
    print(f"\nlepton demo: {summary['duration_s']:.0f}s{stopped}, {summary['results']} results, "
          f"{summary['plans']} plans, {summary['placements_published']} placements published")
    for name, s in summary["streams"].items():
        acc = "" if s["accuracy"] is None else f", accuracy {s['accuracy']:.0%}"
        print(f"  {name:<28} {s['results']:>6} results, computed on {s['computed_on']}{acc}")
    for f in summary["failovers"]:
        print(f"  failover: {f['stream']} moved off {f['device']} to {', '.join(f['moved_to'])} "
              f"in {f['recovered_after_s']:.1f}s")
    for problem in summary["problems"]:
        print(f"  problem: {problem}")
