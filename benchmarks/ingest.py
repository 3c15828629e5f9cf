"""Coordinator ingest throughput against raw paho QoS 1 receive, in one run.

    python benchmarks/ingest.py [--results 50000] [--devices 10] [--synchronous FULL]

Both measurements drain the same kind of queue from a private Mosquitto: a
persistent session is subscribed, then disconnected; the results are
published into the broker's queue for it; the clock starts at the reconnect.

- baseline: a bare paho client that receives and auto-PUBACKs every message.
- coordinator: the real ingest path (``Bus`` + ``Ingest``): validate every
  result, commit in batches (INSERT ... ON CONFLICT DO NOTHING), PUBACK after
  the commit, publish per-device acks. Stops when every result is committed.

Prints both rates and their ratio. Target: >= 10,000 results/s committed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from lepton.broker import MosquittoBroker
from lepton.coordinator.bus import Bus
from lepton.coordinator.config import load_config
from lepton.coordinator.ingest import Ingest
from lepton.protocol import Topics, encode
from lepton.protocol import messages as m

TARGET = 10_000


def payloads(topics: Topics, devices: int, per_device: int) -> list[tuple[str, bytes]]:
    """Realistic classification results, interleaved across devices."""
    model = m.ModelId(name="digits-int8", version="1.0.0", sha256="ab" * 32)
    out = []
    now = time.time()
    for seq in range(1, per_device + 1):
        for d in range(devices):
            dev = f"bench-{d}"
            r = m.Result(device=dev, stream="cam", seq=seq, model=model, captured_at=now, inferred_at=now,
                         infer_ms=1.5, computed_on=dev,
                         output={"top": [{"label": "3", "index": 3, "score": 0.97}, {"label": "8", "index": 8, "score": 0.02}]})
            out.append((topics.result(dev, "cam"), encode(r)))
    return out


def fill(port: int, msgs: list[tuple[str, bytes]]) -> None:
    """Publish every message at QoS 1 and wait until the broker has them all."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    pub.max_inflight_messages_set(1000)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [pub.publish(t, p, qos=1) for t, p in msgs]
    for info in infos:
        info.wait_for_publish(60)
    pub.disconnect()
    pub.loop_stop()


def park_session(port: int, client_id: str, topic: str) -> None:
    """Create a persistent session subscribed to *topic*, then leave it so the broker queues."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe(topic, 1)[1]
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()


def raw_rate(port: int, topics: Topics, msgs: list) -> float:
    park_session(port, "bench-raw", topics.all_results())
    fill(port, msgs)
    n, done = 0, threading.Event()

    def on_message(client, userdata, msg):
        nonlocal n
        n += 1
        if n >= len(msgs):
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", clean_session=False)
    c.on_message = on_message
    start = time.perf_counter()
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait(300)
    elapsed = time.perf_counter() - start
    c.disconnect()
    c.loop_stop()
    return n / elapsed


def ingest_rate(port: int, topics: Topics, msgs: list, db_path: Path, synchronous: str) -> tuple[float, int]:
    cfg = load_config(data={"broker": {"port": port, "client_id": "bench-coordinator"}})
    park_session(port, "bench-coordinator", topics.all_results())
    fill(port, msgs)
    ingest: Ingest | None = None
    bus = Bus(cfg.broker, topics, lambda item: ingest.submit(item))
    ingest = Ingest(str(db_path), topics, bus, synchronous=synchronous)
    stop = threading.Event()
    ingest.start(stop)
    start = time.perf_counter()
    bus.start()
    while ingest.committed < len(msgs) and time.perf_counter() - start < 300:
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    stop.set()
    ingest.join()
    bus.stop()
    return ingest.committed / elapsed, ingest.committed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=int, default=50_000, help="results per measurement")
    ap.add_argument("--devices", type=int, default=10, help="devices the results come from")
    ap.add_argument("--synchronous", default="FULL", choices=["NORMAL", "FULL"], help="SQLite synchronous for ingest")
    args = ap.parse_args(argv)
    topics = Topics()
    msgs = payloads(topics, args.devices, max(1, args.results // args.devices))
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(Path(tmp) / "broker", max_queued_messages=0) as broker:
        raw = raw_rate(broker.port, topics, msgs)
        rate, stored = ingest_rate(broker.port, topics, msgs, Path(tmp) / "coordinator.db", args.synchronous)
    print(f"messages                         {len(msgs)} from {args.devices} devices, {len(msgs[0][1])} bytes each")
    print(f"baseline: raw paho QoS1 receive  {raw:10.0f} msg/s")
    print(f"coordinator ingest committed     {rate:10.0f} results/s  ({stored} stored, synchronous={args.synchronous})")
    print(f"ratio ingest / raw receive       {rate / raw:10.2f}")
    print(f"target >= {TARGET} results/s       {'met' if rate >= TARGET else 'NOT met'}")
    return 0 if stored == len(msgs) else 1


if __name__ == "__main__":
    sys.exit(main())
