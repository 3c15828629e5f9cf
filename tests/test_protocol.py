"""protocol/: topics, schemas and offload frames, as agent and coordinator rely on them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from lepton.errors import ProtocolError
from lepton.protocol import Topics, decode, encode
from lepton.protocol import messages as m
from lepton.protocol.offload import OffloadHeader, decode_frame, encode_frame

ROOT = Path(__file__).resolve().parents[1]


def result(**over):
    base = dict(
        device="cam-1", stream="s1", seq=7, model=m.ModelId(name="digits", version="1.0.0", sha256="ab" * 32),
        captured_at=1.0, inferred_at=1.5, infer_ms=0.4, computed_on="cam-1", output={"top": [{"label": "3", "score": 0.9}]},
    )
    base.update(over)
    return m.Result(**base)


def test_topic_builders_follow_the_v1_tree():
    t = Topics()
    assert t.status("cam-1") == "lepton/v1/devices/cam-1/status"
    assert t.desired("cam-1") == "lepton/v1/devices/cam-1/placement/desired"
    assert t.result("cam-1", "door") == "lepton/v1/devices/cam-1/results/door"
    assert t.offload("cam-1", "gpu-2", "digits") == "lepton/v1/devices/cam-1/offload/gpu-2/digits"
    assert t.reply("gpu-2", "cam-1") == "lepton/v1/devices/gpu-2/replies/cam-1"
    assert t.coordinator_status() == "lepton/v1/coordinator/status"


@pytest.mark.parametrize("topic_of", [
    lambda t: t.status("d1"), lambda t: t.telemetry("d1"), lambda t: t.desired("d1"), lambda t: t.reported("d1"),
    lambda t: t.result("d1", "s"), lambda t: t.offload("d1", "d2", "m"), lambda t: t.reply("d1", "d2"),
    lambda t: t.acks("d1"), lambda t: t.coordinator_status(),
])
def test_parse_inverts_every_builder(topic_of):
    t = Topics("site-a/lepton/v1")
    parsed = t.parse(topic_of(t))
    assert parsed.kind in m.KINDS or parsed.kind == "offload"
    if parsed.kind != "coordinator":
        assert parsed.device == "d1"


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "", "-lead", "x" * 65, "sp ace"])
def test_ids_with_wildcards_or_separators_are_refused(bad):
    with pytest.raises(ProtocolError, match="invalid"):
        Topics().status(bad)


def test_subscriptions_only_reach_what_is_addressed_to_the_device():
    subs = [f for f, _ in Topics().device_subscriptions("cam-1")]
    assert all("cam-1" in f or "coordinator" in f for f in subs)
    assert not any(f.endswith("#") for f in subs)


def test_parse_refuses_foreign_and_malformed_topics():
    t = Topics()
    for topic in ["other/v1/devices/a/status", "lepton/v1/devices/a/unknown", "lepton/v1/devices/a+/status",
                  "lepton/v1/devices/a/results/s/extra"]:
        with pytest.raises(ProtocolError):
            t.parse(topic)


def test_result_roundtrip_is_readable_json():
    raw = encode(result())
    doc = json.loads(raw)
    assert doc["v"] == 1 and doc["seq"] == 7 and doc["output"]["top"][0]["label"] == "3"
    assert decode("results", raw) == result()


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"),
    (b"{", "Invalid JSON"),
    (b'{"v": 2, "device": "a", "seq": 1}', "v"),
    (b'{"v": 1, "device": "a", "seq": -1}', "seq"),
    (b'{"v": 1, "device": "a", "seq": 1, "extra": 1}', "extra"),
    (b'{"v": 1, "device": "a/b", "seq": 1}', "device"),
    (b"[" * 40 + b"]" * 40, "nested"),
    (b'{"v": 1, "device": "a", "seq": 1, "pad": "' + b"x" * 300_000 + b'"}', "exceeds"),
])
def test_bad_payloads_raise_a_reason(payload, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode("acks", payload)


def test_nan_in_result_output_is_refused():
    raw = encode(result()).replace(b"0.9", b"NaN")
    with pytest.raises(ProtocolError):
        decode("results", raw)


def test_a_result_whose_floor_is_above_its_seq_is_refused():
    """The floor is the lowest seq the device still holds: one above the result's own seq would move the
    device's ack past results it never sent."""
    doc = json.loads(encode(result()))
    doc["floor"] = doc["seq"]
    assert decode("results", json.dumps(doc).encode()).floor == doc["seq"]
    doc["floor"] = doc["seq"] + 1
    with pytest.raises(ProtocolError, match="floor 8 is above seq 7"):
        decode("results", json.dumps(doc).encode())


def test_telemetry_v2_is_read_beside_v1_and_v1_never_gains_its_keys():
    """A coordinator of this release reads both; v1 stays what older receivers accept (no ``sources``), so an
    agent writing v1 works with them, and v2 is refused where v1 is the only schema (an older release)."""
    health = {"cam0": m.SourceHealth(connected=False, frames_in=3, last_frame_s=40.0)}
    v2 = decode("telemetry", encode(m.TelemetryV2(device="d", ts=1.0, sources=health)))
    assert isinstance(v2, m.TelemetryV2) and v2.sources == health and v2.v == 2
    v1 = encode(m.Telemetry(device="d", ts=1.0))
    assert b'"v":1' in v1 and b"sources" not in v1
    assert type(decode("telemetry", v1)) is m.Telemetry
    assert type(decode("telemetry", b'{"device":"d","ts":1}')) is m.Telemetry  # no "v": v1, as before
    with pytest.raises(ProtocolError, match="sources"):
        decode("telemetry", v1[:-1] + b',"sources":{}}')  # a v1 payload with a v2 key is refused, as before
    with pytest.raises(ProtocolError, match=r"^telemetry: v: schema version 3 is not one this release reads \(1, 2\)"):
        decode("telemetry", b'{"v":3,"device":"d","ts":1}')
    with pytest.raises(ProtocolError, match="^telemetry: ts:"):  # named by its key, not the schema version
        decode("telemetry", b'{"v":2,"device":"d","ts":-1}')
    with pytest.raises(ValidationError, match="sources"):  # what a v1-only (older) coordinator does with v2
        m.Telemetry.model_validate_json(encode(m.TelemetryV2(device="d", ts=1.0, sources=health)).replace(b'"v":2', b'"v":1'))


def test_offload_frame_roundtrip_and_size_check():
    tensor = np.arange(96 * 96 * 3, dtype=np.uint8).reshape(1, 96, 96, 3)
    header = OffloadHeader(origin="cam-1", stream="s1", request=5, model="mobilenet96", dtype="uint8", shape=list(tensor.shape))
    frame = encode_frame(header, tensor.tobytes())
    got, body = decode_frame(frame)
    assert got == header
    assert np.array_equal(np.frombuffer(body, np.uint8).reshape(got.shape), tensor)
    with pytest.raises(ProtocolError, match="needs"):
        decode_frame(frame[:-1])
    with pytest.raises(ProtocolError, match="LPO1"):
        decode_frame(b"garbage!")


def test_importing_protocol_loads_no_heavy_module():
    code = "import sys, lepton.protocol; print(sorted(m for m in ('cv2','scipy','ai_edge_litert','tensorflow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_module_outside_protocol_spells_a_topic():
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("protocol", "tests", "docs", ".git") or "site-packages" in rel.parts:
            continue
        if re.search(r"lepton/v1", path.read_text(errors="ignore")):
            offenders.append(str(rel))
    assert offenders == []
