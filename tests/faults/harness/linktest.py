"""Measure a device link with real TCP: throughput each way, connect outcome, round trip.

The device side runs ``netprobe.py`` inside the namespace; the other side is
a socket in this process on the gateway address. Throughput is goodput (TCP
payload), measured from 10% of the transfer to its end so the token bucket's
first burst does not count; tbf counts Ethernet frames, so goodput is about
95% of the configured rate.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

from .netns import Host
from .netprobe import receive_timed

PROBE = str(Path(__file__).with_name("netprobe.py"))


def _probe(host: Host, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*host.exec_prefix(), sys.executable, PROBE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rate(marks: list, total: int) -> float:
    """Mbit/s between 10% of *total* and the end."""
    start = next((t, b) for t, b in marks if b >= 0.1 * total)
    end = marks[-1]
    if end[0] <= start[0]:
        raise RuntimeError("transfer too short to time")
    return (end[1] - start[1]) * 8 / (end[0] - start[0]) / 1e6


def upload_mbps(host: Host, nbytes: int) -> float:
    """Goodput from the device to the gateway, Mbit/s."""
    with socket.socket() as srv:
        srv.bind((host.gateway, 0))
        srv.listen(1)
        srv.settimeout(30)
        proc = _probe(host, "send", host.gateway, str(srv.getsockname()[1]), str(nbytes))
        try:
            conn, _ = srv.accept()
            with conn:
                result = receive_timed(conn)
        finally:
            _finish(proc)
    return _rate(result["marks"], result["received"])


def download_mbps(host: Host, nbytes: int, port: int = 45000) -> float:
    """Goodput from the gateway to the device, Mbit/s."""
    proc = _probe(host, "recv", host.ip, str(port))
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "{}")
        if not ready.get("listening"):
            raise RuntimeError(f"probe receiver did not start: {proc.stderr.read() if proc.stderr else ''}")
        sender = threading.Thread(target=_send, args=(host.ip, port, nbytes), name="linktest-send", daemon=True)
        sender.start()
        result = json.loads(proc.stdout.readline())
        sender.join(30)
    finally:
        _finish(proc)
    return _rate(result["marks"], result["received"])


def _send(ip: str, port: int, nbytes: int) -> None:
    chunk = b"\0" * 65536
    with socket.create_connection((ip, port), timeout=30) as s:
        left = nbytes
        while left > 0:
            left -= s.send(chunk[: min(left, len(chunk))])


def _finish(proc: subprocess.Popen) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def throughput(host: Host, mbps: float, seconds: float = 1.0, attempts: int = 3,
               tolerance: float = 0.15) -> dict[str, float]:
    """Measure both directions with transfers sized to last about *seconds* at *mbps*.

    A busy machine can only slow a transfer below the tbf rate, never above,
    so a direction is measured again (up to *attempts* times) while it is
    off by more than *tolerance*; the value closest to *mbps* is returned.
    """
    nbytes = max(int(mbps * 1e6 / 8 * seconds), 200_000)
    out = {}
    for key, measure in (("up_mbps", upload_mbps), ("down_mbps", download_mbps)):
        values = []
        for _ in range(attempts):
            values.append(measure(host, nbytes))
            if abs(values[-1] - mbps) <= tolerance * mbps:
                break
        out[key] = min(values, key=lambda v: abs(v - mbps))
    return out


def connect_outcome(host: Host, ip: str, port: int, timeout: float = 1.0) -> dict:
    """One TCP connect from inside the namespace: {"outcome": ok|timeout|refused|reset|..., "elapsed": s}."""
    proc = _probe(host, "connect", ip, str(port), str(timeout))
    out, err = proc.communicate(timeout=timeout + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"connect probe failed: {err.strip()}")
    return json.loads(out)


def echo_rtts(host: Host | None, ip: str, port: int, count: int = 10, size: int = 64) -> list[float]:
    """Round trips (ms) of *size*-byte messages to an echo server, from the namespace (or here if host is None)."""
    if host is None:
        cmd = [sys.executable, PROBE, "echo", ip, str(port), str(count), str(size)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    else:
        proc = _probe(host, "echo", ip, str(port), str(count), str(size))
        out, _ = proc.communicate(timeout=60)
    return json.loads(out)["rtts_ms"]


class EchoServer:
    """A TCP echo server in this process (one named thread per connection)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self._thread = threading.Thread(target=self._accept, name="echo-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="echo-conn", daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
