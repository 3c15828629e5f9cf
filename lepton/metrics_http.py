"""The /metrics HTTP endpoint both daemons serve: prometheus-client's own server, on a private registry."""

from __future__ import annotations

from typing import Any

from lepton.errors import ConfigError


def serve_metrics(registry: Any, port: int, bind: str) -> Any:
    """Serve *registry* on *bind*:*port* in a thread named metrics-http; the server (``shutdown()`` it).
    A port that cannot be bound is a ConfigError naming it."""
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=bind, registry=registry)
    except OSError as exc:
        raise ConfigError(f"metrics.port {port} on {bind}: {exc.strerror or exc}") from None
    thread.name = "metrics-http"
    return server
