"""The demo fleet: configs and processes for a broker, a coordinator and agents on one machine."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from lepton.broker import free_port
from lepton.errors import LeptonError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceSpec:
    """One demo device: what it captures and how strong it is."""

    id: str
    role: str
    threads: int = 1
    cpu_share: float = 1.0
    slowdown: float = 1.0  # a slower CPU, against a host where mobilenet96 takes REFERENCE_INVOKE_MS
    up_mbps: float = 50.0
    down_mbps: float = 50.0
    rtt_ms: float = 5.0
    sources: tuple[dict, ...] = ()
    streams: tuple[dict, ...] = ()


# The host the demo's slowdowns were set on: mobilenet96 in 0.85 ms. A camera's slowdown of 150 stands for
# a device that takes 128 ms, on any host: on one 3.7 x faster, a fixed factor made the camera take 35 ms,
# too little for offloading to pay for its model load, so no stream was offloaded to the worker the demo kills.
REFERENCE_INVOKE_MS = 0.85
MAX_SLOWDOWN = 10000.0  # runtime.slowdown's bound


def host_invoke_ms(model: str = "mobilenet96", n: int = 60) -> float:
    """The median invoke time of *model* (from the shipped zoo) on this host, one thread."""
    from lepton.models.bench import bench_entry
    from lepton.models.registry import default_registry

    return bench_entry(default_registry().get(model), threads=1, iterations=n)["invoke_ms"]


def host_slowdown(target_ms: float, host_ms: float) -> float:
    """runtime.slowdown that makes an invoke of *host_ms* here take *target_ms* (within the config's bounds)."""
    factor = target_ms / host_ms
    if not 1.0 <= factor <= MAX_SLOWDOWN:
        log.warning("a slowdown of %.4g would make %.3f ms take %.1f ms; held at %g", factor, host_ms, target_ms,
                    max(1.0, min(MAX_SLOWDOWN, factor)))
    return max(1.0, min(MAX_SLOWDOWN, factor))


def demo_devices() -> list[DeviceSpec]:
    """Two weak camera devices, a sensor gateway and two workers; one spike device joins later."""
    return [
        DeviceSpec("cam-1", "weak camera", cpu_share=0.25, slowdown=150.0, up_mbps=20, rtt_ms=8,
                   sources=({"id": "door", "type": "synthetic", "pattern": "digits", "fps": 5.0, "width": 64, "height": 64},
                            {"id": "yard", "type": "synthetic", "pattern": "noise", "fps": 2.0, "width": 160, "height": 120, "seed": 1}),
                   streams=({"id": "door-digits", "source": "door", "model": "digits-int8"},
                            {"id": "yard-objects", "source": "yard", "model": "mobilenet96"})),
        DeviceSpec("cam-2", "weak camera", cpu_share=0.25, slowdown=150.0, up_mbps=20, rtt_ms=8,
                   sources=({"id": "dock", "type": "synthetic", "pattern": "noise", "fps": 1.0, "width": 320, "height": 240, "seed": 2},),
                   streams=({"id": "dock-objects", "source": "dock", "model": "mobilenet224"},)),
        DeviceSpec("gw-1", "sensor gateway", cpu_share=0.5, slowdown=20.0, up_mbps=10, rtt_ms=10,
                   sources=({"id": "pump", "type": "sensor", "mode": "synthetic", "fps": 10.0, "fault_every": 7, "seed": 3},),
                   streams=({"id": "pump-vibration", "source": "pump", "model": "vibration-int8"},)),
        DeviceSpec("worker-1", "inference worker", threads=1, cpu_share=1.0, up_mbps=200, down_mbps=200, rtt_ms=2),
        DeviceSpec("worker-2", "inference worker", threads=1, cpu_share=1.0, up_mbps=200, down_mbps=200, rtt_ms=2),
    ]


def spike_device() -> DeviceSpec:
    """The load spike: a new camera with a heavy stream joins mid-run."""
    return DeviceSpec("cam-3", "spike camera", cpu_share=0.25, slowdown=150.0, up_mbps=20, rtt_ms=8,
                      sources=({"id": "gate", "type": "synthetic", "pattern": "noise", "fps": 2.0, "width": 320, "height": 240, "seed": 4},),
                      streams=({"id": "gate-objects", "source": "gate", "model": "mobilenet224"},))


def agent_config(spec: DeviceSpec, workdir: Path, host: str, port: int, prefix: str, keepalive: int,
                 host_ms: float = REFERENCE_INVOKE_MS) -> dict[str, Any]:
    """An agent config for *spec* (validated by the agent's own loader before use); *host_ms*: mobilenet96's
    invoke time on this host, which the slowdown is scaled by."""
    state = workdir / spec.id
    slowdown = host_slowdown(spec.slowdown * REFERENCE_INVOKE_MS, host_ms) if spec.slowdown > 1 else 1.0
    return {
        "device_id": spec.id,
        "prefix": prefix,
        "broker": {"host": host, "port": port, "keepalive": keepalive, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
        "outbox": {"path": str(state / "outbox.db"), "resend_after_s": 10.0},
        "runtime": {"threads": spec.threads, "cpu_share": spec.cpu_share, "slowdown": round(slowdown, 2)},
        "telemetry": {"interval_s": 2.0, "window_s": 20.0, "version": 2},  # one release: its coordinator reads v2
        "models": {"cache_dir": str(state / "models")},
        "link": {"up_mbps": spec.up_mbps, "down_mbps": spec.down_mbps, "rtt_ms": spec.rtt_ms, "measure": False},
        "sources": [dict(s) for s in spec.sources],
        "streams": [dict(s) for s in spec.streams],
    }


def coordinator_config(workdir: Path, host: str, port: int, prefix: str, keepalive: int) -> dict[str, Any]:
    return {
        "prefix": prefix,
        "broker": {"host": host, "port": port, "keepalive": keepalive, "client_id": "lepton-demo-coordinator"},
        "db": {"path": str(workdir / "coordinator.db"), "synchronous": "NORMAL"},
        "planner": {"interval_s": 10.0, "time_limit_s": 2.0, "migration_penalty_ms": 20.0},
        "liveness": {"stale_after_s": 3.0 * keepalive},
        "http": {"bind": host, "port": free_port(host)},
    }


@dataclass
class Proc:
    """A child process of the demo, with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Proc":
        with open(self.log_path, "ab") as out:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 12.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within *timeout*."""
        if not self.alive:
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def log_tail(self, n: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Fleet:
    """Writes configs and runs the demo's processes; stop() ends them all."""

    def __init__(self, workdir: Path, host: str, port: int, prefix: str, keepalive: int = 2):
        self.workdir, self.host, self.port, self.prefix, self.keepalive = workdir, host, port, prefix, keepalive
        self.procs: dict[str, Proc] = {}
        self.host_ms: float | None = None  # mobilenet96 here, measured before the first agent starts

    def _spawn(self, name: str, part: str, config: dict[str, Any]) -> Proc:
        path = self.workdir / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(config))
        check = subprocess.run([sys.executable, "-m", "lepton.cli", part, "--check-config", str(path)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise LeptonError(f"demo config for {name} refused: {check.stderr.strip() or check.stdout.strip()}")
        argv = [sys.executable, "-m", "lepton.cli", part, "--config", str(path)]
        proc = Proc(name, argv, self.workdir / f"{name}.log").start()
        self.procs[name] = proc
        return proc

    def start_coordinator(self) -> Proc:
        cfg = coordinator_config(self.workdir, self.host, self.port, self.prefix, self.keepalive)
        self.coordinator_db = Path(cfg["db"]["path"])
        return self._spawn("coordinator", "coordinator", cfg)

    def start_agent(self, spec: DeviceSpec) -> Proc:
        (self.workdir / spec.id).mkdir(parents=True, exist_ok=True)
        if self.host_ms is None:
            self.host_ms = host_invoke_ms()
            log.info("mobilenet96 takes %.3f ms here: slowdowns scaled by %.2f", self.host_ms,
                     REFERENCE_INVOKE_MS / self.host_ms)
        cfg = agent_config(spec, self.workdir, self.host, self.port, self.prefix, self.keepalive, self.host_ms)
        return self._spawn(spec.id, "agent", cfg)

    def kill(self, name: str) -> None:
        """SIGKILL: the device vanishes without a word; the broker's last will says it is gone."""
        self.procs[name].signal(signal.SIGKILL)
        log.info("killed %s", name)

    def dead(self) -> list[str]:
        """Processes that exited on their own (not killed by the demo)."""
        return [n for n, p in self.procs.items() if p.popen and p.popen.poll() not in (None, -signal.SIGKILL)]

    def stop(self) -> None:
        agents = [p for n, p in self.procs.items() if n != "coordinator"]
        for p in agents:
            p.signal(signal.SIGTERM)
        deadline = time.monotonic() + 12
        for p in agents:
            if p.popen:
                try:
                    p.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.popen.kill()
        if "coordinator" in self.procs:
            self.procs["coordinator"].stop()
