"""The placement layer of one agent, wired together: delivery, reconciliation, offload, links.

``Placement(agent)`` builds, after the MQTT session exists:

- ``links``: the link estimate telemetry reports (``links.Links``) and its probe;
- ``offload_client``: sends routed frames to other devices, matches replies;
- ``offload_server``: runs other devices' frames on the models loaded here;
- ``reconciler``: applies each Desired (the agent's ``on_desired``).

``stop()`` runs after the pipelines stopped: inputs still out on other
devices get up to ``DRAIN_S`` to be answered (the inbound thread keeps
running meanwhile), then unanswered ones are computed here where the model
is held, and only then do delivery and the session stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DRAIN_S = 2.0


def make_fetcher(cfg: Any, registry: Any, on_download: Callable[[int, float], None] | None = None) -> Any:
    """The model delivery client: the configured registry first, then the cache of delivered models."""
    from lepton.agent.fetch import Fetcher

    models = cfg.models
    return Fetcher(models.cache_dir, [Path(k) for k in models.trusted_keys], local=[registry],
                   timeout_s=models.download_timeout_s, attempts=models.download_attempts,
                   ca_file=models.http_ca or cfg.broker.tls_ca, on_download=on_download,
                   ca_key="models.http_ca" if models.http_ca else "broker.tls_ca")  # the key the user wrote


def local_versions(fetcher: Any, name: str, version: str | None) -> list[Any]:
    """Verified local entries of *name* (that *version* only, if given), newest first."""
    from packaging.version import InvalidVersion, Version

    entries = fetcher.newest_local(name)
    if version:
        try:
            wanted = Version(version)
        except InvalidVersion:
            return [e for e in entries if e.version == version]
        entries = [e for e in entries if e.manifest.parsed_version == wanted]
    return entries


class Placement:
    """Links, offload (both ways) and reconciliation for one agent."""

    def __init__(self, agent: Any) -> None:
        from lepton.agent.links import Links, Prober
        from lepton.agent.offload import OffloadClient, OffloadServer
        from lepton.agent.reconcile import Reconciler

        self.agent = agent
        cfg, session = agent.cfg, agent.session
        self.links = Links(cfg.link, session.link, cfg.link.measure, window_s=cfg.link.window_s)
        self.offload_client = OffloadClient(agent.device, agent.topics, session.publish, cfg.offload, self.links)
        self.prober = Prober(self.links, self.send_probe, session.link.ack_time, cfg.link.probe_interval_s,
                             cfg.link.probe_bytes)
        self.offload_server = OffloadServer(agent.device, agent.topics, session.publish, self.runner_for,
                                            agent.timing, cfg.runtime.workers, cfg.offload.serve_queue,
                                            self.prober.echo)
        self.reconciler = Reconciler(agent, agent.fetcher)

    def runner_for(self, model: str) -> Any | None:
        """The Runner loaded here for *model* (read at each request: placement replaces the dict)."""
        return self.agent.runners.get(model)

    def start(self) -> None:
        agent = self.agent
        self.offload_client.start(agent.inbound_stop, agent.stop_event)  # its timeouts run until inbound stops
        self.offload_server.start(agent.stop_event)
        self.reconciler.start(agent.stop_event)
        if agent.cfg.link.measure:
            self.prober.start(agent.stop_event)

    def stop(self, timeout: float = 2 * DRAIN_S) -> None:
        """After the pipelines: let answers arrive, fall back for the rest, then stop the threads; within
        *timeout* in all (answers get up to half of it, the fallbacks computed here the rest)."""
        deadline = time.monotonic() + timeout

        def left(most: float) -> float:
            return max(0.0, min(most, deadline - time.monotonic()))

        unanswered = self.offload_client.drain(left(min(DRAIN_S, timeout / 2)))
        if unanswered:
            log.warning("%d offloaded input(s) unanswered at shutdown: computed here where the model is held",
                        unanswered)
        self.agent.inbound_stop.set()
        self.offload_client.join(left(timeout))
        self.reconciler.join(left(2.0))
        self.offload_server.join(left(1.0))
        self.prober.join(left(0.5))

    def downloaded(self, nbytes: int, seconds: float) -> None:
        self.links.add_download(nbytes, seconds)

    def send_probe(self, request: int, nbytes: int, echo: bool) -> tuple[float, Any] | None:
        """Publish a link probe: to this device itself (*echo*, its offload topic) or to its probe sink.

        Returns (monotonic send time, PUBACK key), None when it was not sent.
        """
        from lepton.agent.links import PROBE_MODEL, PROBE_STREAM
        from lepton.agent.session import Outgoing
        from lepton.protocol.offload import OffloadHeader, encode_frame

        agent = self.agent
        if echo:
            header = OffloadHeader(origin=agent.device, stream=PROBE_STREAM, request=request, model=PROBE_MODEL,
                                   dtype="uint8", shape=[nbytes], sent_at=time.time())
            payload = encode_frame(header, bytes(nbytes))
            topic = agent.topics.offload(agent.device, agent.device, PROBE_MODEL)
        else:
            payload, topic = bytes(nbytes), agent.topics.probe(agent.device)
        t0 = time.monotonic()
        key = agent.session.publish(Outgoing(topic, payload, 1))
        return None if key is None else (t0, key)
