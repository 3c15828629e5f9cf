"""The ``lepton`` command: one tool, one subcommand per part.

Each part owns its subcommands in its own ``cli`` module, exposing
``register(subparsers)``; every subcommand sets ``func(args) -> int``.
Parsing lives there, work lives in the libraries, and library errors become
one clean line here, in one place.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from lepton import __version__
from lepton.errors import LeptonError

# Modules that add subcommands; imported lazily so `lepton --help` stays fast
# and a missing optional part never breaks the others.
SUBCOMMAND_MODULES = (
    "lepton.agent.cli",
    "lepton.coordinator.cli",
    "lepton.models.cli",
    "lepton.provisioning.cli",
    "lepton.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lepton",
        description="lepton-edge: run TFLite models on a fleet of small devices, "
        "placed where the latency model says they serve each stream best.",
    )
    parser.add_argument("--version", action="version", version=f"lepton-edge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="debug log output (default: info); give it before the command: lepton -v agent ...")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # that part is not built into this install
            raise
        module.register(sub)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity else logging.INFO  # the default already shows info: -v adds debug
    # journald adds timestamps under systemd; elsewhere a short one helps.
    under_systemd = "INVOCATION_ID" in os.environ
    fmt = "%(levelname)s %(threadName)s %(name)s: %(message)s"
    if not under_systemd:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `lepton status | head`: the reader had what it wanted. Later writes (the final flush) go nowhere
        # instead of raising again on the closed pipe. A broken pipe anywhere else (a socket) is an error.
        if not _stdout_gone():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _stdout_gone() -> bool:
    """True when standard output is a pipe whose reader has closed it."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test's capture, a closed one)
        return False


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except LeptonError as exc:
        print(f"lepton: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
