"""Fault-plan rows 8 and 9: who gets into the broker and what reaches whom, counted at the receivers.

The broker runs `lepton provision`'s generated mosquitto.conf (TLS with
per-device certificates, ``use_identity_as_username``, ``%u`` ACL patterns,
CRL) under the harness. MQTT 3.1.1 answers a denied publish with a normal
PUBACK, so every verdict is taken where the message would arrive; a barrier
message sent after the forbidden ones on the same connection shows they had
their chance, and a legitimate copy of every secret reaching its addressee
shows the receivers were listening.

The part-level checks of the same rules are in tests/test_provision_broker.py
(its ``Peer`` client is reused here); these rows run the whole matrix over
three devices and report the counts.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("lepton.provisioning.fleet", reason="provisioning is not built into this install")

from test_provision_broker import Peer  # noqa: E402

from lepton.errors import ConfigError  # noqa: E402
from lepton.protocol import Topics  # noqa: E402
from lepton.provisioning import pki as pkimod  # noqa: E402
from lepton.provisioning.fleet import Fleet as PkiFleet  # noqa: E402
from lepton.provisioning.settings import new_settings  # noqa: E402

from .harness.clients import ConnectRefused  # noqa: E402

MODEL = "digits"
SETTLE_S = 0.3  # after a barrier: deliveries to other subscribers of the same broker pass are done by then


@dataclass
class World:
    """A provisioned fleet, a foreign one, and the generated broker running under the harness."""

    fleet: object  # the harness Fleet
    pki: PkiFleet
    foreign: PkiFleet
    stolen: Path  # cert.pem + key.pem of a device revoked afterwards (the thief kept them)
    topics: Topics
    peers: list[Peer] = field(default_factory=list)

    def peer(self, name: str, cert: Path | None = None, key: Path | None = None, **kw) -> Peer:
        lay = self.pki.layout
        p = Peer(self.fleet.broker, cert or lay.cert(name), key or lay.key(name), ca=lay.ca_cert, **kw)
        self.peers.append(p)
        return p

    def connected(self, name: str, subscribe: list[str] = (), **kw) -> Peer:
        p = self.peer(name, **kw)
        assert p.connect(), f"{name} could not connect:\n{self.fleet.broker.log_tail(20)}"
        if subscribe:
            p.subscribe(*subscribe)
        return p

    def close(self) -> None:
        for p in self.peers:
            try:
                p.close()
            except Exception:  # already closed or never connected
                pass
        self.peers.clear()


def provisioned(fleet, extra: bool = False) -> World:
    """`lepton provision` for the harness fleet's devices (+ observer "ops"); with *extra*, also an
    expired device, a revoked one whose key was copied first, and a foreign fleet. Starts the broker."""
    root = fleet.root / "pki"
    pki, _ = PkiFleet.create(root, new_settings(root, [fleet.gateway], prefix=fleet.prefix))
    for dev in fleet.devices:
        pki.add_device(dev)
    pki.add_observer("ops")
    stolen = fleet.root / "stolen"
    foreign = pki
    if extra:
        pki.add_device("dev-old", days=1, not_before=pkimod.utcnow() - dt.timedelta(days=10))
        pki.add_device("dev-r")
        stolen.mkdir()
        shutil.copy(pki.layout.key("dev-r"), stolen / "key.pem")
        shutil.copy(pki.layout.cert("dev-r"), stolen / "cert.pem")
        pki.revoke("dev-r")
        froot = fleet.root / "foreign"
        foreign, _ = PkiFleet.create(froot, new_settings(froot, [fleet.gateway], prefix=fleet.prefix))
        foreign.add_device(fleet.devices[0])
    fleet.start_generated_broker(pki.layout.broker_dir / "mosquitto.conf")
    return World(fleet, pki, foreign, stolen, Topics(fleet.prefix))


def _barrier(sender: Peer, receiver: Peer, topic: str, label: str) -> None:
    """*sender* publishes on *topic*; wait until *receiver* has it, then a little more."""
    sender.publish(topic, label.encode())
    assert receiver.wait_for(topic, label.encode()), f"barrier {label} did not arrive"
    time.sleep(SETTLE_S)


def _count(peers, prefix: bytes) -> int:
    return sum(len(p.got(lambda m: m[1].startswith(prefix))) for p in peers)


# --- row 8 -----------------------------------------------------------------------------------------


def forged_topics(t: Topics, attacker: str, victim: str, devices: list[str]) -> list[tuple[str, str]]:
    """(kind, topic): everything *attacker* must not write for *victim*: the victim's own topics, what the
    victim would send to others, and what only the coordinator sends to the victim."""
    others = [d for d in devices if d != victim]
    return ([("status", t.status(victim)), ("telemetry", t.telemetry(victim)), ("reported", t.reported(victim)),
             ("result", t.result(victim, "s0")), ("desired", t.desired(victim)), ("acks", t.acks(victim))]
            + [(f"offload>{x}", t.offload(victim, x, MODEL)) for x in others]
            + [(f"reply>{x}", t.reply(victim, x)) for x in others])


def stolen_filters(t: Topics, victim: str) -> list[str]:
    """Subscriptions that would read what is addressed to *victim*."""
    p = t.prefix
    return [t.desired(victim), t.acks(victim), f"{p}/devices/+/offload/{victim}/+", f"{p}/devices/+/replies/{victim}",
            f"{p}/devices/{victim}/#"]


WIDE_FILTERS = ["#", "{p}/#", "{p}/devices/+/placement/desired", "{p}/devices/+/acks", "{p}/devices/+/offload/+/+",
                "{p}/devices/+/replies/+", "{p}/devices/+/+/+/+"]


def send_secrets(w: World, coord: Peer, peers: dict[str, Peer], victim: str) -> int:
    """Everything legitimately addressed to *victim* (coordinator: desired, acks; every other device: an
    offload input and a reply), each payload "secret <victim> ..."; returns how many."""
    t, n = w.topics, 0
    for kind, topic in (("desired", t.desired(victim)), ("acks", t.acks(victim))):
        coord.publish(topic, f"secret {victim} {kind}".encode())
        n += 1
    for x, sender in peers.items():
        if x != victim:
            sender.publish(t.offload(x, victim, MODEL), f"secret {victim} offload from {x}".encode())
            sender.publish(t.reply(x, victim), f"secret {victim} reply from {x}".encode())
            n += 2
    return n


def leaked_to(p: Peer, me: str) -> list[tuple[str, bytes]]:
    """Secrets addressed to someone else that *p* (identity *me*) received."""
    return p.got(lambda m: m[1].startswith(b"secret ") and not m[1].startswith(f"secret {me} ".encode()))


@pytest.mark.row(8, "cross-device ACL matrix (generated config)")
def test_cross_device_acl_matrix(fleet_factory, figures, long_run):
    fleet = fleet_factory(devices=3, netns=False)
    w = provisioned(fleet)
    t, devs = w.topics, fleet.devices
    try:
        ops = w.connected("ops", [t.everything()])
        coord = w.connected(w.pki.settings.coordinator, [f for f, _ in t.coordinator_subscriptions()])
        peers = {d: w.connected(d, [f for f, _ in t.device_subscriptions(d)]) for d in devs}
        forged, forged_delivered = publish_matrix(w, ops, coord, peers, rounds=5 if long_run else 1)
        reads = subscribe_matrix(w, coord, peers)
        w.close()
        spoof = spoof_matrix(w, devs)
        wild = wildcard_ids(w, devs)
    finally:
        w.close()
    deliveries = forged_delivered + reads["leaked"] + spoof["forged_delivered"] + spoof["leaked"] + wild["rogue_leaked"]
    figures.update(deliveries=deliveries, pairs=len(devs) * (len(devs) - 1), forged_publishes=forged,
                   forged_delivered=forged_delivered, **reads,
                   **{f"spoof_{k}": v for k, v in spoof.items()}, **wild)
    assert reads["secrets_to_addressee"] == reads["secrets"], "a legitimate message did not reach its addressee"
    assert forged_delivered == 0 and reads["leaked"] == 0
    assert spoof["forged_delivered"] == 0 and spoof["leaked"] == 0 and spoof["victims_kicked"] == 0
    assert spoof["victims_served"] == spoof["attempts"]
    assert wild["wildcard_ids_refused"] == wild["wildcard_ids"] and wild["rogue_leaked"] == 0


def publish_matrix(w: World, ops: Peer, coord: Peer, peers: dict[str, Peer], rounds: int) -> tuple[int, int]:
    """Every device publishes under every other device's topics and as the coordinator; (publishes, how many
    of them reached anyone: the observer, the coordinator or a device)."""
    t, devs, forged = w.topics, list(peers), 0
    for r in range(rounds):
        for a in devs:
            for b in (b for b in devs if b != a):
                for kind, topic in forged_topics(t, a, b, devs):
                    peers[a].publish(topic, f"forged {a}->{b} {kind} {r}".encode())
                    forged += 1
            peers[a].publish(t.coordinator_status(), f"forged {a}->coordinator status {r}".encode())
            forged += 1
            _barrier(peers[a], ops, t.result(a, "barrier"), f"barrier {a} {r}")
    return forged, _count([ops, coord, *peers.values()], b"forged ")


def subscribe_matrix(w: World, coord: Peer, peers: dict[str, Peer]) -> dict[str, int]:
    """Every device subscribes to what is addressed to the others (and to wide filters); then everything
    addressed to each device is sent. Counts what reached its addressee and what leaked to anyone else."""
    t, devs, filters, secrets = w.topics, list(peers), 0, 0
    for a in devs:
        wanted = [f for b in devs if b != a for f in stolen_filters(t, b)]
        wanted += [f.format(p=t.prefix) for f in WIDE_FILTERS]
        peers[a].subscribe(*wanted)
        filters += len(wanted)
    for b in devs:
        secrets += send_secrets(w, coord, peers, b)
    for a in devs:
        _barrier(coord, peers[a], t.desired(a), f"barrier desired {a}")
    to_addressee = sum(len(peers[b].got(lambda m, b=b: m[1].startswith(f"secret {b} ".encode()))) for b in devs)
    return {"stolen_filters": filters, "secrets": secrets, "secrets_to_addressee": to_addressee,
            "leaked": sum(len(leaked_to(peers[a], a)) for a in devs)}


def spoof_matrix(w: World, devs: list[str]) -> dict[str, int]:
    """For every ordered pair: A's certificate presenting B's client id and username while B is connected.
    The broker must treat it as A: B keeps its session, nothing forged under B arrives, nothing of B's leaks."""
    t = w.topics
    out = {"attempts": 0, "accepted_as_self": 0, "forged_delivered": 0, "leaked": 0, "victims_kicked": 0,
           "victims_served": 0}
    ops = w.connected("ops", [t.everything()])
    coord = w.connected(w.pki.settings.coordinator, [f for f, _ in t.coordinator_subscriptions()])
    for a in devs:
        for b in devs:
            if a == b:
                continue
            out["attempts"] += 1
            victim = w.connected(b, [f for f, _ in t.device_subscriptions(b)], client_id=b)
            lay = w.pki.layout
            thief = w.peer(a, lay.cert(a), lay.key(a), client_id=b, username=b)
            if not thief.connect():
                victim.close()
                continue
            out["accepted_as_self"] += 1
            thief.subscribe(*stolen_filters(t, b), t.desired(a))
            for kind, topic in forged_topics(t, b, b, devs)[:6]:
                thief.publish(topic, f"forged spoof {a}->{b} {kind}".encode())
            coord.publish(t.desired(b), f"secret {b} spoofed-pair {a}".encode())
            coord.publish(t.acks(b), f"secret {b} spoofed-pair {a} acks".encode())
            _barrier(thief, ops, t.result(a, "barrier"), f"barrier spoof {a} {b}")
            _barrier(coord, thief, t.desired(a), f"barrier spoof desired {a} {b}")
            out["forged_delivered"] += _count([ops, coord, victim], b"forged spoof ")
            out["leaked"] += len(leaked_to(thief, a))
            out["victims_kicked"] += int(victim.dropped)
            out["victims_served"] += int(victim.wait_for(t.desired(b), f"secret {b} spoofed-pair {a}".encode(), 2))
            thief.close()
            victim.close()
    return out


def wildcard_ids(w: World, devs: list[str]) -> dict[str, int]:
    """Ids with MQTT wildcards: provisioning refuses them; a certificate with such a CN signed by the fleet
    CA anyway (by hand) gets nothing addressed to a device, whatever it subscribes to."""
    bad_ids = ["dev+1", "dev#", "+", "#", "dev/1"]
    refused = 0
    for bad in bad_ids:
        try:
            w.pki.add_device(bad)
        except ConfigError:
            refused += 1
    t = w.topics
    coord = w.connected(w.pki.settings.coordinator)
    peers = {d: w.connected(d) for d in devs}
    rogues, accepted, leaked = ["+", "#", "dev-1/#"], 0, 0
    tmp = w.fleet.root / "rogue"
    tmp.mkdir(exist_ok=True)
    for i, cn in enumerate(rogues):
        key = pkimod.new_key()
        (tmp / f"{i}.key").write_bytes(pkimod.key_pem(key))
        (tmp / f"{i}.crt").write_bytes(pkimod.cert_pem(w.pki.ca.issue(key.public_key(), cn, 1)))
        rogue = w.peer(cn, tmp / f"{i}.crt", tmp / f"{i}.key")
        if not rogue.connect():
            continue
        accepted += 1
        p = t.prefix
        rogue.subscribe("#", f"{p}/#", f"{p}/devices/+/offload/+/+", f"{p}/devices/+/replies/+",
                        f"{p}/devices/+/placement/desired", f"{p}/devices/+/acks")
        for b in devs:
            send_secrets(w, coord, peers, b)
        ops = w.connected("ops", [t.coordinator_status()])
        _barrier(coord, ops, t.coordinator_status(), f"barrier rogue {i}")
        leaked += len(rogue.got(lambda m: m[1].startswith(b"secret ")))
        rogue.close()
        ops.close()
    return {"wildcard_ids": len(bad_ids), "wildcard_ids_refused": refused, "rogue_certs": len(rogues),
            "rogue_accepted": accepted, "rogue_leaked": leaked}


# --- row 9 -----------------------------------------------------------------------------------------


def _attempt(fleet, client_id: str, ca: Path, cert: Path | None, key: Path | None) -> str:
    """"accepted", "refused" or "no answer" for one TLS connection attempt."""
    try:
        client = fleet.mqtt_client(client_id, tls_ca=str(ca), tls_cert=str(cert or ""), tls_key=str(key or ""),
                                   timeout=5)
    except ConnectRefused:
        return "refused"
    except (TimeoutError, OSError):
        return "no answer"
    client.disconnect()
    client.loop_stop()
    return "accepted"


@pytest.mark.row(9, "bad identities (no cert/CA/expired/revoked)")
def test_bad_identities_are_refused(fleet_factory, figures, long_run):
    fleet = fleet_factory(devices=1, netns=False)
    w = provisioned(fleet, extra=True)
    lay, dev = w.pki.layout, fleet.devices[0]
    ca = lay.ca_cert
    tries = 20 if long_run else 3
    cases = {
        "no_cert": (None, None),
        "foreign_ca": (w.foreign.layout.cert(dev), w.foreign.layout.key(dev)),
        "expired": (lay.cert("dev-old"), lay.key("dev-old")),
        "revoked": (w.stolen / "cert.pem", w.stolen / "key.pem"),
    }
    assert pkimod.load_cert(lay.cert("dev-old")).not_valid_after_utc < pkimod.utcnow()
    outcomes: dict[str, dict[str, int]] = {}
    for name, (cert, key) in {**cases, "good": (lay.cert(dev), lay.key(dev))}.items():
        client_id = {"expired": "dev-old", "revoked": "dev-r"}.get(name, dev)
        seen = outcomes.setdefault(name, {})
        for _ in range(tries):
            verdict = _attempt(fleet, client_id, ca, cert, key)
            seen[verdict] = seen.get(verdict, 0) + 1
    plain = _plain_attempt(fleet)
    agent = _agent_with_revoked_identity(w) if _agent_available() else {"agent_online": "skipped"}
    bad_accepted = sum(o.get("accepted", 0) for n, o in outcomes.items() if n != "good") + int(plain == "accepted")
    figures.update(accepted=bad_accepted, attempts=tries * len(cases) + 1,
                   **{f"{n}_refused": o.get("refused", 0) for n, o in outcomes.items() if n != "good"},
                   plain_mqtt=plain, good_accepted=outcomes["good"].get("accepted", 0), **agent)
    assert outcomes["good"] == {"accepted": tries}, "a good identity must get in (else refusals prove nothing)"
    assert bad_accepted == 0, outcomes
    assert all(outcomes[n] == {"refused": tries} for n in cases), outcomes
    if agent["agent_online"] != "skipped":
        assert agent["agent_online"] == 0 and agent["agent_alive"] == 1, agent
        assert agent["agent_error_lines"] == 1, f"the agent must name the refusal once, not per retry: {agent}"


def _plain_attempt(fleet) -> str:
    """Plain MQTT (no TLS) on the TLS listener."""
    try:
        client = fleet.mqtt_client("plain", timeout=3)
    except (ConnectRefused, TimeoutError, OSError):
        return "refused"
    client.disconnect()
    client.loop_stop()
    return "accepted"


def _agent_available() -> bool:
    try:
        import lepton.agent.cli  # noqa: F401
    except ImportError:
        return False
    return True


def _agent_with_revoked_identity(w: World, watch_s: float = 4.0) -> dict:
    """A real agent given the stolen (revoked) identity: it must never be online; its log names the refusal."""
    fleet, lay = w.fleet, w.pki.layout
    tls = {"tls_ca": str(lay.ca_cert), "tls_cert": str(lay.cert("ops")), "tls_key": str(lay.key("ops"))}
    counter = fleet.start_counter(devices=["dev-r"], **tls)
    broker = {"tls_ca": str(lay.ca_cert), "tls_cert": str(w.stolen / "cert.pem"),
              "tls_key": str(w.stolen / "key.pem"), "ready_timeout_s": 1}
    proc = fleet.procs.add("dev-r", _agent_cmd(fleet, "dev-r", broker))
    time.sleep(watch_s)
    online = counter.seen_status("dev-r", "online", 0.0, live_only=False)
    lines = [ln for ln in proc.log_text().splitlines() if " ERROR " in ln and "certificate" in ln]
    running = proc.running
    fleet.stop("dev-r")
    return {"agent_online": int(bool(online)), "agent_alive": int(running), "agent_error_lines": len(lines),
            "agent_reason": (lines[0].split(": ", 1)[-1][:90] if lines else "")}


def _agent_cmd(fleet, device: str, broker: dict) -> list[str]:
    from .harness import configs
    from .harness.procs import lepton_cmd

    data = fleet.agent_config(device, rate_hz=2.0, overrides={"broker": broker})
    path = configs.write_toml(fleet.agent_config_path(device), data)
    return lepton_cmd("agent", "--config", str(path))
