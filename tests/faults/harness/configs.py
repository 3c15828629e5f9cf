"""Agent and coordinator config files for a test fleet (formats: docs/interfaces).

Row tests ask for a shape ("3 devices producing 10 results/s each from a
synthetic noise camera through the digits model") and override any key with
a nested dict, e.g. ``{"outbox": {"max_rows": 500}}``; the result is written
as TOML next to the test's other files.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomli_w

DEFAULT_MODEL = "digits-int8"


def merge(base: dict, overrides: dict | None) -> dict:
    """Deep-merge *overrides* into a copy of *base* (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def synthetic_streams(rate_hz: float = 10.0, streams: int = 1, model: str = DEFAULT_MODEL,
                      pattern: str = "noise", seed: int = 0, size: int = 32) -> tuple[list[dict], list[dict]]:
    """(sources, streams) sections: *streams* synthetic cameras at *rate_hz* each, each through *model*."""
    sources, stream_list = [], []
    for i in range(streams):
        sid = f"cam{i}"
        sources.append({"id": sid, "type": "synthetic", "pattern": pattern, "fps": float(rate_hz),
                        "width": size, "height": size, "seed": seed * 100 + i})
        stream_list.append({"id": f"s{i}", "source": sid, "model": model})
    return sources, stream_list


def agent_config(device_id: str, broker: tuple[str, int], prefix: str, workdir: Path, *,
                 keepalive: int = 5, rate_hz: float = 10.0, streams: int = 1, model: str = DEFAULT_MODEL,
                 pattern: str = "noise", seed: int = 0, overrides: dict | None = None) -> dict[str, Any]:
    """An agent config: its own outbox and model cache under *workdir*, fast reconnects."""
    workdir = Path(workdir)
    sources, stream_list = synthetic_streams(rate_hz, streams, model, pattern, seed)
    base: dict[str, Any] = {
        "device_id": device_id,
        "prefix": prefix,
        "broker": {"host": broker[0], "port": int(broker[1]), "keepalive": keepalive,
                   "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
        "outbox": {"path": str(workdir / "outbox.db"), "resend_after_s": 5.0},
        "telemetry": {"interval_s": 1.0},
        "models": {"cache_dir": str(workdir / "models")},
        "sources": sources,
        "streams": stream_list,
    }
    return merge(base, overrides)


def coordinator_config(broker: tuple[str, int], prefix: str, workdir: Path, *, keepalive: int = 5,
                       http: tuple[str, int] = ("127.0.0.1", 0), overrides: dict | None = None) -> dict[str, Any]:
    """A coordinator config: its database under *workdir*, short liveness and planning intervals."""
    workdir = Path(workdir)
    base: dict[str, Any] = {
        "prefix": prefix,
        "broker": {"host": broker[0], "port": int(broker[1]), "keepalive": keepalive,
                   "client_id": f"coordinator-{prefix.split('/')[0]}"[:64],
                   "reconnect_min_s": 0.2, "reconnect_max_s": 2.0},
        "db": {"path": str(workdir / "coordinator.db")},
        "planner": {"interval_s": 5.0, "time_limit_s": 2.0},
        "liveness": {"stale_after_s": 3.0 * keepalive},
        "http": {"bind": http[0], "port": int(http[1])},
    }
    return merge(base, overrides)


def write_toml(path: Path, data: dict) -> Path:
    """Write *data* as TOML (parents created); returns *path*."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path
