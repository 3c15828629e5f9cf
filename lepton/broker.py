"""A private Mosquitto broker: for `lepton demo` and for the tests.

Starts the real ``mosquitto`` binary on a free loopback port with its own
config file (plain or TLS listener, ACL, persistence as asked), and can
stop, SIGKILL and restart it on the same port and data directory.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lepton.errors import LeptonError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing uses right now, below the kernel's ephemeral range when there is room.

    A broker restarted on its port (a test's outage, a demo's) must find it free. In the ephemeral
    range an outgoing connection may hold it meanwhile, even a client's reconnect to itself (TCP
    simultaneous open to a port nothing listens on), and the restart fails "Address already in use".
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(50 if low > 12000 else 0):
        port = rng.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def mosquitto_binary() -> str | None:
    """The path of a local mosquitto, or None."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


class BrokerProcess:
    """Stopping, killing and context management for a broker run as a child process."""

    proc: subprocess.Popen | None

    def start(self):  # pragma: no cover - each broker starts its own way
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop with *sig* (SIGTERM: clean; SIGKILL: crash) and wait for exit."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class TLSFiles:
    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path | None = None
    require_certificate: bool = True
    use_identity_as_username: bool = True


@dataclass
class MosquittoBroker(BrokerProcess):
    """One mosquitto process with a config of its own in *workdir*."""

    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    persistence: bool = False
    acl_file: Path | None = None
    tls: TLSFiles | None = None
    allow_anonymous: bool = True
    max_queued_messages: int = 1000
    extra_conf: str = ""
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)

    @property
    def conf_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def config_text(self) -> str:
        lines = [
            # Run as whoever started us: as root, mosquitto would otherwise switch
            # to the `mosquitto` user and fail to write our private data dir.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"max_queued_messages {self.max_queued_messages}",
            "max_inflight_messages 100",
            # Nagle on the broker's sockets added ~40 ms to every offload round trip.
            "set_tcp_nodelay true",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self.persistence:
            # saved every second (a SIGKILLed broker loses at most the last one); not on every change:
            # each save rewrites every queued message, and under load the broker stalled its clients
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "autosave_interval 1",
                "autosave_on_changes false",
            ]
        else:
            lines.append("persistence false")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls:
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
                f"use_identity_as_username {'true' if self.tls.use_identity_as_username else 'false'}",
            ]
            if self.tls.crlfile:
                lines.append(f"crlfile {self.tls.crlfile}")
        if self.extra_conf:
            lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        binary = mosquitto_binary()
        if not binary:
            raise LeptonError("mosquitto is not installed (apt-get install mosquitto)")
        self.conf_path.write_text(self.config_text())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([binary, "-c", str(self.conf_path)], stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LeptonError(f"mosquitto exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise LeptonError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def restart(self) -> "MosquittoBroker":
        self.stop()
        return self.start()

