"""The device daemon: ``Agent.start()`` is the list of init steps, ``stop()`` undoes them.

Placement (``reconcile.py``, ``fetch.py``, ``offload.py``, ``links.py``):
each valid Desired for this device goes to the reconciler, which fetches,
loads and switches models and routes (``switch``) and publishes what the
device runs (``publish_reported``); the offload client sends routed frames
to other devices, the offload server runs theirs here; the link estimate
goes out in telemetry.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

from lepton import __version__
from lepton.agent.config import AgentConfig, source_config
from lepton.agent.delivery import Delivery
from lepton.agent.inbound import Inbound
from lepton.agent.notify import Notifier, Watchdog
from lepton.agent.outbox import Outbox
from lepton.agent.pipeline import StreamPipeline, Window, tensor_bytes
from lepton.agent.placement import Placement, local_versions, make_fetcher
from lepton.agent.session import Outgoing, Session
from lepton.agent.telemetry import Collector, TelemetryLoop
from lepton.errors import ConfigError, ModelError
from lepton.protocol import Topics, encode
from lepton.protocol import messages as m

log = logging.getLogger(__name__)

# SIGTERM to exit: every stop step shares this one budget, so the agent exits within 10 s (the unit's
# TimeoutStopSec is 20 s) with room for the interpreter's own exit. Whatever the steps before took, the
# last ones keep (of what is left):
STOP_BUDGET_S = 8.0
LINK_HINTS = {"up_mbps", "down_mbps", "rtt_ms"}  # the [link] keys a birth carries (the rest are the agent's own settings)
KEEP_FOR_SESSION_S = 2.5  # the offline status: its PUBACK, then the session's thread
KEEP_FOR_FLUSH_S = 1.5  # delivery: commit what the pipelines gave, publish it, wait for PUBACKs
KEEP_FOR_PLACEMENT_S = 1.0  # offloaded inputs still out: their answers, or computed here
AFTER_PLACEMENT_S = KEEP_FOR_FLUSH_S + KEEP_FOR_SESSION_S
AFTER_PIPELINES_S = KEEP_FOR_PLACEMENT_S + AFTER_PLACEMENT_S
KEEP_FOR_PIPELINES_S = 1.0  # frames in hand: their invokes and results
AFTER_SOURCES_S = KEEP_FOR_PIPELINES_S + AFTER_PIPELINES_S


def open_registry(cfg: AgentConfig) -> Any:
    """The model registry the config names (the shipped zoo by default)."""
    from pathlib import Path

    from lepton.models.registry import Registry, default_registry

    keys = [Path(k) for k in cfg.models.trusted_keys]
    if not cfg.models.dir:
        return default_registry() if not keys else _zoo_registry(keys)
    root = Path(cfg.models.dir)
    if not root.is_dir():
        raise ConfigError(f"models.dir {root}: not a directory")
    return Registry(root, trusted_keys=keys or None)


def _zoo_registry(keys: list) -> Any:
    from lepton.models.registry import Registry, zoo_dir, zoo_public_key

    return Registry(zoo_dir(), trusted_keys=[zoo_public_key(), *keys])


def check_references(cfg: AgentConfig, registry: Any = None, fetcher: Any = None, verify: bool = False) -> None:
    """Every stream's model is here (registry or delivered cache) and fits its source; ConfigError naming the stream.

    *verify* (``--check-config``): a registry model's signature, size and sha256 are checked too, so a file
    that is missing or does not verify is named now rather than when the daemon starts (which checks it
    as it loads the model)."""
    registry = registry or open_registry(cfg)
    fetcher = fetcher or make_fetcher(cfg, registry)
    for index, source in enumerate(cfg.sources):
        if source.get("type") == "video" and not os.path.isfile(source.get("path", "")):
            raise ConfigError(f"sources[{index}].path: no such file {source.get('path')!r} "
                              f"(source {source.get('id')!r}, video)")
    for index, stream in enumerate(cfg.streams):
        found = local_versions(fetcher, stream.model, stream.version or None)
        try:
            # Nothing verified: the registry names what is missing; a copy that does not verify fails at load (exit 1).
            entry = found[0] if found else registry.get(stream.model, stream.version or None)
            if verify and not found:
                registry.verify(entry)
        except ModelError as exc:
            raise ConfigError(f"streams[{index}].model: {exc}") from None
        kind = entry.manifest.preprocess.kind
        source_type = source_config(cfg, stream.source).get("type")
        wants = "window" if source_type == "sensor" else "image"
        if kind != wants:
            raise ConfigError(f"streams[{index}]: model {stream.model!r} takes {kind} input but source "
                              f"{stream.source!r} ({source_type}) gives {wants}s")
        if kind == "window":
            _check_window(index, stream, entry.manifest.preprocess.window_spec, source_config(cfg, stream.source))
        if stream.offload_jpeg_quality and kind != "image":
            raise ConfigError(f"streams[{index}].offload_jpeg_quality: model {stream.model!r} takes {kind} input; "
                              "only image inputs can travel as JPEG")


def _check_window(index: int, stream: Any, spec: Any, source: dict) -> None:
    """A sensor's windows against the model's: other channels fail every window; another length is padded
    or trimmed to the model's, which it allows, but a model rarely means what it says on a padded window."""
    from lepton.agent.sources import validate_source_config

    typed = validate_source_config(source)
    if typed.channels != spec.channels:
        raise ConfigError(f"streams[{index}]: model {stream.model!r} takes windows of {spec.channels} channel(s) "
                          f"but source {stream.source!r} gives {typed.channels}")
    if typed.length != spec.length:
        log.warning("streams[%d]: model %r takes windows of %d samples; source %r gives %d, %s", index,
                    stream.model, spec.length, stream.source, typed.length,
                    "zero-padded to fit" if typed.length < spec.length else "only the newest kept")


class Agent:
    """Sources, models, pipelines, outbox, MQTT session, telemetry, systemd: one device."""

    def __init__(self, cfg: AgentConfig, environ: dict[str, str] | None = None,
                 halt: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.device = cfg.device_id
        self.topics = Topics(cfg.prefix)
        self.stop_event = threading.Event()
        self.halt = halt or threading.Event()  # set by a signal: start-up stops waiting for the broker
        self.notifier = Notifier(environ)
        self.registry: Any = None
        self.runners: dict[str, Any] = {}  # model name -> ModelRunner
        self.model_states: dict[str, m.ModelState] = {}
        self.timings: dict[str, Window] = {}
        self.sources: dict[str, Any] = {}
        self.pipelines: dict[str, StreamPipeline] = {}
        self.desired: m.Desired | None = None
        self._announced: dict[str, int] = {}  # stream -> payload bytes in the last birth
        self.on_desired: Callable[[m.Desired], None] = self._log_desired
        self.fetcher: Any = None
        self.links: Any = None
        self.reconciler: Any = None
        self.offload_client: Any = None
        self.offload_server: Any = None
        self.prober: Any = None
        self.placement: Any = None
        self.collector: Any = None  # telemetry figures (made by init_metrics when metrics are on, else init_telemetry)
        self.metrics: Any = None
        self.inbound_stop = threading.Event()  # set after in-flight offloads are answered, not with stop_event
        self.generation = 0  # the placement generation applied (none yet)
        self.started_at = 0.0
        self.outbox: Outbox | None = None
        self.session: Session | None = None
        self.delivery: Delivery | None = None
        self._steps: list[Callable[[], None]] = []  # undo steps, run in reverse by stop()
        self._stop_by = float("inf")  # monotonic deadline of stop(), once it runs

    # --- start: the daemon in one screen -----------------------------------------------
    def start(self) -> None:
        """Bring the device up; on failure, undo what was done and raise."""
        self.started_at = time.monotonic()
        try:
            self.init_models()
            self.init_outbox()
            self.init_metrics()
            self.init_sources()
            self.init_session()
            self.init_delivery()
            self.init_placement()
            self.init_pipelines()
            self.start_sources()
            self.init_inbound()
            self.init_telemetry()
            self.init_watchdog()
            self.report_ready()
        except BaseException:
            self.stop()
            raise

    def init_models(self) -> None:
        self.registry = open_registry(self.cfg)
        self.fetcher = make_fetcher(self.cfg, self.registry, on_download=self._downloaded)
        check_references(self.cfg, self.registry, self.fetcher)
        for stream in self.cfg.streams:
            if stream.model not in self.runners:
                self.load_model(stream.model, stream.version or None)

    def init_outbox(self) -> None:
        box = self.cfg.outbox
        self.outbox = Outbox(box.path, box.max_rows, box.max_bytes)
        self._steps.append(self._close_outbox)
        stats = self.outbox.stats()
        log.info("outbox %s: %d result(s) waiting for acks, next seq %d", box.path, stats["depth"], stats["next_seq"])

    def init_sources(self) -> None:
        from lepton.agent.sources import build_source

        used = {s.source for s in self.cfg.streams}
        for entry in self.cfg.sources:
            if entry["id"] in used:
                self.sources[entry["id"]] = build_source(entry)

    def init_session(self) -> None:
        will = Outgoing(self.topics.status(self.device),
                        encode(m.Status(device=self.device, state="offline", ts=time.time(), reason="last will",
                                        agent_version=__version__)), 1, True)
        self.session = Session(self.cfg.broker, self.cfg.client_id, self.topics, self.device, will,
                               self.on_connect_messages, self.cfg.telemetry.window_s)
        self.session.start()
        self._steps.append(self._close_session)

    def init_delivery(self) -> None:
        self.delivery = Delivery(self.outbox, self.session, self.cfg.outbox)
        self.delivery.start()
        self._steps.append(self._stop_delivery)

    def init_placement(self) -> None:
        self.placement = Placement(self)
        p = self.placement
        self.links, self.offload_client, self.offload_server = p.links, p.offload_client, p.offload_server
        self.reconciler, self.prober = p.reconciler, p.prober
        self.on_desired = self.reconciler.submit
        p.start()
        self._steps.append(self._stop_placement)

    def init_pipelines(self) -> None:
        rt = self.cfg.runtime
        for stream in self.cfg.streams:
            self.pipelines[stream.id] = StreamPipeline(
                stream, self.device, self.topics, self.sources[stream.source], self.runners[stream.model],
                self.delivery.submit, self.timing, rt.workers, rt.stall_s, self.cfg.telemetry.window_s,
                offload=self.offload_client)
        for pipeline in self.pipelines.values():
            pipeline.start(self.stop_event)
        self._steps.append(self._stop_pipelines)

    def start_sources(self) -> None:
        for source in self.sources.values():
            source.start(self.stop_event)
        self._steps.append(self._close_sources)

    def init_inbound(self) -> None:
        self.inbound = Inbound(self)
        self.inbound.start(self.inbound_stop)

    def init_telemetry(self) -> None:
        self.collector = self.collector or Collector(self)
        if self.metrics is not None:  # figures for the first scrape, before the loop's first round
            self.collector.collect()
        self.telemetry = TelemetryLoop(self.collector, self.cfg.telemetry.interval_s)
        self.telemetry.start(self.stop_event)
        self._steps.append(lambda: self.telemetry.join(min(1.0, self._left(AFTER_PIPELINES_S))))

    def init_metrics(self) -> None:
        """Bind the metrics port before the broker sees this device: a port taken stops the start (exit 2)
        before the device has joined the fleet. Scrapes find figures once telemetry has some."""
        if not self.cfg.metrics.port:
            return
        from lepton.agent.metrics import MetricsServer

        self.collector = Collector(self)
        self.metrics = MetricsServer(self.collector, self.cfg.metrics.port, self.cfg.metrics.bind)
        self.metrics.start()
        self._steps.append(self.metrics.stop)

    def init_watchdog(self) -> None:
        self.watchdog = Watchdog(self.notifier, self.health)
        self.watchdog.start(self.stop_event)
        self._steps.append(lambda: self.watchdog.join(min(1.0, self._left(AFTER_PIPELINES_S))))

    def report_ready(self) -> None:
        """READY=1 once the broker session is up (or, without a broker, after ready_timeout_s); a stop asked
        for meanwhile (SIGTERM) ends the wait at once."""
        deadline = time.monotonic() + self.cfg.broker.ready_timeout_s
        while not self.session.wait_connected(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.halt.is_set():
                log.info("stop asked for while waiting for the broker (%s)", self.session.last_error or "connecting")
                return
            if time.monotonic() >= deadline:
                log.warning("no broker session after %.0f s (%s): running; results wait in the outbox",
                            self.cfg.broker.ready_timeout_s, self.session.last_error or "connecting")
                break
        self.notifier.ready(self.status_line())
        log.info("agent %s up in %.1f s: %d stream(s), models %s", self.device,
                 time.monotonic() - self.started_at, len(self.pipelines), ", ".join(self.runners) or "none")

    # --- stop: the init steps undone ------------------------------------------------------
    def stop(self) -> None:
        """Stop sources, finish in-flight inferences, flush the outbox, say offline; within STOP_BUDGET_S
        (each step gets what the ones before left, less what the last ones keep). Idempotent."""
        self._stop_by = min(self._stop_by, time.monotonic() + STOP_BUDGET_S)
        self.notifier.stopping("stopping: finishing in-flight results")
        self.stop_event.set()
        while self._steps:
            step = self._steps.pop()
            try:
                step()
            except Exception:
                log.exception("while stopping: %s failed", getattr(step, "__name__", step))
        self.notifier.close()

    def _left(self, keep: float = 0.0) -> float:
        """Seconds of the stop budget this step may take, keeping *keep* for the steps after it."""
        return max(0.0, self._stop_by - keep - time.monotonic())

    def _stop_pipelines(self) -> None:
        # One deadline for all: a stuck invoke in one stream must not take the time of the others' joins.
        for pipeline in self.pipelines.values():
            if not pipeline.join(timeout=self._left(AFTER_PIPELINES_S)):
                log.warning("stream %s: a frame was still being processed at shutdown", pipeline.cfg.id)

    def _stop_placement(self) -> None:
        self.placement.stop(timeout=self._left(AFTER_PLACEMENT_S))

    def _stop_delivery(self) -> None:
        self.delivery.stop(timeout=self._left(KEEP_FOR_SESSION_S))

    def _close_sources(self) -> None:
        # stop_event already told every source to stop; one deadline for all their joins, so cameras blocked in
        # a read (up to their timeout_s) cannot take the time the in-flight results need.
        for source in self.sources.values():
            source.close(timeout=self._left(AFTER_SOURCES_S))

    def _close_outbox(self) -> None:
        # the last step: what is left of the budget (at least a moment for an uncontended checkpoint)
        self.outbox.close(timeout=max(0.2, self._left()))

    def _close_session(self) -> None:
        offline = m.Status(device=self.device, state="offline", ts=time.time(), reason="stopped",
                           agent_version=__version__)
        # a quarter second kept for the disconnect and the interpreter's exit
        self.session.close([Outgoing(self.topics.status(self.device), encode(offline), 1, True)],
                           timeout=self._left(0.25))

    # --- models and placement -------------------------------------------------------------
    def load_model(self, name: str, version: str | None = None) -> Any:
        """Load and warm up the newest local version of *name* that verifies and loads (or *version*); ModelError if none."""
        from lepton.agent.reconcile import load_runner

        failure: ModelError | None = None
        for entry in local_versions(self.fetcher, name, version):
            try:
                runner, invoke_ms = load_runner(entry, self.cfg.runtime)
                break
            except ModelError as exc:  # e.g. a delivered version that verifies but cannot load: try the one before
                log.warning("%s; trying an older version", exc)
                self.fetcher.discard(entry)
                failure = failure or exc
        else:
            if failure is not None:
                raise failure
            entry = self.registry.get(name, version)
            self.registry.verify(entry)  # raises the reason nothing verified
            raise ModelError(f"model {name}: no local version verifies")
        self.runners[name] = runner
        self.model_states[name] = m.ModelState(state="loaded", version=runner.version, sha256=runner.sha256,
                                               invoke_ms=invoke_ms)
        self.timing(name)
        log.info("model %s %s loaded (%s, invoke %.2f ms)", name, runner.version, entry.path, invoke_ms)
        return runner

    def swap_stream_model(self, stream_id: str, runner: Any) -> None:
        """Serve *stream_id* with *runner* (already loaded and warmed up) from its next frame."""
        self.runners.setdefault(runner.name, runner)
        self.pipelines[stream_id].swap_model(runner)

    def switch(self, runners: dict[str, Any], routes: dict[str, list[m.Route]]) -> None:
        """Give every own stream its runner here (or None) and its routes (None: not routed, run here)."""
        for stream in self.cfg.streams:
            pipeline = self.pipelines.get(stream.id)
            if pipeline is None:
                continue
            given = routes.get(stream.id)
            pipeline.set_plan(runners.get(stream.model),
                              None if given is None else [(r.device, r.share) for r in given])

    def _downloaded(self, nbytes: int, seconds: float) -> None:
        if self.links is not None:
            self.links.add_download(nbytes, seconds)

    def apply_desired(self, desired: m.Desired) -> None:
        """Called by the inbound thread with each valid Desired for this device."""
        self.desired = desired
        self.on_desired(desired)

    def _log_desired(self, desired: m.Desired) -> None:
        log.info("desired placement generation %d: models %s (not applied by this agent version)",
                 desired.generation, ", ".join(r.name for r in desired.models) or "none")

    def publish_reported(self) -> None:
        """Publish what this device runs (retained)."""
        self.session.publish(Outgoing(self.topics.reported(self.device), encode(self.reported()), 1, True))

    # --- what the device says about itself ---------------------------------------------------
    def timing(self, model: str) -> Window:
        """The invoke-time window of *model* (created on first use)."""
        window = self.timings.get(model)
        if window is None:
            window = self.timings.setdefault(model, Window(self.cfg.telemetry.window_s))
        return window

    def reset_timing(self, model: str) -> None:
        """Start *model*'s invoke-time window afresh (its times before a swap describe another file)."""
        self.timings[model] = Window(self.cfg.telemetry.window_s)

    def birth(self) -> m.Status:
        """The retained ``online`` status with capabilities and streams."""
        import psutil

        from lepton.models.runtime import runtime_info

        runtime, version = runtime_info()
        if self.cfg.runtime.slowdown > 1:  # an emulated slower device is another kind of device to the planner
            version = f"{version} (slowdown x{self.cfg.runtime.slowdown:g})"
        cpus = os.cpu_count() or 1
        caps = m.Capabilities(
            cpu_count=cpus, memory_mb=psutil.virtual_memory().total / 2**20, arch=platform.machine() or "unknown",
            runtime=runtime, runtime_version=version, threads=self.cfg.runtime.threads,
            cpu_share=self.cfg.runtime.cpu_share or float(cpus), models=sorted(self.runners),
            link={k: v for k, v in self.cfg.link.model_dump(include=LINK_HINTS).items() if v is not None})
        streams = [self.stream_info(s) for s in self.cfg.streams]
        self._announced = {s.id: s.payload_bytes for s in streams}
        return m.Status(device=self.device, state="online", ts=time.time(), agent_version=__version__,
                        capabilities=caps, streams=streams)

    def announce_if_changed(self) -> bool:
        """Publish the birth again when a JPEG-offloading stream's payload size, learnt from the frames sent,
        moved more than 25% from the one announced: the planner prices transfers with it."""
        if self.session is None or not self.session.connected.is_set():
            return False
        for stream in self.cfg.streams:
            pipeline = self.pipelines.get(stream.id)
            announced = self._announced.get(stream.id)
            if not stream.offload_jpeg_quality or pipeline is None or not announced:
                continue
            size = pipeline.payload_bytes()
            if abs(size - announced) > 0.25 * announced:
                log.info("stream %s: offloaded frames take %d bytes as JPEG (announced %d): birth published again",
                         stream.id, size, announced)
                self.session.publish(Outgoing(self.topics.status(self.device), encode(self.birth()), 1, True))
                return True
        return False

    def stream_rates(self) -> dict[str, float]:
        """Each running stream's demand (Hz): the rate its source delivers frames, served or not. (Results per
        second would read 0 for a stream nobody serves, and the planner would never place it again.)"""
        return {sid: hz for sid, pipeline in list(self.pipelines.items())
                if (hz := _source_rate(pipeline)) is not None}  # None: not measured yet

    def stream_info(self, stream) -> m.StreamInfo:
        pipeline = self.pipelines.get(stream.id)
        rate = _source_rate(pipeline) if pipeline else None
        if rate is None:  # not measured yet: the source's configured rate (a sensor's fps 0: fs / length)
            from lepton.agent.sources import validate_source_config

            typed = validate_source_config(source_config(self.cfg, stream.source))
            rate = float(getattr(typed, "window_rate", 0.0) or getattr(typed, "fps", 0.0) or 0.0) or 10.0
        size = pipeline.payload_bytes() if pipeline else tensor_bytes(self.runners[stream.model].input)
        return m.StreamInfo(id=stream.id, model=stream.model, rate_hz=rate, payload_bytes=size,
                            slo_ms=stream.slo_ms)

    def reported(self) -> m.Reported:
        return m.Reported(device=self.device, generation=self.generation, ts=time.time(), models=self.model_states)

    def on_connect_messages(self) -> list[Outgoing]:
        """Published first on every connection: birth, then what the device runs."""
        status = self.topics.status(self.device)
        return [Outgoing(status, encode(self.birth()), 1, True),
                Outgoing(self.topics.reported(self.device), encode(self.reported()), 1, True)]

    def health(self) -> tuple[bool, str]:
        """(healthy, why not): every pipeline makes progress."""
        now = time.monotonic()
        for sid, pipeline in self.pipelines.items():
            if not pipeline.healthy(now):
                return False, f"stream {sid} is stuck (busy on one frame over {pipeline.stall_s:.0f} s or a worker died)"
        return True, ""

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        rate = sum(p.results.rate() for p in self.pipelines.values())
        link = "broker connected" if self.session and self.session.connected.is_set() else \
            f"broker unreachable ({self.session.last_error or 'connecting'})" if self.session else "starting"
        depth = self.outbox.depth if self.outbox else 0
        waiting = self.delivery.uncommitted if self.delivery else 0
        refused = f" (refuses writes: {waiting} result(s) wait in memory; is the disk full?)" if waiting else ""
        return f"{len(self.pipelines)} stream(s), {rate:.1f} results/s, outbox {depth}{refused}, {link}"


def _source_rate(pipeline: Any) -> float | None:
    """Frames per second the pipeline's source delivers (None: not measured yet, or a source that cannot say)."""
    rate = getattr(pipeline.source, "rate", None)
    return rate() if rate is not None else None


def run(cfg: AgentConfig, stop: threading.Event) -> int:
    """Run an agent until *stop* is set; the exit code."""
    agent = Agent(cfg, halt=stop)
    agent.start()
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    started = time.monotonic()
    agent.stop()
    log.info("stopped in %.1f s", time.monotonic() - started)
    return 0
