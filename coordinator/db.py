"""The coordinator's SQLite file: connection settings and schema migrations.

One ``Database`` per thread (SQLite connections are not shared): the ingest
thread owns the write path for results, the rebalancer has its own connection
for its short writes, and read-only tools (``lepton status``) open their own.
WAL lets all of them read while one writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database, Migrations

from lepton.errors import ConfigError, storage_error

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

migrations = Migrations("lepton.coordinator")


@migrations()
def m001_fleet(db: Database) -> None:
    """Devices, what they can do and what they measured."""
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["devices"].create(
        {
            "id": str,
            "state": str,  # online / offline: what the device's status says
            "liveness": str,  # online / stale / offline: what the coordinator concludes
            "degraded": int,
            "degraded_reason": str,
            "first_seen": float,
            "status_at": float,  # coordinator clock, when the last status arrived
            "status_ts": float,  # device clock, from the status itself
            "reason": str,  # why the device went offline (last will, clean stop)
            "agent_version": str,
            "capabilities": str,  # JSON
            "telemetry": str,  # JSON, the newest
            "telemetry_at": float,  # coordinator clock
            "load1": float,
            "cpu_percent": float,
            "outbox_depth": int,
        },
        pk="id",
        not_null={"state", "liveness"},
        defaults={"degraded": 0, "degraded_reason": "", "reason": "", "agent_version": ""},
    )
    db["models"].create(
        {
            "name": str,
            "version": str,
            "sha256": str,
            "size": int,
            "memory_mb": float,
            "compute_ms": float,  # bench profile; None when unknown
            "family": str,
            "variant": str,
        },
        pk=("name", "version"),
    )
    db["compute"].create(
        {"device": str, "model": str, "window": str, "ms": float, "updated_at": float},
        pk=("device", "model"),
    )
    db["links"].create(
        {"device": str, "rtt_ms": float, "up_mbps": float, "down_mbps": float, "updated_at": float},
        pk="device",
    )
    db["streams"].create(
        {
            "device": str,
            "stream": str,
            "model": str,
            "rate_hz": float,
            "payload_bytes": int,
            "reply_bytes": int,
            "slo_ms": float,
            "updated_at": float,
        },
        pk=("device", "stream"),
    )


@migrations()
def m002_placement_results(db: Database) -> None:
    """Placement, failures, results (exactly once), acks, events, plans."""
    db["placement"].create(
        {
            "device": str,
            "desired_gen": int,
            "desired": str,  # JSON of the last published Desired
            "desired_at": float,
            "reported_gen": int,
            "reported": str,  # JSON of the last Reported
            "reported_at": float,
        },
        pk="device",
        defaults={"desired_gen": 0, "reported_gen": -1},
    )
    db["failures"].create(
        {"device": str, "model": str, "version": str, "reason": str, "at": float},
        pk=("device", "model"),
    )
    # WITHOUT ROWID: the (device, seq) key is the table, so the conflict check
    # and the insert touch one b-tree.
    db.execute(
        """CREATE TABLE results (
            device TEXT NOT NULL, seq INTEGER NOT NULL, stream TEXT NOT NULL,
            model TEXT NOT NULL, computed_on TEXT NOT NULL, captured_at REAL NOT NULL,
            infer_ms REAL NOT NULL, received_at REAL NOT NULL, payload TEXT NOT NULL,
            PRIMARY KEY (device, seq)) WITHOUT ROWID"""
    )
    db["acks"].create({"device": str, "seq": int}, pk="device")
    db.execute(
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
            device TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '', data TEXT)"""
    )
    db.execute(
        """CREATE TABLE plans (
            id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, trigger TEXT NOT NULL,
            status TEXT, path TEXT, objective REAL, gap REAL, solve_s REAL,
            changed INTEGER NOT NULL DEFAULT 0, plan TEXT, snapshot TEXT)"""
    )
    db["events"].create_index(["device", "id"])


@migrations()
def m003_measured_stream_rate(db: Database) -> None:
    """The rate each stream really runs at, from telemetry (the birth states the configured one)."""
    db["streams"].add_column("measured_hz", float)


@migrations()
def m004_failures_per_version(db: Database) -> None:
    """A failure names the model version that failed: an older version may still serve on that device."""
    db.execute("UPDATE failures SET version = '' WHERE version IS NULL")
    db["failures"].transform(pk=("device", "model", "version"))


def open_db(path: str | Path, synchronous: str = "FULL", create: bool = True) -> Database:
    """Open (and migrate) the fleet database at *path* for this thread.

    ``synchronous=FULL`` makes every committed batch survive a power cut, which
    the ack to the device promises; NORMAL survives a process crash only.
    """
    if synchronous.upper() not in SYNCHRONOUS:
        raise ConfigError(f"db synchronous {synchronous!r}: use one of {', '.join(SYNCHRONOUS)}")
    path = Path(path)
    if not create and not path.exists():
        raise ConfigError(f"no coordinator database at {path}")
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
        db = Database(conn, execute_plugins=False)
        db.execute("PRAGMA busy_timeout=30000")
        if create:
            db.enable_wal()
            _refuse_newer(db, path)
            migrations.apply(db)
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
    except OSError as exc:
        raise storage_error(f"cannot create coordinator database {path}", path, exc) from None
    except sqlite3.DatabaseError as exc:
        raise storage_error(f"cannot open coordinator database {path}", path, exc) from None
    return db


@contextmanager
def write_tx(db: Database) -> Iterator[Database]:
    """A write transaction that takes the write lock up front (BEGIN IMMEDIATE).

    A deferred BEGIN that reads first and writes later fails at once with
    "database is locked" if another connection committed in between (the
    busy timeout cannot help a stale read snapshot); IMMEDIATE waits instead.
    Nested ``db.atomic()`` blocks inside become savepoints.
    """
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise
    else:
        db.conn.execute("COMMIT")


def open_readonly(path: str | Path) -> Database:
    """A read-only view for status tools: never creates, never migrates, never locks writers out."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no coordinator database at {path} (give --db FILE or --config the coordinator's config, "
                          "or start the coordinator first)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)
        db = Database(conn, execute_plugins=False)
        db.execute("PRAGMA busy_timeout=30000")
        if not db["devices"].exists():
            raise ConfigError(f"{path} is not a coordinator database")
        _refuse_newer(db, path)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot read coordinator database {path}: {exc}") from None
    return db


def _refuse_newer(db: Database, path: Path) -> None:
    """A database a newer lepton migrated has a schema this one does not know: refused, before anything
    reads or writes it (an older coordinator would write rows the newer schema does not expect)."""
    known = {m.name for m in migrations._migrations}
    newer = [m.name for m in migrations.applied(db) if m.name not in known]
    if newer:
        raise ConfigError(f"coordinator database {path} was migrated by a newer lepton ({', '.join(newer)}): "
                          f"run that version, or restore a backup made by this one")


def dump(db: Database) -> list[str]:
    """The whole database as SQL text (schema and rows), for comparisons."""
    return list(db.conn.iterdump())
