"""A pure-Python MQTT broker (amqtt) for machines without Mosquitto.

`lepton demo` uses it only when no ``mosquitto`` binary is installed. It runs
as its own process, so the demo can stop or kill it like Mosquitto. It keeps
nothing on disk: production fleets run Mosquitto (see docs/deploy.md).

    python -m lepton.embedded_broker --host 127.0.0.1 --port 1883
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lepton.broker import BrokerProcess, free_port
from lepton.errors import LeptonError


def serve(host: str, port: int) -> None:
    """Run the broker in this process until SIGTERM/SIGINT."""
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.shutdown()

    asyncio.run(main())


@dataclass
class EmbeddedBroker(BrokerProcess):
    """The embedded broker as a child process, with MosquittoBroker's interface."""

    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)

    @property
    def log_path(self) -> Path:
        return self.workdir / "embedded-broker.log"

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "lepton.embedded_broker", "--host", self.host, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LeptonError(f"embedded broker exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise LeptonError(f"embedded broker did not listen on {self.host}:{self.port} within {timeout}s")


def private_broker(workdir: Path, prefer: str = "auto"):
    """A broker of one's own: Mosquitto when installed (or asked for), else the embedded one."""
    from lepton.broker import MosquittoBroker, mosquitto_binary

    if prefer == "mosquitto" or (prefer == "auto" and mosquitto_binary()):
        return MosquittoBroker(Path(workdir), persistence=True)
    return EmbeddedBroker(Path(workdir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lepton.embedded_broker", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    serve(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
