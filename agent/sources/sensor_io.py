"""Readers behind the ``sensor`` source: CSV lines (file, FIFO, serial tty) and Linux IIO sysfs.

Plain file reads and the standard library's termios: no serial library is
needed to read a line-per-sample accelerometer on a tty.
"""

from __future__ import annotations

import math
import os
import re
import select
import stat
from pathlib import Path

import numpy as np

from lepton.agent.sources.base import Unavailable

STANDARD_GRAVITY = 9.80665  # m/s^2 per g; IIO reports acceleration in m/s^2
_SEPARATORS = re.compile(r"[,;\s]+")


def parse_sample(line: str, channels: int, skip_columns: int = 0) -> list[float]:
    """One CSV sample: *skip_columns* ignored fields, then *channels* finite numbers.

    Fields may be separated by commas, semicolons or blanks. Raises ValueError
    whose message is the reason, fit for a log line.
    """
    fields = [f for f in _SEPARATORS.split(line.strip()) if f]
    want = skip_columns + channels
    if len(fields) != want:
        extra = f" ({skip_columns} skipped + {channels})" if skip_columns else ""
        raise ValueError(f"expected {want} fields{extra}, got {len(fields)}")
    values = []
    for text in fields[skip_columns:]:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text[:32]!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text[:32]!r} is not a finite number")
        values.append(value)
    return values


def is_stream(path: str) -> bool:
    """True for a tty, FIFO or socket (read as it arrives), False for a regular file (paced, looped)."""
    mode = os.stat(path).st_mode
    return not stat.S_ISREG(mode)


class LineFile:
    """A regular file read line by line."""

    def __init__(self, path: str) -> None:
        try:
            self._file = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise Unavailable(exc.strerror or str(exc)) from None

    def readline(self) -> str | None:
        """The next line, or None at the end of the file."""
        line = self._file.readline()
        return line or None

    def close(self) -> None:
        self._file.close()


class LineStream:
    """A serial tty or FIFO read without blocking, so stopping never waits on a silent device."""

    def __init__(self, path: str, baud: int = 0) -> None:
        try:
            # A FIFO opened read-write always has a writer (us), so a sensor
            # process that restarts causes no end-of-file, just a pause.
            fifo = stat.S_ISFIFO(os.stat(path).st_mode)
            access = os.O_RDWR if fifo else os.O_RDONLY
            self._fd = os.open(path, access | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise Unavailable(exc.strerror or str(exc)) from None
        self._buffer = b""
        if os.isatty(self._fd):
            _raw_tty(self._fd, baud)

    def read_lines(self, timeout: float) -> list[str]:
        """Complete lines that arrived within *timeout* s; raises EOFError when the device is gone."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return []
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        except OSError as exc:  # EIO: the serial adapter was unplugged
            raise EOFError(exc.strerror or str(exc)) from None
        if not chunk:
            raise EOFError("the writer closed it")
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > 65536:  # no newline for 64 KiB: not a line protocol
            self._buffer = b""
            lines.append(b"\x00<line longer than 64 KiB>")
        return [line.decode("utf-8", "replace") for line in lines]

    def close(self) -> None:
        os.close(self._fd)


def _raw_tty(fd: int, baud: int) -> None:
    """Raw mode (no echo back to the sensor, no line editing) and, if given, the baud rate."""
    import termios
    import tty

    tty.setraw(fd, termios.TCSANOW)
    if baud:
        attrs = termios.tcgetattr(fd)
        speed = getattr(termios, f"B{baud}")
        attrs[4] = attrs[5] = speed
        termios.tcsetattr(fd, termios.TCSANOW, attrs)


def valid_baud(baud: int) -> bool:
    """True if termios knows this rate."""
    try:
        import termios
    except ImportError:  # not a Unix: tty settings are not ours to change
        return True
    return baud == 0 or hasattr(termios, f"B{baud}")


def find_iio_device(root: str, device: str) -> Path:
    """The IIO device directory: *device* is a directory name (``iio:device0``) or the device's ``name``."""
    base = Path(root)
    if (base / device).is_dir():
        return base / device
    found = []
    for entry in sorted(base.glob("iio:device*")):
        try:
            name = (entry / "name").read_text().strip()
        except OSError:
            name = "?"
        if name == device:
            return entry
        found.append(f"{entry.name} ({name})")
    raise Unavailable(f"no IIO device {device!r} under {root}; found: {', '.join(found) or 'none'}")


class IIOReader:
    """Polls ``in_accel_{x,y,z}_raw`` and applies offset and scale, as the IIO sysfs ABI defines."""

    def __init__(self, root: str, device: str, channels: int, units: str = "g") -> None:
        self.directory = find_iio_device(root, device)
        axes = "xyz"[:channels]
        self._fds: list[int] = []
        try:
            scales = [self._attr(f"in_accel_{a}_scale", "in_accel_scale", None) for a in axes]
            offsets = [self._attr(f"in_accel_{a}_offset", "in_accel_offset", 0.0) for a in axes]
            for axis in axes:
                self._fds.append(os.open(self.directory / f"in_accel_{axis}_raw", os.O_RDONLY))
        except OSError as exc:
            self.close()
            raise Unavailable(f"{self.directory}: {exc.strerror or exc}") from None
        divisor = STANDARD_GRAVITY if units == "g" else 1.0
        self._offset = np.asarray(offsets, np.float64)
        self._scale = np.asarray(scales, np.float64) / divisor

    def _attr(self, specific: str, shared: str, default: float | None) -> float:
        for name in (specific, shared):
            path = self.directory / name
            if path.exists():
                text = path.read_text().strip()
                try:
                    return float(text)
                except ValueError:
                    raise Unavailable(f"{path}: {text!r} is not a number") from None
        if default is None:
            raise Unavailable(f"{self.directory}: neither {specific} nor {shared} exists")
        return default

    def read(self) -> np.ndarray:
        """One sample, (channels,) float64 in the configured units. OSError/ValueError if the device fails."""
        # pread at offset 0 re-reads a sysfs attribute without reopening it.
        raw = [float(os.pread(fd, 32, 0)) for fd in self._fds]
        return (np.asarray(raw) + self._offset) * self._scale

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
