"""`lepton results`: what the coordinator stored, read from its real SQLite database while it is written."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from lepton.cli import main
from lepton.coordinator.db import open_db, write_tx
from lepton.coordinator.ingest import INSERT_RESULT
from lepton.coordinator.results import parse_since, summary
from lepton.protocol import encode
from lepton.protocol import messages as m

MODEL = m.ModelId(name="digits-int8", version="1.0.0", sha256="0" * 64)
NOW = time.time()  # set again by fleet_db: "the last minute" is the minute before each test, not before collection


def store(db, device: str, seq: int, stream: str, received_at: float, output: dict, computed_on: str = "",
          ack: bool = True, floor: int = 1) -> bytes:
    """One result as ingest stores it: the payload the device sent, with its columns (and, with *ack*, the
    device's ack moved to it: what ingest does when the seqs below are all stored)."""
    captured = received_at - 0.025
    payload = encode(m.Result(device=device, stream=stream, seq=seq, floor=floor, model=MODEL, captured_at=captured,
                              inferred_at=captured + 0.01, infer_ms=5.0, computed_on=computed_on or device,
                              output=output))
    with write_tx(db):
        db.conn.execute(INSERT_RESULT, (device, seq, stream, MODEL.name, computed_on or device, captured, 5.0,
                                        received_at, payload.decode()))
        if ack:
            db.conn.execute("INSERT INTO acks (device, seq) VALUES (?, ?) ON CONFLICT (device) DO UPDATE SET "
                            "seq = excluded.seq", (device, seq))
    return payload


def digit(label: int, score: float = 0.9) -> dict:
    return {"top": [{"label": str(label), "index": label, "score": score}], "source": {"truth": label, "frame": 1}}


@pytest.fixture
def fleet_db(tmp_path):
    """cam-1 (door, yard) and cam-2 (gate): old results an hour ago, new ones in the last minute."""
    global NOW
    NOW = time.time()
    path = tmp_path / "coordinator.db"
    db = open_db(path)
    payloads = {}
    with write_tx(db):  # the streams their births declared
        for device, stream in (("cam-1", "door"), ("cam-1", "yard"), ("cam-2", "gate")):
            db.conn.execute("INSERT INTO streams (device, stream, model, rate_hz) VALUES (?, ?, ?, 10)",
                            (device, stream, MODEL.name))
    for i, (device, stream) in enumerate([("cam-1", "door"), ("cam-1", "yard"), ("cam-2", "gate")] * 4):
        seq = i + 1
        when = NOW - 3600 + i if i < 6 else NOW - 60 + i
        payloads[(device, seq)] = store(db, device, seq, stream, when, digit(seq % 10))
    return path, db, payloads


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["results", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_newest_results_across_devices_oldest_first_with_filters(fleet_db, capsys):
    path, _, _ = fleet_db
    code, out, _ = run(capsys, "--db", str(path), "--limit", "4", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(r["device"], r["seq"]) for r in rows] == [("cam-2", 9), ("cam-1", 10), ("cam-1", 11),
                                                                      ("cam-2", 12)]
    code, out, _ = run(capsys, "--db", str(path), "--stream", "cam-1/door", "--json")
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [1, 4, 7, 10]
    code, out, _ = run(capsys, "--db", str(path), "--device", "cam-2", "--limit", "2", "--json")
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [9, 12]
    code, out, _ = run(capsys, "--db", str(path), "--stream", "yard", "--json")  # a bare stream id: every device's
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [2, 5, 8, 11]


def test_json_lines_are_what_the_device_sent_plus_when_it_was_stored(fleet_db, capsys):
    path, _, payloads = fleet_db
    code, out, _ = run(capsys, "--db", str(path), "--limit", "12", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 12
    for row in rows:
        received = row.pop("received_at")
        assert row == json.loads(payloads[(row["device"], row["seq"])])
        assert abs(received - row["captured_at"] - 0.025) < 1e-6


def test_since_takes_a_duration_or_a_time(fleet_db, capsys):
    path, _, _ = fleet_db
    code, out, _ = run(capsys, "--db", str(path), "--since", "10m", "--limit", "100", "--json")
    assert code == 0 and [json.loads(line)["seq"] for line in out.splitlines()] == [7, 8, 9, 10, 11, 12]
    # Local time, whole seconds: from just before the fourth old result (seq 4) on.
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(NOW - 3600 + 3))
    code, out, _ = run(capsys, "--db", str(path), "--since", start, "--device", "cam-1", "--json")
    assert code == 0 and [json.loads(line)["seq"] for line in out.splitlines()] == [4, 5, 7, 8, 10, 11]
    assert parse_since("90s", now=1000.0) == 910.0 and parse_since("2h", now=10000.0) == 2800.0


def test_table_says_what_each_result_found(fleet_db, capsys):
    path, db, _ = fleet_db
    store(db, "gw-1", 1, "pump", NOW, {"score": 0.97, "threshold": 0.5, "anomaly": True, "source": {"frame": 3}})
    code, out, _ = run(capsys, "--db", str(path), "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["RECEIVED", "DEVICE/STREAM", "SEQ"] and len(lines) == 3
    assert "cam-2/gate" in lines[1] and lines[1].rstrip().endswith("2 (0.900)") and "25ms" in lines[1]
    assert lines[1].split()[4] == "digits-int8@1.0.0"  # the version: a rollout can be followed here
    assert "gw-1/pump" in lines[2] and lines[2].rstrip().endswith("ANOMALY (score 0.970)")
    assert summary({"boxes": [[1, 2, 3, 4]] * 20, "source": {"frame": 1}}, width=40).endswith("...")
    assert len(summary({"boxes": [[1, 2, 3, 4]] * 20}, width=40)) == 40
    assert summary({"count": 3, "source": {"frame": 1}}) == '{"count":3}'
    assert summary({"top": [{"label": "cat", "score": "high"}]}) == '{"top":[{"label":"cat","score":"high"}]}'


@pytest.mark.parametrize("args, words", [
    (["--device", "cam-9"], "--device: no device 'cam-9' in this database (devices: cam-1, cam-2)"),
    (["--stream", "cam-9/door"], "--stream 'cam-9/door': no device 'cam-9' in this database (devices: cam-1, cam-2)"),
    (["--stream", "dor"], "--stream 'dor': no such stream (streams: door, gate, yard)"),
    (["--stream", "cam-2/door"], "--stream 'cam-2/door': no such stream on cam-2 (streams: gate)"),
    (["--stream", "cam-1/"], "--stream 'cam-1/': give STREAM or DEVICE/STREAM"),
    (["--stream", "/door"], "--stream '/door': give STREAM or DEVICE/STREAM"),
    (["--stream", "cam-1/door", "--device", "cam-2"], "--stream 'cam-1/door' names another device than --device 'cam-2'"),
    (["--since", "yesterday"], "--since 'yesterday': give a duration"),
])
def test_a_filter_that_matches_nothing_known_is_an_error_not_an_empty_list(fleet_db, capsys, args, words):
    path, _, _ = fleet_db
    code, out, err = run(capsys, "--db", str(path), *args)
    assert code == 2 and out == "" and err.startswith(f"lepton: error: {words}"), err


def test_an_empty_database_or_a_future_since_says_so(tmp_path, fleet_db, capsys):
    open_db(tmp_path / "c.db")
    assert run(capsys, "--db", str(tmp_path / "c.db")) == (0, "no results\n", "")
    assert run(capsys, "--db", str(fleet_db[0]), "--since", "2100-01-01") == (0, "no results\n", "")


def declare(db, device: str, stream: str) -> None:
    """What a device's birth records: the streams it serves."""
    with write_tx(db):
        db.conn.execute("INSERT INTO streams (device, stream, model, rate_hz) VALUES (?, ?, ?, 10)",
                        (device, stream, MODEL.name))


def test_a_follower_sees_each_result_once_a_late_one_included_and_the_listing_stops_at_its_snapshot(fleet_db):
    """A result re-sent after a gap is stored after higher seqs: a follower still shows it, once; the first
    listing ends where the follower starts, so nothing stored in between is lost or shown twice."""
    from lepton.coordinator.db import open_readonly
    from lepton.coordinator.results import Follower, newest

    path, db, _ = fleet_db
    reader = open_readonly(path)
    follower = Follower(reader)
    store(db, "cam-1", 14, "door", time.time(), digit(4), ack=False)  # 13 is missing: the broker lost it
    store(db, "cam-1", 15, "yard", time.time(), digit(5), ack=False)  # the ack stays at 12
    listed = newest(reader, ["cam-1", "cam-2"], limit=3, upto=follower.hi)
    assert [r["seq"] for r in listed] == [10, 11, 12]
    assert [r["seq"] for r in follower.poll()] == [14, 15]
    assert follower.poll() == []
    store(db, "cam-1", 13, "door", time.time(), digit(3))  # re-sent by the device, stored late
    with write_tx(db):
        db.conn.execute("UPDATE acks SET seq = 15 WHERE device = 'cam-1'")
    assert [r["seq"] for r in follower.poll()] == [13]
    assert follower.poll() == [] and follower.holes["cam-1"] == set()
    store(db, "cam-1", 20, "door", time.time(), digit(0), ack=False)  # 16-19 dropped by the device: the ack passes them
    assert [r["seq"] for r in follower.poll()] == [20] and follower.holes["cam-1"] == {16, 17, 18, 19}
    with write_tx(db):
        db.conn.execute("UPDATE acks SET seq = 20 WHERE device = 'cam-1'")
    assert follower.poll() == [] and follower.holes["cam-1"] == set()


def test_a_follower_waits_for_no_seq_below_a_new_devices_floor(fleet_db):
    """A device that appears while following numbers from its clock (1.8e15): the seqs below its first
    result were 10,000 holes looked up at every poll. Only the seqs between its floor and the result can
    still come."""
    from lepton.coordinator.db import open_readonly
    from lepton.coordinator.results import Follower

    path, db, _ = fleet_db
    follower = Follower(open_readonly(path))
    first = 1795738306195468
    with write_tx(db):
        db.conn.execute("INSERT INTO streams (device, stream, model, rate_hz) VALUES ('cam-3', 'dock', ?, 10)",
                        (MODEL.name,))
        db.conn.execute("INSERT INTO acks (device, seq) VALUES ('cam-3', 0)")  # as ingest makes its row
    store(db, "cam-3", first + 3, "dock", time.time(), digit(3), ack=False, floor=first)
    assert [r["seq"] for r in follower.poll()] == [first + 3]
    assert follower.holes["cam-3"] == {first, first + 1, first + 2}
    store(db, "cam-3", first, "dock", time.time(), digit(0), floor=first)
    assert [r["seq"] for r in follower.poll()] == [first]


def test_follow_in_a_table_prints_its_header_with_the_first_results(tmp_path):
    path = tmp_path / "c.db"
    db = open_db(path)
    declare(db, "cam-1", "door")
    proc = subprocess.Popen([sys.executable, "-m", "lepton.cli", "results", "--db", str(path), "--follow",
                             "--interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "no results yet; following\n"
        store(db, "cam-1", 1, "door", time.time(), digit(1))
        assert proc.stdout.readline().split()[:2] == ["RECEIVED", "DEVICE/STREAM"]
        assert "cam-1/door" in proc.stdout.readline()
        store(db, "cam-1", 2, "door", time.time(), digit(2))
        line = proc.stdout.readline()
        assert "cam-1/door" in line and line.split()[3] == "2", line  # date, time, device/stream, seq
    finally:
        proc.terminate()
        proc.wait(10)


def test_follow_prints_results_as_they_are_stored_including_a_new_device(fleet_db):
    """A real reader process on the database while this test writes to it (WAL): the newest result, then
    each new one once, in order, a device that appears later included; other streams filtered out."""
    path, db, _ = fleet_db
    proc = subprocess.Popen([sys.executable, "-m", "lepton.cli", "results", "--db", str(path), "--follow", "--json",
                             "--limit", "1", "--interval", "0.1", "--stream", "door"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: [lines.append(json.loads(x)) for x in proc.stdout], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while not lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [(r["device"], r["seq"]) for r in lines] == [("cam-1", 10)], "the newest door result first"
        declare(db, "cam-3", "door")  # a new device's birth
        for seq, (device, stream) in enumerate([("cam-1", "door"), ("cam-1", "yard"), ("cam-3", "door"),
                                                ("cam-1", "door"), ("cam-3", "door")], start=13):
            store(db, device, seq, stream, time.time(), digit(seq % 10))
            time.sleep(0.05)
        expected = [("cam-1", 10), ("cam-1", 13), ("cam-3", 15), ("cam-1", 16), ("cam-3", 17)]
        while len(lines) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # nothing more, nothing twice
        assert [(r["device"], r["seq"]) for r in lines] == expected
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)
