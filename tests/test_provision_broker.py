"""The generated Mosquitto config, run by a real Mosquitto: who gets in, who reads and writes what.

Every denial is checked at the receiver: MQTT 3.1.1 answers a denied publish
with a normal PUBACK, so an ack proves nothing. A "barrier" message sent after
the forbidden ones on the same connection shows the forbidden ones had their
chance to arrive.
"""

from __future__ import annotations

import datetime as dt
import getpass
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from lepton.broker import free_port, mosquitto_binary
from lepton.errors import ConfigError
from lepton.protocol import Topics
from lepton.provisioning import pki
from lepton.provisioning.fleet import Fleet
from lepton.provisioning.settings import new_settings

pytestmark = pytest.mark.skipif(not mosquitto_binary(), reason="mosquitto is not installed")

T = Topics()  # the fleet uses the default prefix


# --- a broker running the generated config -------------------------------------


class GeneratedBroker:
    """mosquitto -c <the fleet's mosquitto.conf>, with only the listener moved to a
    free loopback port, the persistence dir into the test, and the user kept."""

    def __init__(self, fleet: Fleet, workdir: Path):
        self.fleet, self.workdir = fleet, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def config_text(self) -> str:
        conf = (self.fleet.layout.broker_dir / "mosquitto.conf").read_text()
        conf, n = re.subn(r"^listener \d+.*$", f"listener {self.port} 127.0.0.1", conf, flags=re.M)
        assert n == 1
        conf = re.sub(r"^user .*$", f"user {getpass.getuser()}", conf, flags=re.M)
        return re.sub(r"^persistence_location .*$", f"persistence_location {self.workdir}/", conf, flags=re.M)

    def start(self) -> "GeneratedBroker":
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not start: {self.log()}")

    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


class Peer:
    """One MQTT client over TLS with a given identity; collects what it receives."""

    def __init__(self, broker: GeneratedBroker, cert: Path | None, key: Path | None, ca: Path | None = None,
                 client_id: str = "", username: str | None = None, clean: bool = True):
        self.received: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.connack: int | None = None
        self.dropped = False
        self.broker = broker
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, clean_session=clean)
        self.client.tls_set(ca_certs=str(ca or broker.fleet.layout.ca_cert), certfile=cert and str(cert),
                            keyfile=key and str(key))
        if username:
            self.client.username_pw_set(username)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c, _u, _flags, reason, _props):
        with self.cond:
            self.connack = reason.value
            self.cond.notify_all()

    def _on_disconnect(self, *_args):
        with self.cond:
            self.dropped = True
            self.cond.notify_all()

    def _on_message(self, _c, _u, msg):
        with self.cond:
            self.received.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def connect(self, timeout: float = 5.0) -> bool:
        """True once the broker accepted the connection (CONNACK 0)."""
        try:
            self.client.connect("127.0.0.1", self.broker.port, keepalive=10)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        with self.cond:
            self.cond.wait_for(lambda: self.connack is not None or self.dropped, timeout)
        if self.connack != 0:
            self.close()
        return self.connack == 0

    def subscribe(self, *filters: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe([(f, 1) for f in filters])
        assert done.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def wait_for(self, topic: str, payload: bytes, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: (topic, payload) in self.received, timeout)

    def got(self, pred) -> list[tuple[str, bytes]]:
        with self.cond:
            return [m for m in self.received if pred(m)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- fixtures --------------------------------------------------------------------------


def _make_fleet(root: Path, **options) -> Fleet:
    fleet, _ = Fleet.create(root, new_settings(root, ["localhost", "127.0.0.1"], **options))
    return fleet


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A fleet (cam-a, cam-b, an observer, a revoked and an expired device), a
    foreign fleet, and a Mosquitto running the fleet's generated config."""
    base = tmp_path_factory.mktemp("fleet")
    fleet = _make_fleet(base / "fleet")
    for dev in ("cam-a", "cam-b", "cam-r"):
        fleet.add_device(dev)
    fleet.add_observer("ops")
    past = pki.utcnow() - dt.timedelta(days=10)
    fleet.add_device("cam-old", days=1, not_before=past)
    # The thief keeps the key of the device that gets revoked.
    stolen = base / "stolen"
    stolen.mkdir()
    shutil.copy(fleet.layout.key("cam-r"), stolen / "key.pem")
    shutil.copy(fleet.layout.cert("cam-r"), stolen / "cert.pem")
    fleet.revoke("cam-r")
    foreign = _make_fleet(base / "foreign")
    foreign.add_device("cam-a")
    broker = GeneratedBroker(fleet, base / "broker").start()
    yield {"fleet": fleet, "foreign": foreign, "broker": broker, "stolen": stolen}
    broker.stop()


def peer(world, name: str, **kw) -> Peer:
    lay = world["fleet"].layout
    return Peer(world["broker"], lay.cert(name), lay.key(name), **kw)


def connected(world, name: str, **kw) -> Peer:
    p = peer(world, name, **kw)
    assert p.connect(), f"{name} could not connect: {world['broker'].log()[-2000:]}"
    return p


# --- identities ---------------------------------------------------------------------------


def test_generated_config_has_the_promised_settings(world):
    conf = (world["fleet"].layout.broker_dir / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", "autosave_on_changes false", "autosave_interval 10", "persistence true"):
        assert re.search(rf"^{line}$", conf, re.M), line
    assert re.search(r"^crlfile .*/crl\.pem$", conf, re.M)
    acl = (world["fleet"].layout.broker_dir / "acl").read_text()
    assert "%c" not in acl
    assert all(line.startswith(("#", "pattern ", "user ", "topic ")) for line in acl.splitlines() if line)


def test_provisioned_device_connects_over_tls_and_talks_to_the_coordinator(world):
    coord = connected(world, "lepton-coordinator")
    coord.subscribe(*[f for f, _ in T.coordinator_subscriptions()])
    dev = connected(world, "cam-a")
    dev.subscribe(*[f for f, _ in T.device_subscriptions("cam-a")])
    dev.publish(T.result("cam-a", "door"), b"r1")
    dev.publish(T.status("cam-a"), b"online")
    assert coord.wait_for(T.result("cam-a", "door"), b"r1")
    assert coord.wait_for(T.status("cam-a"), b"online")
    coord.publish(T.desired("cam-a"), b"plan-a")
    coord.publish(T.acks("cam-a"), b"ack-a")
    assert dev.wait_for(T.desired("cam-a"), b"plan-a")
    assert dev.wait_for(T.acks("cam-a"), b"ack-a")
    dev.close()
    coord.close()


@pytest.mark.parametrize("who", ["no certificate", "foreign CA", "expired", "revoked"])
def test_bad_identities_are_refused(world, who):
    lay, foreign = world["fleet"].layout, world["foreign"].layout
    cert, key = {
        "no certificate": (None, None),
        "foreign CA": (foreign.cert("cam-a"), foreign.key("cam-a")),
        "expired": (lay.cert("cam-old"), lay.key("cam-old")),
        "revoked": (world["stolen"] / "cert.pem", world["stolen"] / "key.pem"),
    }[who]
    if who == "expired":
        assert pki.load_cert(cert).not_valid_after_utc < pki.utcnow()
    assert not Peer(world["broker"], cert, key).connect(timeout=3)
    # The refusal is the certificate's, not the broker's: a good device still gets in.
    connected(world, "cam-a").close()


# --- ACL matrix -----------------------------------------------------------------------------


def test_device_cannot_publish_under_another_device(world):
    spy = connected(world, "ops")
    spy.subscribe(T.everything())
    a = connected(world, "cam-a")
    forged = [T.status("cam-b"), T.telemetry("cam-b"), T.reported("cam-b"), T.result("cam-b", "door"),
              T.offload("cam-b", "cam-a", "digits"), T.reply("cam-b", "cam-a"),
              T.desired("cam-a"), T.desired("cam-b"), T.acks("cam-a"), T.acks("cam-b"), T.coordinator_status()]
    for topic in forged:
        a.publish(topic, b"forged")
    a.publish(T.result("cam-a", "barrier"), b"barrier")
    assert spy.wait_for(T.result("cam-a", "barrier"), b"barrier")
    assert spy.got(lambda m: m[1] == b"forged") == []
    a.close()
    spy.close()


def test_device_cannot_read_what_is_addressed_to_another(world):
    coord = connected(world, "lepton-coordinator")
    a = connected(world, "cam-a")
    b = connected(world, "cam-b")
    b.subscribe(*[f for f, _ in T.device_subscriptions("cam-b")])
    coord.publish(T.desired("cam-b"), b"plan-b-retained", retain=True)
    a.subscribe(T.desired("cam-b"), T.acks("cam-b"), f"{T.prefix}/devices/+/placement/desired",
                f"{T.prefix}/devices/+/offload/cam-b/+", f"{T.prefix}/devices/cam-b/#", "#")
    coord.publish(T.desired("cam-b"), b"plan-b")
    coord.publish(T.acks("cam-b"), b"ack-b")
    a.publish(T.offload("cam-a", "cam-b", "digits"), b"input-for-b")
    assert b.wait_for(T.desired("cam-b"), b"plan-b") and b.wait_for(T.offload("cam-a", "cam-b", "digits"), b"input-for-b")
    coord.publish(T.desired("cam-a"), b"barrier")
    assert a.wait_for(T.desired("cam-a"), b"barrier")
    assert a.got(lambda m: "cam-b" in m[0] and not m[0].startswith(T.status("cam-a"))) == []
    coord.publish(T.desired("cam-b"), b"", retain=True)
    for p in (a, b, coord):
        p.close()


def test_offload_and_replies_reach_only_their_target(world):
    a, b = connected(world, "cam-a"), connected(world, "cam-b")
    a.subscribe(*[f for f, _ in T.device_subscriptions("cam-a")])
    b.subscribe(*[f for f, _ in T.device_subscriptions("cam-b")])
    a.publish(T.offload("cam-a", "cam-b", "digits"), b"frame")
    assert b.wait_for(T.offload("cam-a", "cam-b", "digits"), b"frame")
    b.publish(T.reply("cam-b", "cam-a"), b"answer")
    assert a.wait_for(T.reply("cam-b", "cam-a"), b"answer")
    a.close()
    b.close()


def test_spoofed_client_id_gives_no_access_and_does_not_kick_the_victim(world):
    coord = connected(world, "lepton-coordinator")
    coord.subscribe(*[f for f, _ in T.coordinator_subscriptions()])
    victim = connected(world, "cam-b", client_id="cam-b")
    victim.subscribe(T.desired("cam-b"))
    lay = world["fleet"].layout
    thief = Peer(world["broker"], lay.cert("cam-a"), lay.key("cam-a"), client_id="cam-b", username="cam-b")
    assert thief.connect()
    thief.subscribe(T.desired("cam-b"), T.acks("cam-b"))
    thief.publish(T.status("cam-b"), b"spoofed")
    thief.publish(T.result("cam-b", "door"), b"spoofed")
    coord.publish(T.desired("cam-b"), b"plan-b2")
    assert victim.wait_for(T.desired("cam-b"), b"plan-b2"), "the victim lost its session to the spoofer"
    thief.publish(T.result("cam-a", "barrier"), b"barrier")
    assert coord.wait_for(T.result("cam-a", "barrier"), b"barrier")
    assert coord.got(lambda m: m[1] == b"spoofed") == []
    assert thief.got(lambda m: "cam-b" in m[0]) == []
    for p in (thief, victim, coord):
        p.close()


def test_wildcards_in_ids_are_refused_by_provisioning_and_by_the_broker(world):
    fleet = world["fleet"]
    for bad in ("cam+1", "cam#", "+", "#", "a/b"):
        with pytest.raises(ConfigError, match="invalid device id"):
            fleet.add_device(bad)
    # A certificate with CN "+" signed by the fleet CA anyway (say, by hand):
    # with %u = "+" the offload pattern would match every device. Mosquitto must deny it.
    tmp = world["broker"].workdir
    key = pki.new_key()
    (tmp / "plus.key").write_bytes(pki.key_pem(key))
    (tmp / "plus.crt").write_bytes(pki.cert_pem(fleet.ca.issue(key.public_key(), "+", 1)))
    rogue = Peer(world["broker"], tmp / "plus.crt", tmp / "plus.key")
    if rogue.connect():
        rogue.subscribe(f"{T.prefix}/devices/+/offload/+/+", f"{T.prefix}/devices/+/replies/+", "#")
        a = connected(world, "cam-a")
        a.publish(T.offload("cam-a", "cam-b", "digits"), b"secret")
        a.publish(T.reply("cam-a", "cam-b"), b"secret")
        coord = connected(world, "lepton-coordinator")
        coord.publish(T.coordinator_status(), b"barrier")
        time.sleep(0.5)
        assert rogue.got(lambda m: m[1] == b"secret") == []
        rogue.close()
        a.close()
        coord.close()


def test_observer_reads_everything_and_writes_nothing(world):
    a = connected(world, "cam-a")
    a.subscribe(T.desired("cam-a"))
    ops = connected(world, "ops")
    ops.subscribe(T.everything())
    ops.publish(T.desired("cam-a"), b"from-observer")
    a.publish(T.telemetry("cam-a"), b"t1")
    assert ops.wait_for(T.telemetry("cam-a"), b"t1")
    coord = connected(world, "lepton-coordinator")
    coord.publish(T.desired("cam-a"), b"barrier")
    assert a.wait_for(T.desired("cam-a"), b"barrier")
    assert a.got(lambda m: m[1] == b"from-observer") == []
    for p in (a, ops, coord):
        p.close()


# --- revocation of a connected device, persistence ---------------------------------------------


def test_revoking_a_connected_device_cuts_it_off_after_a_reload(tmp_path):
    fleet = _make_fleet(tmp_path / "fleet")
    fleet.add_device("cam-a")
    fleet.add_device("cam-b")
    key_copy = tmp_path / "b.key"
    shutil.copy(fleet.layout.key("cam-b"), key_copy)
    broker = GeneratedBroker(fleet, tmp_path / "broker").start()
    try:
        w = {"fleet": fleet, "broker": broker}
        coord = connected(w, "lepton-coordinator")
        coord.subscribe(*[f for f, _ in T.coordinator_subscriptions()])
        b = connected(w, "cam-b")
        b.subscribe(T.desired("cam-b"))
        fleet.revoke("cam-b")
        assert not fleet.layout.key("cam-b").exists() and not fleet.layout.bundle("cam-b").exists()
        broker.reload()
        coord.publish(T.desired("cam-b"), b"after-revoke")
        b.publish(T.status("cam-b"), b"after-revoke")
        a = connected(w, "cam-a")
        a.publish(T.status("cam-a"), b"barrier")
        assert coord.wait_for(T.status("cam-a"), b"barrier")
        time.sleep(0.3)
        assert b.got(lambda m: m[1] == b"after-revoke") == []
        assert coord.got(lambda m: m[1] == b"after-revoke") == []
        assert not Peer(broker, fleet.layout.cert("cam-b"), key_copy).connect(timeout=3)
        for p in (a, b, coord):
            p.close()
    finally:
        broker.stop()


def test_rotated_out_certificates_are_refused_once_revoked_as_superseded(tmp_path):
    """A leaked coordinator key was good until its certificate expired (the coordinator could not be revoked).
    After --rotate and `revoke --superseded` the old key is refused and the new one works."""
    fleet = _make_fleet(tmp_path / "fleet")
    fleet.add_device("cam-a")
    old = {}
    for name in ("lepton-coordinator", "cam-a"):
        old[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        shutil.copy(fleet.layout.cert(name), old[name][0])
        shutil.copy(fleet.layout.key(name), old[name][1])
    fleet.update_coordinator(rotate=True)
    fleet.add_device("cam-a", rotate=True)
    broker = GeneratedBroker(fleet, tmp_path / "broker").start()
    try:
        for name in old:  # rotation alone leaves the old key valid
            assert Peer(broker, *old[name]).connect(timeout=3), name
        for name in old:
            assert fleet.revoke(name, superseded=True).action == "superseded certificates revoked"
        broker.reload()
        for name in old:
            assert not Peer(broker, *old[name]).connect(timeout=3), name
        w = {"fleet": fleet, "broker": broker}
        coord = connected(w, "lepton-coordinator")
        coord.subscribe(*[f for f, _ in T.coordinator_subscriptions()])
        dev = connected(w, "cam-a")
        dev.publish(T.status("cam-a"), b"rotated")
        assert coord.wait_for(T.status("cam-a"), b"rotated")
        dev.close()
        coord.close()
    finally:
        broker.stop()


def test_a_rotated_broker_certificate_and_renewed_crl_are_served_after_a_reload(tmp_path):
    """broker-config --rotate, then SIGHUP (what its hint says): the broker presents the new certificate,
    which devices (their bundles hold only the CA) trust; the renewed CRL still refuses what was revoked."""
    fleet = _make_fleet(tmp_path / "fleet")
    fleet.add_device("cam-a")
    fleet.add_device("cam-r")
    stolen = (tmp_path / "r.crt", tmp_path / "r.key")
    shutil.copy(fleet.layout.cert("cam-r"), stolen[0])
    shutil.copy(fleet.layout.key("cam-r"), stolen[1])
    fleet.revoke("cam-r")
    broker = GeneratedBroker(fleet, tmp_path / "broker").start()

    def served() -> bytes:
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw:
            ctx = ssl.create_default_context(cafile=str(fleet.layout.ca_cert))
            ctx.load_cert_chain(str(fleet.layout.cert("cam-a")), str(fleet.layout.key("cam-a")))
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.getpeercert(binary_form=True)

    def on_disk() -> bytes:
        return pki.load_cert(fleet.layout.broker_dir / "server.crt").public_bytes(Encoding.DER)

    try:
        old = on_disk()
        assert served() == old
        assert fleet.write_broker_files(rotate=True)
        assert on_disk() != old
        broker.reload()  # its config points at the fleet's broker/ directory: nothing to copy here
        assert served() == on_disk()
        w = {"fleet": fleet, "broker": broker}
        connected(w, "cam-a").close()
        assert not Peer(broker, *stolen).connect(timeout=3)
    finally:
        broker.stop()


def test_queued_messages_survive_a_broker_crash(tmp_path):
    """A SIGKILLed broker keeps the coordinator's queued results it had saved (every [broker] autosave_s)."""
    fleet = _make_fleet(tmp_path / "fleet", autosave_s=1)
    fleet.add_device("cam-a")
    broker = GeneratedBroker(fleet, tmp_path / "broker").start()
    w = {"fleet": fleet, "broker": broker}
    try:
        coord = connected(w, "lepton-coordinator", client_id="lepton-coordinator", clean=False)
        coord.subscribe(T.all_results())
        coord.close()
        a = connected(w, "cam-a")
        for i in range(20):
            a.publish(T.result("cam-a", "door"), str(i).encode())
        a.close()
        time.sleep(3.0)  # past one save (autosave_s=1; Mosquitto checks about once a second)
        broker.stop(signal.SIGKILL)
        broker.start()
        coord = connected(w, "lepton-coordinator", client_id="lepton-coordinator", clean=False)
        assert coord.wait_for(T.result("cam-a", "door"), b"19", timeout=10)
        assert len(coord.got(lambda m: m[0] == T.result("cam-a", "door"))) == 20
        coord.close()
    finally:
        broker.stop()


# --- the consumer in docs/protocol.md --------------------------------------------------------


def test_the_documented_consumer_gets_each_result_once_and_what_came_while_it_was_stopped(world, tmp_path):
    """The Python block of docs/protocol.md "Consuming results", run as written (only the fleet's paths, the
    broker's address and port replaced) with the fleet's observer identity against the generated config."""
    import queue
    import sys

    from lepton.protocol import encode
    from lepton.protocol import messages as m

    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    block = re.search(r"### Consuming results.*?```python\n(.*?)```", doc, re.S).group(1)
    lay, port = world["fleet"].layout, world["broker"].port
    places = {"fleet/ca/ca.crt": str(lay.ca_cert), "fleet/identities/ops/cert.pem": str(lay.cert("ops")),
              "fleet/identities/ops/key.pem": str(lay.key("ops")),
              '"broker.example.net", 8883': f'"127.0.0.1", {port}'}
    for placeholder, value in places.items():
        assert block.count(placeholder) == 1, placeholder
        block = block.replace(placeholder, value)
    script = tmp_path / "consumer.py"
    script.write_text(block)

    def start() -> tuple[subprocess.Popen, queue.Queue]:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True).start()
        return proc, lines

    def result(seq: int) -> bytes:
        now = time.time()
        return encode(m.Result(device="cam-a", stream="door", seq=seq, captured_at=now, inferred_at=now, infer_ms=1.0,
                               model=m.ModelId(name="digits-int8", version="1.0.0", sha256="0" * 64),
                               computed_on="cam-a", output={"top": [{"label": str(seq), "index": seq, "score": 0.5}]}))

    dev = connected(world, "cam-a")
    consumer, lines = start()
    try:
        deadline = time.monotonic() + 20
        while lines.empty() and time.monotonic() < deadline:  # until it has subscribed: the same result, again
            dev.publish(T.result("cam-a", "door"), result(1))
            time.sleep(0.2)
        assert lines.get(timeout=1) == "cam-a door 1 1 0.5", consumer.stderr.read() if consumer.poll() else ""
        dev.publish(T.result("cam-a", "door"), result(1))  # a re-send, as a device does when an ack is late
        dev.publish(T.result("cam-a", "door"), result(2))
        assert lines.get(timeout=10) == "cam-a door 2 2 0.5"  # the copy of 1 was skipped, not printed
        consumer.terminate()
        consumer.wait(10)
        time.sleep(0.3)
        dev.publish(T.result("cam-a", "door"), result(3))  # while it is stopped: its session queues it
        consumer, lines = start()
        line = lines.get(timeout=20)
        if line == "cam-a door 2 2 0.5":  # stopped before its ack of 2 went out: the broker sends it again, as
            line = lines.get(timeout=20)  # docs/protocol.md says (seen lives in memory)
        assert line == "cam-a door 3 3 0.5"
        with pytest.raises(queue.Empty):
            lines.get(timeout=0.5)
    finally:
        consumer.terminate()
        consumer.wait(10)
        dev.close()
        wipe = peer(world, "ops")  # a clean session ends the persistent one
        if wipe.connect():
            wipe.close()
