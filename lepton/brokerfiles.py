"""The files a broker connection reads (CA, client certificate and key, password), for the agent and the
coordinator alike: each problem is one ConfigError naming the config key, never a traceback from ssl.
And how both word a broker that will not have them (``refused``, ``closed_unanswered``)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from lepton.errors import ConfigError


def reason(exc: BaseException) -> str:
    """An OS or ssl error as a few words."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# CONNACK codes that mean "not these credentials" (3.1.1: 4 bad user name or password, 5 not authorised;
# 5: 134 bad user name or password, 135 not authorised)
CREDENTIAL_REFUSALS = frozenset({4, 5, 134, 135})


def refused(reason_code: Any) -> str:
    """A CONNACK refusal as words, pointing at the config keys when it is about credentials."""
    hint = " (check broker.username / broker.password_file / certificates)" \
        if getattr(reason_code, "value", None) in CREDENTIAL_REFUSALS else ""
    return f"refused the connection: {reason_code}{hint}"


def closed_unanswered(tls: bool, whose: str) -> str:
    """A connection closed with no CONNACK at all: a TLS broker refusing *whose* certificate (expired,
    revoked, another CA) closes it right after the handshake, and paho says only that it closed."""
    hint = f": is {whose} certificate from the broker's CA, unexpired and not revoked?" if tls else ""
    return f"closed the connection before accepting it{hint}"


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
