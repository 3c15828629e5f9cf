"""A tiny network probe run inside a test namespace (`ip netns exec NS python3 netprobe.py ...`).

Standalone on purpose (stdlib only, no lepton import) so it starts in tens of
milliseconds. Every command prints one JSON line on stdout.

    netprobe.py send HOST PORT NBYTES        send NBYTES, then close
    netprobe.py recv HOST PORT               accept one connection, read to EOF, report timing
    netprobe.py connect HOST PORT TIMEOUT    try one TCP connect: ok / timeout / refused / reset / error
    netprobe.py echo HOST PORT COUNT SIZE    COUNT round trips of SIZE bytes, report RTTs (ms)
"""

from __future__ import annotations

import errno
import json
import socket
import sys
import time


def _report(**fields) -> None:
    print(json.dumps(fields), flush=True)


def send(host: str, port: int, nbytes: int) -> None:
    chunk = b"\0" * 65536
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=60) as s:
        left = nbytes
        while left > 0:
            n = s.send(chunk[: min(left, len(chunk))])
            left -= n
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # wait for the receiver to close: all bytes arrived
    _report(sent=nbytes, elapsed=time.monotonic() - t0)


def receive_timed(conn: socket.socket) -> dict:
    """Read to EOF; note when each byte count was reached, to skip the token bucket's first burst."""
    marks: list[tuple[float, int]] = []
    total = 0
    while True:
        data = conn.recv(262144)
        if not data:
            break
        total += len(data)
        marks.append((time.monotonic(), total))
    return {"received": total, "marks": _thin(marks)}


def _thin(marks: list[tuple[float, int]], keep: int = 200) -> list[tuple[float, int]]:
    step = max(1, len(marks) // keep)
    thin = marks[::step]
    if marks and thin[-1] != marks[-1]:
        thin.append(marks[-1])
    return thin


def recv(host: str, port: int) -> None:
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(1)
        _report(listening=True)
        srv.settimeout(30)
        conn, _ = srv.accept()
        with conn:
            result = receive_timed(conn)
    _report(**result)


def connect(host: str, port: int, timeout: float) -> None:
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            outcome = "ok"
    except socket.timeout:
        outcome = "timeout"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except OSError as exc:
        outcome = "unreachable" if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) else f"error:{exc.errno}"
    _report(outcome=outcome, elapsed=time.monotonic() - t0)


def echo(host: str, port: int, count: int, size: int) -> None:
    payload = b"x" * size
    rtts = []
    with socket.create_connection((host, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t0 = time.monotonic()
            s.sendall(payload)
            got = 0
            while got < size:
                data = s.recv(size - got)
                if not data:
                    raise SystemExit("echo server closed")
                got += len(data)
            rtts.append((time.monotonic() - t0) * 1000)
    _report(rtts_ms=rtts)


def main(argv: list[str]) -> int:
    cmd, host, port = argv[0], argv[1], int(argv[2])
    if cmd == "send":
        send(host, port, int(argv[3]))
    elif cmd == "recv":
        recv(host, port)
    elif cmd == "connect":
        connect(host, port, float(argv[3]))
    elif cmd == "echo":
        echo(host, port, int(argv[3]), int(argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
