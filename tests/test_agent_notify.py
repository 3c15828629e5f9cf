"""sd_notify over a real unix datagram socket: READY, STATUS, and a watchdog that a stuck pipeline silences."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from lepton.agent.config import StreamConfig
from lepton.agent.notify import Notifier, Watchdog
from lepton.agent.pipeline import StreamPipeline, Window
from lepton.agent.sources import build_source
from lepton.models.runner import ModelRunner
from lepton.protocol import Topics

DATA = Path(__file__).parent / "data"


class NotifySocket:
    """The systemd end: a datagram socket that records what it receives."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def drain(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        got = []
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append((time.monotonic(), data))
            got.append(data)
        return got

    def close(self) -> None:
        self.sock.close()


def test_no_notify_socket_is_a_quiet_no_op():
    notifier = Notifier(environ={})
    assert not notifier.enabled and notifier.ready("up") is False and notifier.watchdog_s is None


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_and_status_reach_the_socket(tmp_path, abstract):
    name = f"lepton-test-{uuid.uuid4().hex[:8]}"
    address, env = ("\0" + name, "@" + name) if abstract else (str(tmp_path / "notify"), str(tmp_path / "notify"))
    receiver = NotifySocket(address)
    try:
        notifier = Notifier(environ={"NOTIFY_SOCKET": env})
        assert notifier.ready("1 stream(s), broker connected")
        assert notifier.status("outbox 3")
        got = receiver.drain(0.3)
        assert got[0] == "READY=1\nSTATUS=1 stream(s), broker connected" and got[1] == "STATUS=outbox 3"
    finally:
        receiver.close()


def test_watchdog_for_another_pid_is_ignored():
    assert Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000"}).watchdog_s == 1.0


def test_watchdog_pings_stop_while_a_pipeline_is_stuck_and_resume_after(tmp_path):
    receiver = NotifySocket(str(tmp_path / "notify"))
    stop = threading.Event()
    source = build_source({"id": "cam0", "type": "synthetic", "pattern": "noise", "fps": 100, "width": 16, "height": 12})
    runner = ModelRunner(DATA / "dense_uint8.tflite", {"kind": "image"}, {"kind": "classification"}, name="dense")
    results = []
    pipeline = StreamPipeline(StreamConfig(id="s1", source="cam0", model="dense"), "dev1", Topics(), source, runner,
                              results.append, lambda name: Window(60), workers=1, stall_s=0.5)
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "100000"})
    watchdog = Watchdog(notifier, lambda: (pipeline.healthy(), "stuck"))
    try:
        source.start(stop)
        pipeline.start(stop)
        watchdog.start(stop)
        assert receiver.drain(0.5).count("WATCHDOG=1") >= 3 and results
        runner._lock.acquire()  # the interpreter hangs: the worker blocks inside invoke
        try:
            receiver.drain(0.8)  # the stall is noticed after stall_s
            stuck = receiver.drain(1.0)
            assert "WATCHDOG=1" not in stuck
            assert not pipeline.healthy()
        finally:
            runner._lock.release()
        assert receiver.drain(0.5).count("WATCHDOG=1") >= 2 and pipeline.healthy()
    finally:
        stop.set()
        source.close()
        pipeline.join(2)
        watchdog.join()
        receiver.close()
