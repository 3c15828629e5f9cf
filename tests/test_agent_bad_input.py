"""Bad input to a running agent: one clear line naming the cause; retry what can come back, exit on what cannot."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from lepton.broker import MosquittoBroker, mosquitto_binary
from lepton.protocol import Topics
from test_agent_process import NOISE, agents, online, start  # noqa: F401  (fixtures)
from test_agent_standins import AgentProcess, Consumer, agent_config, wait_for
from test_sources import write_video


def log_lines(agent: AgentProcess, needle: str) -> list[str]:
    return [line for line in agent.log_tail(400).splitlines() if needle in line]


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd is not installed")
def test_refused_credentials_are_named_and_retried_until_the_broker_accepts(tmp_path, prefix, agents):
    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "other", "x"], check=True)
    broker = MosquittoBroker(tmp_path / "broker", allow_anonymous=False, extra_conf=f"password_file {passwords}")
    with broker:
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        cfg = agent_config(tmp_path, broker.port, prefix, sources=NOISE)
        cfg["broker"].update(username="dev1", password_file=str(secret), ready_timeout_s=1)
        agent = start(agents, cfg, tmp_path)
        refused = wait_for(lambda: log_lines(agent, "ERROR"), 15, "the refusal in the log")
        assert "refused the connection: Not authorized" in refused[0]
        assert "check broker.username / broker.password_file" in refused[0]
        time.sleep(1.5)
        assert agent.proc.poll() is None, "a refused login is retried, not fatal"
        assert len(log_lines(agent, "ERROR")) == 1, "one line per state change, not per retry"
        # The operator fixes the broker: the agent gets in without a restart.
        subprocess.run(["mosquitto_passwd", "-b", str(passwords), "dev1", "s3cret"], check=True)
        broker.proc.send_signal(signal.SIGHUP)
        consumer = Consumer(broker.port, Topics(prefix), tmp_path / "c.db")
        consumer.client.username_pw_set("other", "x")
        consumer.start()
        try:
            online(consumer, agent, timeout=20)
        finally:
            consumer.close()


def test_missing_camera_is_named_and_the_agent_keeps_running(broker, prefix, tmp_path, agents):
    camera = [{"id": "cam0", "type": "camera", "device": str(tmp_path / "video9"), "reconnect_s": 0.5,
               "reconnect_max_s": 0.5}]
    consumer = Consumer(broker.port, Topics(prefix), tmp_path / "c.db").start()
    try:
        cfg = agent_config(tmp_path, broker.port, prefix, sources=camera, telemetry={"interval_s": 1.0, "version": 2})
        agent = start(agents, cfg, tmp_path)
        online(consumer, agent)
        lines = wait_for(lambda: log_lines(agent, "cannot open"), 15, "the camera error")
        assert "video9" in lines[0]
        time.sleep(1.0)
        assert agent.proc.poll() is None and len(log_lines(agent, "cannot open")) == 1
        # The fleet sees it too: the device's telemetry (v2) says the source is not connected and never gave a frame.
        down = wait_for(lambda: [t.sources["cam0"] for t in consumer.telemetry if "cam0" in t.sources], 10,
                        "telemetry naming the source")[-1]
        assert not down.connected and down.frames_in == 0 and down.last_frame_s is None
        write_video(tmp_path / "clip.avi")
        os.replace(tmp_path / "clip.avi", tmp_path / "video9")  # the camera appears: the next retry opens it
        up = wait_for(lambda: [t.sources["cam0"] for t in consumer.telemetry[-1:]
                               if t.sources["cam0"].frames_in > 0], 15, "telemetry of the source giving frames")[-1]
        assert up.last_frame_s is not None and up.last_frame_s < 5.0
    finally:
        consumer.close()


def test_a_model_that_does_not_verify_exits_non_zero_naming_it(broker, prefix, tmp_path):
    from lepton.models.registry import default_registry

    entry = default_registry().get("digits-int8")
    registry = tmp_path / "registry"
    shutil.copytree(entry.directory, registry / "digits-int8")
    model = registry / "digits-int8" / entry.path.name
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    cfg = agent_config(tmp_path, broker.port, prefix, sources=NOISE)
    cfg["models"] = {"dir": str(registry), "trusted_keys": [str(k) for k in default_registry().trusted_keys]}
    agent = AgentProcess(cfg, tmp_path).start()
    assert agent.wait(30) == 1
    lines = [line for line in agent.log_tail(50).splitlines() if line.startswith("lepton: error:")]
    assert len(lines) == 1 and "digits-int8" in lines[0], agent.log_tail()


def test_garbage_on_subscribed_topics_is_logged_and_changes_nothing(broker, prefix, tmp_path, agents):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from lepton.protocol import encode
    from lepton.protocol import messages as m

    topics = Topics(prefix)
    consumer = Consumer(broker.port, topics, tmp_path / "c.db", ack=False).start()
    try:
        agent = start(agents, agent_config(tmp_path, broker.port, prefix, sources=NOISE), tmp_path)
        online(consumer, agent)
        wait_for(lambda: len(consumer.seqs("dev1")) >= 5, 20, "results")
        garbage = [
            (topics.acks("dev1"), b"{not json"),
            (topics.acks("dev1"), encode(m.Ack(device="dev2", seq=2**62))),  # someone else's ack, above every seq
            (topics.acks("dev1"), b'{"v":1,"device":"dev1","seq":-5}'),
            (topics.desired("dev1"), b'{"v":1,"device":"dev1","generation":1,"ts":NaN}'),
            (topics.coordinator_status(), b'{"v":1,"state":"online","ts":1,"extra":1}'),
            (topics.acks("dev1"), b"[" * 40 + b"]" * 40),
            (topics.acks("dev1"), b"x" * 300_000),
        ]
        sender = mqtt.Client(CallbackAPIVersion.VERSION2)
        sender.connect("127.0.0.1", broker.port)
        sender.loop_start()
        for topic, payload in garbage:
            sender.publish(topic, payload, qos=1).wait_for_publish(5)
        lines = wait_for(lambda: len(log_lines(agent, "invalid message")) >= len(garbage) and
                         log_lines(agent, "invalid message"), 10, "a line per bad message")
        assert len(lines) == len(garbage) and all("\n" not in line for line in lines)
        _, counters, held = agent.outbox_state()
        first = counters["first_seq"]
        assert counters["acked"] == 0 and held[0] == first, "a bad or foreign ack deleted something"
        sender.publish(topics.acks("dev1"), encode(m.Ack(device="dev1", seq=first + 2)), qos=1).wait_for_publish(5)
        wait_for(lambda: agent.outbox_state()[1]["acked"] == first + 2, 10, "a good ack to apply")
        assert agent.proc.poll() is None
        sender.disconnect()
        sender.loop_stop()
    finally:
        consumer.close()


def test_tls_with_a_client_certificate_connects_and_bad_tls_files_stop_start_up(tmp_path, prefix, agents):
    from lepton.broker import TLSFiles
    from lepton.provisioning.pki import CA, cert_pem, key_pem, new_key

    if not mosquitto_binary():
        pytest.skip("mosquitto is not installed")
    ca = CA.create("test fleet", 30)
    files = {}
    for name, cn, servers in (("server", "broker", ("127.0.0.1", "localhost")), ("dev1", "dev1", ())):
        key = new_key()
        files[name] = (tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        files[name][0].write_bytes(cert_pem(ca.issue(key.public_key(), cn, 30, server_names=servers)))
        files[name][1].write_bytes(key_pem(key))
    (tmp_path / "ca.crt").write_bytes(cert_pem(ca.cert))
    tls = TLSFiles(tmp_path / "ca.crt", *files["server"])
    with MosquittoBroker(tmp_path / "broker", tls=tls) as broker:
        cfg = agent_config(tmp_path, broker.port, prefix, sources=NOISE)
        cfg["broker"].update(tls_ca=str(tmp_path / "ca.crt"), tls_cert=str(files["dev1"][0]),
                             tls_key=str(files["dev1"][1]))
        agent = start(agents, cfg, tmp_path)
        wait_for(lambda: log_lines(agent, "connected to broker"), 20, "a TLS connection")
        assert not log_lines(agent, "ERROR")
        agent.stop()
        # A certificate from another CA: the broker closes the connection with no CONNACK, and the agent
        # says which file to look at, and keeps retrying (a renewed certificate can come back).
        other = CA.create("another fleet", 30)
        key = new_key()
        (tmp_path / "foreign.crt").write_bytes(cert_pem(other.issue(key.public_key(), "dev1", 30)))
        (tmp_path / "foreign.key").write_bytes(key_pem(key))
        foreign = dict(cfg, broker=dict(cfg["broker"], tls_cert=str(tmp_path / "foreign.crt"),
                                        tls_key=str(tmp_path / "foreign.key")))
        agent = start(agents, foreign, tmp_path)
        errors = wait_for(lambda: log_lines(agent, "ERROR"), 20, "the refusal in the log")
        assert "closed the connection before accepting it: is this device's certificate from the broker's CA" \
            in errors[0], errors
        assert agent.proc.poll() is None
        agent.stop()
        cfg["broker"]["tls_key"] = str(tmp_path / "missing.key")
        bad = AgentProcess(cfg, tmp_path).start()
        assert bad.wait(30) == 2
        errors = [line for line in bad.log_tail().splitlines() if line.startswith("lepton: error:")]
        assert len(errors) == 1 and "broker.tls_key" in errors[0] and "missing.key" in errors[0], errors
        # Worded as --check-config words it: the config file first, then the key.
        assert errors[0].startswith(f"lepton: error: config {bad.path}: broker.tls_key"), errors
