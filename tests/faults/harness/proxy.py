"""A userspace TCP proxy that adds delay, and can stall or cut the link.

This kernel has no netem, so a device that needs a slow link talks to the
broker through one of these: every chunk is forwarded ``delay_ms`` after it
arrived, in each direction (so the round trip grows by 2 x delay_ms), in
order. ``pause()`` stalls forwarding with the sockets kept open (a link that
silently stops carrying data); ``cut("reset")`` resets every connection and
refuses new ones until ``restore()``; ``cut("close")`` closes them cleanly.

Runs an asyncio loop in one named thread of the test process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from collections import deque

log = logging.getLogger(__name__)


class DelayProxy:
    """Forward ``listen_host:listen_port`` to ``target_host:target_port`` with a one-way delay."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, delay_ms: float = 0.0, name: str = "proxy") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.delay_ms = float(delay_ms)
        self.name = name
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0
        self.connections = 0
        self.refused = 0
        self._paused = False
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._resume: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # --- control (called from the test thread) ---------------------------------
    def start(self) -> "DelayProxy":
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"proxy-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError(f"proxy {self.name} did not start")
        return self

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect."""
        return self.listen_host, self.listen_port

    def set_delay(self, delay_ms: float) -> None:
        """One-way delay for chunks that arrive from now on."""
        self.delay_ms = float(delay_ms)

    def pause(self) -> None:
        """Stop forwarding; connections stay open and data queues up."""
        self._call(self._set_paused, True)

    def resume(self) -> None:
        """Forward again, queued data first."""
        self._call(self._set_paused, False)

    def cut(self, mode: str = "reset") -> None:
        """Drop every connection (``reset``: RST; ``close``: FIN) and refuse new ones."""
        if mode not in ("reset", "close"):
            raise ValueError(f"proxy cut mode {mode!r}: use 'reset' or 'close'")
        self._call(self._cut_all, mode == "reset")

    def restore(self) -> None:
        """Accept and forward again after ``cut``."""
        self._cut = False

    def close(self) -> None:
        """Stop the proxy and its thread (idempotent)."""
        if self._loop is None or self._thread is None:
            return
        loop, self._loop = self._loop, None
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    def _call(self, fn, *args) -> None:
        if self._loop is None:
            raise RuntimeError(f"proxy {self.name} is not running")
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    # --- the loop --------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._resume = asyncio.Event()
        self._resume.set()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.listen_host, self.listen_port, reuse_address=True))
            self.listen_port = self._server.sockets[0].getsockname()[1]
        except OSError:
            log.exception("proxy %s cannot listen on %s:%s", self.name, self.listen_host, self.listen_port)
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            for w in list(self._writers):
                _abort(w, reset=True)
            self._server.close()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def _set_paused(self, paused: bool) -> None:
        self._paused = paused
        assert self._resume is not None
        if paused:
            self._resume.clear()
        else:
            self._resume.set()

    def _cut_all(self, reset: bool) -> None:
        self._cut = True
        for w in list(self._writers):
            _abort(w, reset)
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            _abort(writer, reset=True)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.refused += 1
            _abort(writer, reset=True)
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer, "up")),
                 asyncio.ensure_future(self._pump(up_reader, writer, "down"))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for p in pumps:
            p.cancel()
        for w in (writer, up_writer):
            self._writers.discard(w)
            _abort(w, reset=False)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """Read chunks as they come; a second task writes each one when its delay is up."""
        queue: deque[tuple[float, bytes]] = deque()
        more = asyncio.Event()
        sender = asyncio.ensure_future(self._send(queue, more, writer, direction))
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                queue.append((time.monotonic() + self.delay_ms / 1000.0, data))
                more.set()
            queue.append((time.monotonic() + self.delay_ms / 1000.0, b""))  # EOF after the data
            more.set()
            await sender
        except (OSError, asyncio.CancelledError):
            sender.cancel()
            raise

    async def _send(self, queue: deque, more: asyncio.Event, writer: asyncio.StreamWriter, direction: str) -> None:
        assert self._resume is not None
        while True:
            while not queue:
                more.clear()
                await more.wait()
            due, data = queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._resume.wait()
            queue.popleft()
            if not data:
                writer.write_eof() if writer.can_write_eof() else None
                return
            writer.write(data)
            await writer.drain()
            if direction == "up":
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)


def _abort(writer: asyncio.StreamWriter, reset: bool) -> None:
    sock = writer.get_extra_info("socket")
    if reset and sock is not None:
        try:  # linger 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    try:
        writer.transport.abort() if reset else writer.close()
    except (OSError, RuntimeError):
        pass
