"""Optional Prometheus endpoint with the same figures as telemetry.

``[metrics] port`` > 0 serves ``/metrics`` on ``bind`` (127.0.0.1 by
default). The figures are those of the latest telemetry message (refreshed
every ``telemetry.interval_s``), plus the process RSS.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


# Figures beyond the telemetry message: (kind, help) by name.
EXTRA = {
    "rss_bytes": ("gauge", "resident memory of the agent process"),
    "outbox_bytes": ("gauge", "payload bytes held in the outbox"),
    "outbox_uncommitted": ("gauge", "results waiting in memory because the outbox refuses writes (a full disk)"),
    "published": ("counter", "results published to the broker, first sends and re-sends"),
    "resent": ("counter", "results published again (no ack came, or after a reconnect)"),
    "connected": ("gauge", "1 while connected to the broker"),
    "reconnects": ("counter", "connections to the broker after the first"),
    "errors": ("counter", "frames that failed in a pipeline"),
    "offloaded": ("counter", "results computed on another device"),
    "unserved": ("counter", "frames skipped: routed nowhere and the model not held here"),
    "offload_served": ("counter", "inputs from other devices run here"),
    "link_probes": ("counter", "link probes sent to measure the uplink"),
}


class _TelemetryCollector:
    """A prometheus-client collector that reads the agent's latest telemetry at scrape time."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily

        t = self.collector.latest
        if t is None:
            return
        device = t.device

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"lepton_agent_{name}", doc, labels=["device"])
            if value is not None:
                g.add_metric([device], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"lepton_agent_{name}", doc, labels=["device"])
            c.add_metric([device], value)
            return c

        yield gauge("load1", "1-minute load average", t.load1)
        yield gauge("cpu_percent", "CPU use (%)", t.cpu_percent)
        yield gauge("memory_used_bytes", "memory in use", t.memory_used_mb * 2**20)
        yield gauge("memory_total_bytes", "memory installed", t.memory_total_mb * 2**20)
        yield gauge("temperature_celsius", "SoC temperature", t.temperature_c)
        yield counter("frames_in", "frames captured", t.frames_in)
        yield counter("frames_dropped", "frames replaced before a worker took them", t.frames_dropped)
        yield counter("results", "results produced", t.results)
        yield gauge("outbox_depth", "results held until the coordinator acknowledges them", t.outbox_depth)
        yield counter("outbox_dropped", "results dropped because the outbox was full", t.outbox_dropped)
        yield counter("outbox_expired", "results expired past their deadline, never sent", t.outbox_expired)
        yield counter("offload_failed", "frames neither computed on another device nor here", t.offload_failed)
        link = t.link
        yield gauge("link_rtt_seconds", "round-trip time to the broker", None if link.rtt_ms is None else link.rtt_ms / 1000)
        yield gauge("link_up_bits_per_second", "measured (else configured) uplink",
                    None if link.up_mbps is None else link.up_mbps * 1e6)
        yield gauge("link_down_bits_per_second", "measured (else configured) downlink",
                    None if link.down_mbps is None else link.down_mbps * 1e6)
        for name, value in self.collector.extra.items():
            kind, doc = EXTRA.get(name, ("gauge", name.replace("_", " ")))
            yield (counter if kind == "counter" else gauge)(name, doc, value)
        yield from _per_model_and_stream(t)


def _per_model_and_stream(t: Any) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    for metric, doc, attr in (("invoke_p50_seconds", "median invoke time over the window", "p50_ms"),
                              ("invoke_p95_seconds", "95th percentile invoke time over the window", "p95_ms")):
        g = GaugeMetricFamily(f"lepton_agent_{metric}", doc, labels=["device", "model"])
        for model, timing in t.models.items():
            g.add_metric([t.device, model], getattr(timing, attr) / 1000)
        yield g
    g = GaugeMetricFamily("lepton_agent_stream_rate_hz", "frames per second each stream is asked to serve (its source's rate)", labels=["device", "stream"])
    for stream, rate in t.streams.items():
        g.add_metric([t.device, stream], rate)
    yield g
    g = GaugeMetricFamily("lepton_agent_download_ratio", "share fetched of each model being downloaded",
                          labels=["device", "model"])
    for model, share in t.downloads.items():
        g.add_metric([t.device, model], share)
    yield g


class MetricsServer:
    """The /metrics HTTP endpoint (prometheus-client's own server, on a private registry)."""

    def __init__(self, collector: Any, port: int, bind: str = "127.0.0.1") -> None:
        self.collector, self.port, self.bind = collector, port, bind
        self._server = None

    def start(self) -> None:
        from prometheus_client import CollectorRegistry

        from lepton.metrics_http import serve_metrics

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_TelemetryCollector(self.collector))
        self._server = serve_metrics(registry, self.port, self.bind)
        log.info("Prometheus metrics on http://%s:%d/metrics", self.bind, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
