"""Prometheus metrics of the coordinator, on a registry of its own.

A private ``CollectorRegistry`` keeps two coordinators in one process (tests,
the demo) from colliding on the global one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lepton.metrics_http import serve_metrics


class Metrics:
    """The counters ingest and the rebalancer update."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.results_stored = Counter("lepton_results_stored", "Results committed (new)", registry=r)
        self.results_duplicate = Counter("lepton_results_duplicate", "Results received again and ignored", registry=r)
        self.results_pruned = Counter("lepton_results_pruned", "Results deleted by db.keep_results_days", registry=r)
        self.results_held = Gauge("lepton_results_held", "Results received above a gap in their device's seqs, "
                                  "held until it fills (stored in seq order)", registry=r)
        self.invalid = Counter("lepton_invalid_payloads", "Payloads refused by validation", ["kind"], registry=r)
        self.batch_seconds = Histogram(
            "lepton_ingest_batch_seconds", "Time to commit one ingest batch", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.ingest_queue = Gauge("lepton_ingest_queue", "Messages waiting for the ingest thread", registry=r)
        self.plans = Counter("lepton_plans", "Plans computed", ["trigger"], registry=r)
        self.plan_seconds = Histogram("lepton_plan_seconds", "Planner solve time", registry=r,
                                      buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30))
        self.placements_published = Counter("lepton_placements_published", "Desired placements published", registry=r)
        self.devices = Gauge("lepton_devices", "Devices by liveness", ["liveness"], registry=r)
        self.unserved = Gauge("lepton_unserved_streams", "Streams with an unserved share in the last plan", registry=r)

    def serve(self, port: int, bind: str = "127.0.0.1"):
        """Expose /metrics on *bind*:*port*; returns the server (shut it down on stop)."""
        return serve_metrics(self.registry, port, bind)
