"""What the device reports every ``interval_s``: load, memory, temperature,
per-model invoke time (p50/p95 over a window), frames, outbox, link.

One ``collect()`` builds the Telemetry message; the telemetry thread
publishes it (QoS 0) and the Prometheus endpoint shows the same figures.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from typing import Any

import psutil

from lepton.agent.pipeline import percentiles
from lepton.agent.session import Outgoing
from lepton.protocol import encode
from lepton.protocol import messages as m

log = logging.getLogger(__name__)


def read_temperature() -> float | None:
    """The SoC temperature in degrees C where the kernel exposes one (Pi, Jetson: thermal zones)."""
    zones = sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp"))
    for path in zones:
        try:
            with open(path) as fh:
                value = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if -40000 < value < 150000:
            return value / 1000.0
    try:
        sensors = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    for entries in sensors.values():
        for entry in entries:
            if entry.current is not None and -40 < entry.current < 150:
                return float(entry.current)
    return None


class Collector:
    """Builds Telemetry from the running agent's parts."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.latest: m.Telemetry | None = None
        self.extra: dict[str, float] = {}
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement
        self._process = psutil.Process()

    def link(self) -> m.Link:
        """The link estimate (``links.Links``): measured figures where there are some, else the hints."""
        return self.agent.links.estimate()

    def downloads(self) -> dict[str, float]:
        """Share fetched of each model being downloaded."""
        fetcher = getattr(self.agent, "fetcher", None)
        progress = dict(fetcher.progress) if fetcher is not None else {}
        return {name: min(1.0, done / size) if size else 1.0 for name, (done, size) in progress.items()}

    def collect(self) -> m.Telemetry:
        agent = self.agent
        frames_in = frames_dropped = 0
        sources = {}
        for sid, source in agent.sources.items():
            stats = source.stats()
            frames_in += int(stats.get("frames_in", 0))
            frames_dropped += int(stats.get("frames_dropped", 0))
            sources[sid] = m.SourceHealth(
                connected=bool(stats.get("delivering", stats.get("connected", True))),
                frames_in=int(stats.get("frames_in", 0)),
                frames_dropped=int(stats.get("frames_dropped", 0)), reconnects=int(stats.get("reconnects", 0)),
                last_frame_s=stats.get("last_frame_s"), down_s=stats.get("down_s"))
        models = {}
        for name, window in list(agent.timings.items()):
            values = window.values()
            if values:
                p50, p95 = percentiles(values)
                models[name] = m.ModelTiming(p50_ms=p50, p95_ms=p95, count=len(values))
        box = agent.outbox.stats()
        memory = psutil.virtual_memory()
        v2 = agent.cfg.telemetry.version >= 2
        telemetry = (m.TelemetryV2 if v2 else m.Telemetry)(
            device=agent.cfg.device_id, ts=time.time(), load1=os.getloadavg()[0],
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_used_mb=(memory.total - memory.available) / 2**20, memory_total_mb=memory.total / 2**20,
            temperature_c=read_temperature(), models=models, frames_in=frames_in, frames_dropped=frames_dropped,
            results=sum(p.results.total for p in agent.pipelines.values()),
            outbox_depth=box["depth"], outbox_dropped=box["dropped"] + agent.delivery.lost_uncommitted, outbox_expired=box["expired"],
            offload_failed=sum(p.offload_failed for p in agent.pipelines.values()),
            link=self.link(), streams=agent.stream_rates(),
            downloads=self.downloads(), **({"sources": sources} if v2 else {}),
        )
        self.extra = {
            "rss_bytes": float(self._process.memory_info().rss),
            "outbox_bytes": float(box["bytes"]),
            "outbox_uncommitted": float(agent.delivery.uncommitted),
            "published": float(agent.delivery.published),
            "resent": float(agent.delivery.resent),
            "connected": 1.0 if agent.session.connected.is_set() else 0.0,
            "reconnects": float(max(0, agent.session.connects - 1)),
            "errors": float(sum(p.errors for p in agent.pipelines.values())),
            "offloaded": float(sum(p.offloaded for p in agent.pipelines.values())),
            "unserved": float(sum(p.unserved for p in agent.pipelines.values())),
            "offload_served": float(agent.offload_server.served if agent.offload_server else 0),
            "link_probes": float(agent.prober.probes if agent.prober else 0),
        }
        self.latest = telemetry
        return telemetry


class TelemetryLoop:
    """Publishes telemetry every ``interval_s`` on the device's telemetry topic (QoS 0), and a STATUS= line."""

    def __init__(self, collector: Collector, interval_s: float) -> None:
        self.collector, self.interval_s = collector, interval_s
        self._thread: threading.Thread | None = None

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._run, args=(stop,), name="telemetry", daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        agent = self.collector.agent
        topic = agent.topics.telemetry(agent.cfg.device_id)
        while not stop.wait(self.interval_s):
            try:
                telemetry = self.collector.collect()
                agent.session.publish(Outgoing(topic, encode(telemetry), 0))
                agent.announce_if_changed()  # a JPEG stream's payload size, once the frames tell it
                agent.notifier.status(agent.status_line())  # `systemctl status` shows it; no-op elsewhere
            except Exception:  # one bad reading must not end telemetry
                log.exception("telemetry failed")

    def join(self, timeout: float = 1.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
