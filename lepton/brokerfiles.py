"""The files a broker connection reads (CA, client certificate and key, password), for the agent and the
coordinator alike: each problem is one ConfigError naming the config key, never a traceback from ssl."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError


def reason(exc: BaseException) -> str:
    """An OS or ssl error as a few words."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def readable(key: str, path: str) -> None:
    """*path* (the value of config *key*) is a file this process can read."""
    try:
        with open(Path(path), "rb"):
            pass
    except IsADirectoryError:
        raise ConfigError(f"{key} {path}: is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"{key} {path}: {reason(exc)}") from None


def tls_context(broker: Any) -> ssl.SSLContext:
    """The client TLS context of a ``[broker]`` section with ``tls_ca`` set (``tls_cert``/``tls_key`` for a
    client certificate), built once so that bad files fail at start-up and in --check-config."""
    readable("broker.tls_ca", broker.tls_ca)
    if broker.tls_cert:
        readable("broker.tls_cert", broker.tls_cert)
    if broker.tls_key:
        if not broker.tls_cert:
            raise ConfigError("broker.tls_key: set without broker.tls_cert")
        readable("broker.tls_key", broker.tls_key)
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=broker.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"broker.tls_ca {broker.tls_ca}: not a usable CA certificate ({reason(exc)})") from None
    if broker.tls_cert:
        try:
            ctx.load_cert_chain(broker.tls_cert, broker.tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"broker.tls_cert/tls_key {broker.tls_cert}: {reason(exc)}") from None
    return ctx


def read_password(path: str) -> str:
    """The broker password from ``broker.password_file`` ("" when none is set)."""
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"broker.password_file {path}: {reason(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"broker.password_file {path}: not a text file") from None
