"""The exceptions lepton raises at its boundaries.

Library code raises these; the CLI turns them into one clean line and an
exit code at a single place (``lepton.cli.main``).
"""

from collections.abc import Iterator
from contextlib import contextmanager


class LeptonError(Exception):
    """Base class: a problem with a clear, user-facing message."""

    exit_code = 1


class ConfigError(LeptonError):
    """A configuration file or option is invalid. Never retried."""

    exit_code = 2


class ModelError(LeptonError):
    """A model file, manifest, signature or spec is unusable."""


class ProtocolError(LeptonError):
    """A message failed validation: wrong schema, malformed, oversized."""


# -- pydantic validation errors as one clear line -------------------------------------------------
# Duck-typed over ``ValidationError.errors()`` dicts, so this module imports nothing.


def validation_field(error: dict) -> str:
    """Where a pydantic error is, as a dotted path (``broker.port``, ``streams.0.model``); "" for the whole object."""
    return ".".join(str(p) for p in error.get("loc", ()))


def validation_message(error: dict) -> str:
    """What a pydantic error says, without the "Value error, " pydantic puts before a validator's ValueError."""
    return error["msg"].removeprefix("Value error, ")


def describe_validation(exc, top: str, first_only: bool = False) -> str:
    """A pydantic ``ValidationError`` as one line: ``field: message`` per error (only the first with
    *first_only*), joined by "; "; an error about the whole object is named *top*."""
    errors = exc.errors()[:1] if first_only else exc.errors()
    return "; ".join(f"{validation_field(err) or top}: {validation_message(err)}" for err in errors)


def describe_config_error(exc) -> str:
    """The first pydantic error of a config file in its reader's words: ``unknown key 'broker.prot'``,
    ``missing key 'streams.0.id'``, ``db.batch_max: ... (got 0)`` (the agent and the coordinator alike)."""
    err = exc.errors()[0]
    loc = validation_field(err)
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    if err["type"] == "missing":
        return f"missing key {loc!r}"
    got = f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else ""
    return f"{loc or 'config'}: {validation_message(err)}{got}"


@contextmanager
def naming_config(path) -> Iterator[None]:
    """A ConfigError raised inside names the config file first, as a schema error does: ``config FILE: ...``
    (what start-up or --check-config found wrong with a file or model the config names)."""
    try:
        yield
    except ConfigError as exc:
        if str(exc).startswith("config "):
            raise
        raise ConfigError(f"config {path}: {exc}") from None


def as_value_error(check, *args, **kwargs):
    """Call a lepton check inside a pydantic validator: a LeptonError it raises becomes the ValueError
    that pydantic reports against the field being validated."""
    try:
        return check(*args, **kwargs)
    except LeptonError as exc:
        raise ValueError(str(exc)) from None


# -- a database file that cannot be opened or written ------------------------------------------------------

_SQLITE_IOERR, _SQLITE_FULL = 10, 13


def storage_error(message: str, path, exc: BaseException) -> LeptonError:
    """*exc* (sqlite3 or OS) on the database file *path*, as one line after *message*.

    A full file system or an I/O error can come back: a LeptonError (exit 1; systemd restarts the service
    until it does), saying how much room is left. Anything else is about the file itself (not a database, no
    permission): a ConfigError (exit 2).
    """
    import errno
    import shutil
    from pathlib import Path

    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+; before, only the message tells
    room = (code & 0xFF in (_SQLITE_IOERR, _SQLITE_FULL) if code is not None
            else any(text in detail for text in ("disk is full", "disk I/O error"))) or (
        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO))
    if not room:
        return ConfigError(f"{message}: {detail}")
    where = Path(path).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"; {shutil.disk_usage(where).free // 1024} KiB free on its file system"
    except OSError:
        free = ""
    return LeptonError(f"{message}: {detail}{free} (is the disk full?)")
