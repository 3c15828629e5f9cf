"""``lepton agent``: run the device daemon, or check its config."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lepton agent`` to the ``lepton`` command."""
    parser = subparsers.add_parser(
        "agent",
        help="run the device daemon (capture, infer, publish, never lose a result)",
        description="Run the lepton-edge device agent: read frames from the configured sources, run each "
        "stream's model, keep every result in a SQLite outbox until the coordinator acknowledges it, and "
        "publish results, status and telemetry over MQTT. Stops cleanly on SIGTERM or SIGINT.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", metavar="FILE", help="the agent's TOML config; run the daemon")
    group.add_argument("--check-config", metavar="FILE",
                       help="validate FILE (keys, sources, streams, models, credentials files) and exit: "
                       "0 if it is good, 2 with one line naming the problem")
    parser.add_argument("--json", action="store_true", help="with --check-config: print the validated config as JSON")
    parser.set_defaults(func=main)


def check(path: str, as_json: bool = False) -> int:
    """Validate a config file without changing anything; ConfigError (exit 2) names what is wrong."""
    from lepton.agent.app import check_references
    from lepton.agent.config import load_config
    from lepton.agent.session import read_password, tls_context

    from lepton.errors import naming_config

    cfg = load_config(path)
    with naming_config(path):  # named like the schema's errors: which file, then which key
        # The broker's files first: the model downloads fall back to broker.tls_ca, and a missing CA is the
        # broker's problem before it is theirs.
        read_password(cfg.broker.password_file)
        if cfg.broker.tls_ca:
            tls_context(cfg.broker)
        check_references(cfg, verify=True)
    if as_json:
        from lepton.agent.sources import validate_source_config

        whole = cfg.model_dump()
        whole["sources"] = [validate_source_config(entry).model_dump() for entry in cfg.sources]  # defaults too
        print(json.dumps(whole, indent=2))
    else:
        print(f"{path}: ok ({len(cfg.sources)} source(s), {len(cfg.streams)} stream(s), device {cfg.device_id})")
    return 0


def main(args: argparse.Namespace) -> int:
    from lepton.errors import ConfigError, naming_config

    if args.json and not args.check_config:
        raise ConfigError("--json goes with --check-config (the daemon logs to stderr and prints no JSON)")
    if args.check_config:
        return check(args.check_config, args.json)
    from lepton.agent.app import run
    from lepton.agent.config import load_config

    cfg = load_config(args.config)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        if stop.is_set():
            return
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with naming_config(args.config):  # what start-up finds wrong with the config's models or files
        code = run(cfg, stop)
    sys.stdout.flush()
    return code
