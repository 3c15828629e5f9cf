"""``sensor``: windows of accelerometer samples, as (length, channels) float32 frames.

Three modes:
  synthetic  generated vibration with normal and fault windows (meta ``{"fault": bool}``);
             faults by probability, every Nth window, or forced with ``set_fault()``
  csv        one sample per line from a file (paced, looped), a FIFO or a serial tty
  iio        Linux IIO sysfs (``in_accel_*_raw`` x scale), polled at fs
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from lepton.agent.sources.base import (
    FINISHED,
    REWIND,
    STOPPED,
    Backoff,
    BaseSource,
    Pacer,
    SourceConfig,
    Unavailable,
)
from lepton.agent.sources.sensor_io import IIOReader, LineFile, LineStream, is_stream, parse_sample, valid_baud
from lepton.errors import LeptonError

log = logging.getLogger(__name__)

_REJECT_LOG_EVERY_S = 10.0  # a sensor spewing garbage gets one line per this, with a count
_MODE_KEYS = {
    "synthetic": {"fault_rate", "fault_every", "seed"},
    "csv": {"path", "loop", "header", "skip_columns", "baud"},
    "iio": {"iio_device", "iio_root", "units"},
}


class SensorConfig(SourceConfig):
    """``type = "sensor"``. Keys of another mode are refused, so a typo in ``mode`` cannot pass silently."""

    type: Literal["sensor"] = Field("sensor", description="this source's type")
    mode: Literal["synthetic", "csv", "iio"] = Field("synthetic", description="synthetic, csv or iio")
    fps: float = Field(0.0, ge=0, le=1000, description="windows per second for synthetic and csv files; "
                       "0: real time (fs / length). Streams and iio deliver at the device's rate.")
    length: int = Field(256, ge=2, le=65536, description="samples per window")
    channels: int = Field(3, ge=1, le=16, description="values per sample (iio: 1-3, axes x, y, z)")
    fs: float = Field(1000.0, gt=0, le=100000, description="sample rate in Hz")
    fault_rate: float = Field(0.0, ge=0, le=1, description="synthetic: probability that a window is a fault")
    fault_every: int = Field(0, ge=0, description="synthetic: every Nth window is a fault; 0: off")
    seed: int = Field(0, ge=0, description="synthetic: random seed")
    path: str = Field("", description="csv: a file (paced at fps, looped), a FIFO or a serial tty")
    loop: bool = Field(True, description="csv file: start again at the end")
    header: bool = Field(False, description="csv: the first line is a header")
    skip_columns: int = Field(0, ge=0, le=64, description="csv: leading fields to ignore, e.g. a timestamp")
    baud: int = Field(0, ge=0, description="csv on a tty: baud rate; 0 keeps the port's")
    iio_device: str = Field("iio:device0", description="iio: directory name under iio_root, or the device's name")
    iio_root: str = Field("/sys/bus/iio/devices", description="iio: where IIO devices live")
    units: Literal["g", "m/s2"] = Field("g", description="iio: units of the windows (IIO reports m/s^2)")

    @model_validator(mode="after")
    def _mode_keys(self):
        for mode, keys in _MODE_KEYS.items():
            stray = sorted(keys & self.model_fields_set) if mode != self.mode else []
            if stray:
                noun = "key" if len(stray) == 1 else "keys"
                verb = "belongs" if len(stray) == 1 else "belong"
                raise ValueError(f"{noun} {', '.join(stray)} {verb} to mode {mode!r}, not {self.mode!r}")
        if self.mode == "csv" and not self.path:
            raise ValueError("mode 'csv' needs path (a file, FIFO or serial tty)")
        if self.mode == "iio" and self.channels > 3:
            raise ValueError(f"mode 'iio' reads at most 3 axes, not channels={self.channels}")
        if not valid_baud(self.baud):
            raise ValueError(f"baud {self.baud} is not a rate this system supports")
        return self

    @property
    def window_rate(self) -> float:
        """Windows per second when the source sets the pace."""
        return self.fps or self.fs / self.length


def load_vibration():
    """``lepton.models.synth.vibration_window``, or LeptonError if this install lacks it."""
    try:
        from lepton.models.synth import vibration_window
    except ImportError as exc:
        raise LeptonError(f"sensor mode 'synthetic': the vibration generator cannot be loaded ({exc})") from None
    return vibration_window


class _Window:
    """Collects samples; hands out a full (length, channels) float32 window."""

    def __init__(self, length: int, channels: int) -> None:
        self.length, self.channels = length, channels
        self._data = np.empty((length, channels), np.float32)
        self._n = 0

    def add(self, sample) -> np.ndarray | None:
        self._data[self._n] = sample
        self._n += 1
        if self._n < self.length:
            return None
        full, self._data, self._n = self._data, np.empty((self.length, self.channels), np.float32), 0
        return full


class SensorSource(BaseSource):
    """Accelerometer windows from a generator, a CSV line source or IIO sysfs."""

    kind = "sensor"

    def __init__(self, config: SensorConfig) -> None:
        super().__init__(config)
        self.rejected = 0  # malformed CSV lines
        self._forced: bool | None = None
        self._reject_logged_at: float | None = None
        self._reject_logged = 0
        # Looked up here so a broken install fails at start-up, not in the thread.
        self._generate = load_vibration() if config.mode == "synthetic" else None
        self._file_pacer = Pacer(config.window_rate)  # one for every pass of a looped file: it keeps the rate

    def set_fault(self, fault: bool | None) -> None:
        """Synthetic mode: force fault (True) or normal (False) windows; None returns to fault_rate/fault_every."""
        self._forced = fault

    def run(self) -> None:
        cfg = self.config
        if cfg.mode == "synthetic":
            self._run_synthetic()
            return
        backoff = Backoff(1.0, 30.0)
        if cfg.mode == "iio":
            self.supervise(self._open_iio, self._pump_iio, f"IIO {cfg.iio_device} under {cfg.iio_root}", backoff)
        else:
            self.supervise(self._open_csv, self._pump_csv, cfg.path, backoff)

    # -- synthetic -------------------------------------------------------

    def _run_synthetic(self) -> None:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        pacer = Pacer(cfg.window_rate)
        self.set_connected(True, "generating vibration windows (%d x %d at %s Hz)", cfg.length, cfg.channels, cfg.fs)
        index = 0
        while self.sleep(pacer.delay()):
            fault = self._next_fault(rng, index)
            window = np.asarray(self._generate(rng, fault, cfg.length, cfg.fs, cfg.channels), np.float32)
            self.publish(window, {"fault": fault})
            index += 1

    def _next_fault(self, rng: np.random.Generator, index: int) -> bool:
        if self._forced is not None:
            return self._forced
        every = self.config.fault_every
        if every and index % every == every - 1:
            return True
        return bool(self.config.fault_rate and rng.random() < self.config.fault_rate)

    # -- csv -------------------------------------------------------------

    def _open_csv(self):
        path = self.config.path
        try:
            stream = is_stream(path)
        except OSError as exc:
            raise Unavailable(exc.strerror or str(exc)) from None
        return LineStream(path, self.config.baud) if stream else LineFile(path)

    def _pump_csv(self, reader) -> str:
        return self._pump_stream(reader) if isinstance(reader, LineStream) else self._pump_file(reader)

    def _pump_file(self, reader: LineFile) -> str:
        cfg = self.config
        window, pacer = _Window(cfg.length, cfg.channels), self._file_pacer
        lineno = published = 0
        while self.running():
            line = reader.readline()
            if line is None:
                if published == 0:
                    return f"fewer than {cfg.length} valid samples in the file"
                return REWIND if cfg.loop else FINISHED
            lineno += 1
            full = self._take_line(line, lineno, window)
            if full is not None:
                if not self.sleep(pacer.delay()):
                    return STOPPED
                self.publish(full)
                published += 1
        return STOPPED

    def _pump_stream(self, stream: LineStream) -> str:
        window, lineno = _Window(self.config.length, self.config.channels), 0
        while self.running():
            try:
                lines = stream.read_lines(0.2)
            except EOFError as exc:
                return str(exc)
            for line in lines:
                lineno += 1
                full = self._take_line(line, lineno, window)
                if full is not None:
                    self.publish(full)
        return STOPPED

    def _take_line(self, line: str, lineno: int, window: _Window) -> np.ndarray | None:
        """Parse one line into the window; a full window is returned, a bad line counted and logged."""
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or (lineno == 1 and self.config.header):
            return None
        try:
            sample = parse_sample(stripped, self.config.channels, self.config.skip_columns)
        except ValueError as exc:
            self._reject(lineno, str(exc))
            return None
        return window.add(sample)

    def _reject(self, lineno: int, reason: str) -> None:
        self.rejected += 1
        now = time.monotonic()
        if self._reject_logged_at is not None and now - self._reject_logged_at < _REJECT_LOG_EVERY_S:
            return
        more = self.rejected - self._reject_logged - 1
        suffix = f" ({more} more rejected since the last report)" if more > 0 else ""
        log.warning("sensor %s: %s line %d rejected: %s%s", self.id, self.config.path, lineno, reason, suffix)
        self._reject_logged_at, self._reject_logged = now, self.rejected

    # -- iio -------------------------------------------------------------

    def _open_iio(self) -> IIOReader:
        cfg = self.config
        return IIOReader(cfg.iio_root, cfg.iio_device, cfg.channels, cfg.units)

    def _pump_iio(self, reader: IIOReader) -> str:
        cfg = self.config
        window = _Window(cfg.length, cfg.channels)
        # Sampling may catch up after a short stall, so a window keeps its
        # sample count; after a long one it restarts rather than bursting.
        pacer = Pacer(cfg.fs, max_lag_s=0.25)
        while self.sleep(pacer.delay()):
            try:
                sample = reader.read()
            except (OSError, ValueError) as exc:
                return f"read failed: {exc}"
            full = window.add(sample)
            if full is not None:
                self.publish(full)
        return STOPPED

    def extra_stats(self) -> dict:
        return {"rejected": self.rejected, "reconnects": self.reconnects}

