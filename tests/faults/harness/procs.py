"""Child processes by name: start, stop, SIGKILL, SIGSTOP/SIGCONT, restart.

Each child runs in its own session (so a signal reaches it and nothing
else), optionally inside a network namespace (``ip netns exec`` execs the
command, so the pid is the command's own), with stdout and stderr appended to
``<logdir>/<name>.log`` across restarts. ``ProcessGroup.close()`` kills every
child that is still alive; the fixtures call it even when a test fails.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# Children are noted here (one directory per test process, one file per child
# holding its start time) so a later run can kill what a hard-killed run left.
TRACK_DIR = Path(tempfile.gettempdir()) / "lxf-children"


def track(pid: int) -> None:
    """Note child *pid* as ours until ``untrack``."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        return
    mine = TRACK_DIR / str(os.getpid())
    mine.mkdir(parents=True, exist_ok=True)
    (mine / str(pid)).write_text(repr(created))


def untrack(pid: int) -> None:
    (TRACK_DIR / str(os.getpid()) / str(pid)).unlink(missing_ok=True)


def reap_orphans() -> list[int]:
    """SIGKILL children noted by test processes that no longer exist; returns their pids."""
    killed = []
    for owner in TRACK_DIR.glob("*") if TRACK_DIR.is_dir() else ():
        if not owner.name.isdigit() or psutil.pid_exists(int(owner.name)):
            continue
        for note in owner.glob("*"):
            try:
                proc = psutil.Process(int(note.name))
                if repr(proc.create_time()) == note.read_text():  # not a reused pid
                    proc.kill()
                    killed.append(proc.pid)
            except (psutil.Error, ValueError, OSError):
                pass
        shutil.rmtree(owner, ignore_errors=True)
    if killed:
        log.info("killed %d children of an earlier test run: %s", len(killed), killed)
    return killed


@dataclass
class Proc:
    """One named child and how to start it again."""

    name: str
    cmd: list[str]
    log_path: Path
    ns: str | None = None
    env: dict[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)
    starts: int = 0
    started_at: float = 0.0  # time.monotonic() of the last start
    exits: list[int] = field(default_factory=list)  # return codes of earlier runs

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def start(self) -> "Proc":
        """Start (again); refuses while the previous run is alive."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        if self.popen is not None:
            self.exits.append(self.popen.returncode)
        cmd = (["ip", "netns", "exec", self.ns] if self.ns else []) + self.cmd
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"=== start {self.starts + 1}: {' '.join(cmd)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          cwd=self.cwd, start_new_session=True)
        track(self.popen.pid)
        self.starts += 1
        self.started_at = time.monotonic()
        log.info("started %s pid %s", self.name, self.pid)
        return self

    def send_signal(self, sig: int) -> None:
        """Send *sig* to the child (no-op once it has exited)."""
        if self.running:
            assert self.popen is not None
            os.kill(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal and wait for exit; SIGKILL if it outlives *timeout*. Returns the exit code."""
        if not self.running:
            return self.returncode
        assert self.popen is not None
        if sig != signal.SIGKILL:
            self.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored signal %s for %ss; killing it", self.name, sig, timeout)
            self._kill_group()
            return self.popen.wait(5)
        finally:
            untrack(self.popen.pid)

    def kill(self) -> int | None:
        """SIGKILL: a crash, no clean-up."""
        return self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: frozen, sockets open (looks like a hung host)."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self.send_signal(signal.SIGCONT)

    def restart(self, sig: int = signal.SIGTERM) -> "Proc":
        """Stop with *sig* (if running) and start again with the same command."""
        self.stop(sig)
        return self.start()

    def wait(self, timeout: float) -> int:
        """Wait for the child to exit by itself; TimeoutError if it does not."""
        assert self.popen is not None
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout}s") from None
        untrack(self.popen.pid)
        return code

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def wait_log(self, pattern: str, timeout: float, after: int = 0) -> tuple[float, re.Match]:
        """Wait until *pattern* (regex) appears in the log past byte offset *after*.

        Returns (time.monotonic() when seen, the match); TimeoutError with the
        log tail otherwise. Polled every 20 ms, so times are good to ~20 ms.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()[after:]
            m = rx.search(text)
            if m:
                return time.monotonic(), m
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no /{pattern}/ in its log within {timeout}s; tail:\n{self.log_tail()}")
            time.sleep(0.02)

    def log_size(self) -> int:
        """Current log length: pass as ``after`` to wait only for new lines."""
        try:
            return len(self.log_text())
        except OSError:
            return 0

    def _kill_group(self) -> None:
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class ProcessGroup:
    """The named children of one test."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = Path(logdir)
        self.procs: dict[str, Proc] = {}

    def add(self, name: str, cmd: list[str], ns: str | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None, start: bool = True) -> Proc:
        """Register (and by default start) child *name*."""
        if name in self.procs and self.procs[name].running:
            raise RuntimeError(f"a process named {name!r} is already running")
        proc = Proc(name=name, cmd=list(cmd), log_path=self.logdir / f"{name}.log", ns=ns, env=env, cwd=cwd)
        self.procs[name] = proc
        return proc.start() if start else proc

    def __getitem__(self, name: str) -> Proc:
        try:
            return self.procs[name]
        except KeyError:
            raise KeyError(f"no process named {name!r}; have {sorted(self.procs)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.procs

    def close(self) -> None:
        """Kill every child still running (process group and all)."""
        for proc in self.procs.values():
            if proc.popen is not None and not proc.running:
                untrack(proc.popen.pid)
            if proc.running:
                proc.send_signal(signal.SIGCONT)
                proc._kill_group()
                try:
                    assert proc.popen is not None
                    proc.popen.wait(5)
                    untrack(proc.popen.pid)
                except subprocess.TimeoutExpired:
                    log.error("%s (pid %s) did not die", proc.name, proc.pid)


def python_cmd(*args: str) -> list[str]:
    """``python -m`` style command with this interpreter."""
    return [sys.executable, *args]


def lepton_cmd(*args: str) -> list[str]:
    """Run the ``lepton`` CLI with this interpreter (works without the script on PATH)."""
    return [sys.executable, "-m", "lepton.cli", *args]
