"""The coordinator daemon: ``start()`` is the list of what it runs, ``stop()`` undoes it.

    coord = Coordinator(load_config("coordinator.toml"))
    coord.start()          # returns once everything runs (the broker may still be connecting)
    ...
    coord.stop()

``run()`` is what ``lepton coordinator --config FILE`` does: start, tell
systemd READY once the broker accepted the connection (until then STATUS says
what it waits for and why), ping its watchdog while ingest and the rebalancer
live (the agent's sd_notify helper), reload the model registry on SIGHUP
(``systemctl reload``), stop on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time

from lepton.agent.notify import Notifier, Watchdog
from lepton.coordinator.bus import Bus
from lepton.coordinator.catalog import Catalog
from lepton.coordinator.config import CoordinatorConfig, check_files
from lepton.coordinator.db import open_db
from lepton.coordinator.http import ModelServer
from lepton.coordinator.ingest import Ingest
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.rebalance import Rebalancer, planner_params
from lepton.coordinator.registry import FleetRegistry
from lepton.coordinator.retention import Retention
from lepton.errors import ConfigError, naming_config, storage_error
from lepton.protocol import Topics

log = logging.getLogger(__name__)


class Coordinator:
    """Fleet registry, ingest, rebalancer, model HTTP server and metrics, around one MQTT connection."""

    def __init__(self, config: CoordinatorConfig, config_path: str | None = None):
        self.cfg = config
        self.config_path = config_path  # named in what start-up finds wrong with the files the config names
        self.topics = Topics(config.prefix)
        self.stopping = threading.Event()
        self.metrics = Metrics()
        self.http: ModelServer | None = None
        self.bus: Bus | None = None
        self.ingest: Ingest | None = None
        self.rebalancer: Rebalancer | None = None
        self.retention: Retention | None = None
        self._metrics_server = None
        self.base_url = ""
        self.notifier = Notifier()

    def start(self) -> "Coordinator":
        """Run each init step in order; a failing step undoes the ones before it."""
        # Ports are bound before the broker sees this coordinator: one taken stops the start before it acts.
        steps = (self._check_files, self._load_models, self._start_http, self._start_metrics, self._record_start,
                 self._start_ingest, self._start_rebalancer, self._start_retention, self._connect)
        try:
            for step in steps:
                step()
        except BaseException:
            self.stop()
            raise
        log.info("coordinator started: connecting to broker %s:%s, db %s, models at %s", self.cfg.broker.host,
                 self.cfg.broker.port, self.cfg.db.path, self.base_url)
        return self

    def stop(self) -> None:
        """Commit and acknowledge what arrived, say offline, close everything. Safe to call twice."""
        self.stopping.set()
        self.notifier.stopping()
        if self.ingest:
            self.ingest.join()
        if self.rebalancer:
            self.rebalancer.join()
        if self.retention:
            self.retention.join()
        if self.bus:
            self.bus.stop()
            self.bus = None
        if self.http:
            self.http.stop()
            self.http = None
        if self._metrics_server:
            self._metrics_server.shutdown()
            self._metrics_server = None

    # --- init steps ------------------------------------------------------------
    def _check_files(self) -> None:
        """What --check-config checks, before anything is created: a missing file fails here, naming the config
        file (when there is one) and the key."""
        if self.config_path is None:
            check_files(self.cfg)
            return
        with naming_config(self.config_path):
            check_files(self.cfg)

    def _load_models(self) -> None:
        self.catalog = Catalog(self.cfg.models.dir, self.cfg.models.trusted_keys)
        self.catalog.reload()

    def _start_http(self) -> None:
        h = self.cfg.http
        if h.enabled:
            self.http = ModelServer(self.catalog, h.bind, h.port, h.tls_cert, h.tls_key).start()
        elif not h.base_url:
            raise ConfigError("http: disabled and no base_url: devices would have nowhere to fetch models from")
        self.base_url = h.base_url or self.http.url

    def _record_start(self) -> None:
        """Migrate the database; note the known models and planner params so snapshots replay exactly."""
        db = open_db(self.cfg.db.path, self.cfg.db.synchronous)
        try:
            self._note_start(db)
        except sqlite3.DatabaseError as exc:  # e.g. a full disk: one line naming the file, not a traceback
            raise storage_error(f"coordinator database {self.cfg.db.path}: cannot record the start", self.cfg.db.path,
                                exc) from None
        finally:
            db.close()

    def _note_start(self, db) -> None:
        reg = FleetRegistry(db)
        reg.set_models([c.row() for c in self.catalog.all()])
        with db.atomic():
            reg.set_meta("planner", planner_params(self.cfg.planner))
            reg.set_meta("defaults", {"default_compute_ms": self.cfg.planner.default_compute_ms,
                                      "exclude_failed_s": self.cfg.planner.exclude_failed_s})
            reg.set_meta("http", self.base_url)
            reg.set_meta("started_at", time.time())
            reg.event("coordinator-start", detail=f"models at {self.base_url}, {len(self.catalog.all())} model versions")

    def _start_ingest(self) -> None:
        self.ingest = Ingest(self.cfg.db.path, self.topics, self._sink, self._changes, self.cfg.db.synchronous,
                             self.cfg.db.batch_max, self.metrics)
        self.ingest.start(self.stopping)

    def _start_rebalancer(self) -> None:
        self.rebalancer = Rebalancer(self.cfg.db.path, self.topics, self._sink, self.cfg.planner,
                                     self.cfg.liveness.stale_after_s, self.base_url, self.cfg.db.synchronous, self.metrics)
        self.rebalancer.start(self.stopping)

    def _start_retention(self) -> None:
        d = self.cfg.db
        self.retention = Retention(d.path, d.keep_results_days, d.prune_every_s, d.synchronous,
                                   on_pruned=self.metrics.results_pruned.inc)
        self.retention.start(self.stopping)

    def _connect(self) -> None:
        self.bus = Bus(self.cfg.broker, self.topics, self.ingest.submit, http_url=self.base_url)
        self.bus.on_connected = self.rebalancer.republish
        self.rebalancer.bus_connected = self.bus.connected.is_set
        self.rebalancer.ingest_ok = lambda: not self.ingest.failing
        self.bus.start()

    def _start_metrics(self) -> None:
        if self.cfg.metrics.port:
            self._metrics_server = self.metrics.serve(self.cfg.metrics.port, self.cfg.metrics.bind)

    # --- glue -------------------------------------------------------------------------
    @property
    def _sink(self):
        """Ingest and the rebalancer publish through the bus, which exists only after _connect."""
        return _LateBus(self)

    def _changes(self, changes) -> None:
        if self.rebalancer:
            self.rebalancer.notify(changes)

    def healthy(self) -> tuple[bool, str]:
        """Whether the threads that matter still run (the systemd watchdog is pinged only then)."""
        for name, part in (("ingest", self.ingest), ("rebalancer", self.rebalancer)):
            thread = part._thread if part else None
            if thread is None or not thread.is_alive():
                return False, f"the {name} thread is not running"
        return True, ""

    def reload_models(self) -> bool:
        """Read the model registry again (SIGHUP, ``systemctl reload``): new versions are offered and placed
        at once, without a restart. A registry that cannot be read keeps what was offered; False then."""
        offered = self.catalog.all()
        try:
            found = self.catalog.reload()
        except ConfigError as exc:
            log.error("model registry not reloaded, still offering %d model versions: %s", len(offered), exc)
            return False
        except Exception:  # whatever it is, the coordinator goes on with what it offered
            log.exception("model registry not reloaded, still offering %d model versions", len(offered))
            return False
        try:
            db = open_db(self.cfg.db.path, self.cfg.db.synchronous)
            try:
                reg = FleetRegistry(db)
                with db.atomic():
                    reg.set_models([c.row() for c in found])
                    reg.event("models-reloaded", detail=f"{len(found)} model versions at {self.base_url}")
            finally:
                db.close()
        except Exception:  # a reload must never stop the coordinator: serve what the database still says
            log.exception("model registry reloaded but not recorded; still planning with the versions recorded before")
            for model in offered:
                self.catalog.add(model)
            return False
        if self.rebalancer:
            self.rebalancer.request("models reloaded")
        return True

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; SIGHUP reloads the model registry. The exit status for the CLI."""
        received: list[str] = []

        def on_stop(signum, _frame) -> None:
            received.append(signal.Signals(signum).name)
            self.stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        reload = threading.Event()
        signal.signal(signal.SIGHUP, lambda *_: reload.set())  # served by the loop below, within a second
        self.start()
        watchdog = Watchdog(self.notifier, self.healthy)
        ready, said = False, ""
        while True:
            # READY=1 only once the broker accepted us; STATUS= follows the connection from then on.
            status = self._status_line()
            if not ready and self.bus.connected.is_set():
                self.notifier.ready(status)
                watchdog.start(self.stopping)
                ready, said = True, status
            elif status != said and (ready or self.bus.reason):
                self.notifier.status(status)
                said = status
            self.metrics.ingest_queue.set(self.ingest.depth())
            if reload.is_set():
                reload.clear()
                self.reload_models()
            if self.stopping.wait(1.0 if ready else 0.1):
                break
        started = time.monotonic()
        log.info("received %s: stopping (committing and acknowledging what arrived)", received[0] if received else "stop")
        self.stop()
        watchdog.join()
        self.notifier.close()
        log.info("stopped in %.1f s", time.monotonic() - started)
        return 0

    def _status_line(self) -> str:
        """What ``systemctl status`` shows: running, or what the coordinator waits for and why."""
        if self.bus.connected.is_set():
            return f"coordinator running, models at {self.base_url}"
        where = f"{self.cfg.broker.host}:{self.cfg.broker.port}"
        return f"waiting for broker {where}: {self.bus.reason or 'connecting'}"


class _LateBus:
    """Forwards to the coordinator's bus once it exists; before that nothing can be sent anyway."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def puback(self, mid: int, qos: int, conn: int) -> None:
        if self.c.bus:
            self.c.bus.puback(mid, qos, conn)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        if self.c.bus:
            self.c.bus.publish(topic, payload, qos, retain)
