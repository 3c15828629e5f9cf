"""OpenCV sources: ``camera`` (V4L2 index, device path, video file, RTSP/HTTP URL) and ``video`` (a file).

cv2 is imported when a capture opens, not when this module is imported.
A camera that is missing at start or drops later is retried with capped
exponential backoff; the daemon never stops for it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from lepton.agent.sources.base import (
    REWIND,
    STOPPED,
    FINISHED,
    Backoff,
    BaseSource,
    Pacer,
    SourceConfig,
    Unavailable,
)
from lepton.errors import ConfigError

log = logging.getLogger(__name__)

# A file whose header claims a rate outside this range is paced at the default.
_FILE_FPS_RANGE = (0.5, 240.0)
_DEFAULT_FILE_FPS = 25.0
_FFMPEG_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
_ffmpeg_env_lock = threading.Lock()
_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


def is_url(device: Any) -> bool:
    """True for a network stream address."""
    return isinstance(device, str) and device.lower().startswith(_URL_SCHEMES)


class _SizeConfig(SourceConfig):
    width: int = Field(0, ge=0, le=8192, description="frame width; 0 keeps the device's. Frames are resized to it.")
    height: int = Field(0, ge=0, le=8192, description="frame height; 0 keeps the device's. Set both or neither.")

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.width == 0) != (self.height == 0):
            raise ValueError(f"set both width and height or neither (got width={self.width}, height={self.height})")
        return self


class CameraConfig(_SizeConfig):
    """``type = "camera"``: a live camera, or anything OpenCV can open."""

    type: Literal["camera"] = Field("camera", description="this source's type")
    device: int | str = Field(
        0,
        description="V4L2 index (0 = /dev/video0; a string of digits counts as an index), "
        "a device path, a video file (looped) or an rtsp:// / http:// URL",
    )
    fps: float = Field(
        0.0, ge=0, le=1000,
        description="frames per second delivered; 0: as fast as the device gives them (a file: its own rate)",
    )
    reconnect_s: float = Field(1.0, gt=0, le=3600, description="first wait before reopening a missing or lost camera")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="cap of the doubling reconnect wait")
    timeout_s: float = Field(10.0, gt=0, le=600, description="open and read timeout for network streams")
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="rtsp:// over tcp (reliable, the usual choice) or udp (less delay; frames tear when "
        "packets are lost)"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: int | str) -> int | str:
        if isinstance(value, str):
            value = value.strip()
            if value.isdigit():
                return int(value)
            if not value:
                raise ValueError("device must be an index, a path or a URL, not empty")
        elif value < 0:
            raise ValueError("a camera index is 0 or more")
        return value


class VideoConfig(_SizeConfig):
    """``type = "video"``: a video file, paced at fps, looping."""

    type: Literal["video"] = Field("video", description="this source's type")
    path: str = Field(description="video file (anything OpenCV/FFmpeg decodes)")
    fps: float = Field(0.0, ge=0, le=1000, description="frames per second delivered; 0: the file's own rate")
    loop: bool = Field(True, description="start again at the end; false: stop after one pass")


class _Capture:
    """A cv2.VideoCapture with close()."""

    def __init__(self, cap: Any, live: bool) -> None:
        self.cap = cap
        self.live = live

    def close(self) -> None:
        self.cap.release()


@contextmanager
def _ffmpeg_options(rtsp_transport: str):
    """OpenCV takes FFmpeg options only from the environment, read at open time."""
    with _ffmpeg_env_lock:
        if not rtsp_transport or _FFMPEG_ENV in os.environ:  # an operator's own setting wins
            yield
            return
        os.environ[_FFMPEG_ENV] = f"rtsp_transport;{rtsp_transport}"
        try:
            yield
        finally:
            del os.environ[_FFMPEG_ENV]


def _quiet_opencv(cv2: Any) -> None:
    """Silence OpenCV's own per-attempt warnings: a camera that stays offline would print one per retry.

    Our log says each state change once. An OPENCV_LOG_LEVEL set by the
    operator wins.
    """
    if "OPENCV_LOG_LEVEL" not in os.environ:
        logging_ = cv2.utils.logging
        if logging_.getLogLevel() > logging_.LOG_LEVEL_ERROR:
            logging_.setLogLevel(logging_.LOG_LEVEL_ERROR)


def _open(device: int | str, timeout_s: float, rtsp_transport: str = "tcp") -> _Capture:
    """Open *device* with the right OpenCV backend, or raise Unavailable saying why."""
    import cv2

    _quiet_opencv(cv2)

    linux = sys.platform.startswith("linux")
    if isinstance(device, int):
        node = f"/dev/video{device}"
        # Probing a missing node makes OpenCV print a warning per retry.
        if linux and not os.path.exists(node):
            raise Unavailable(f"{node} does not exist")
        cap, live = cv2.VideoCapture(device, cv2.CAP_V4L2 if linux else cv2.CAP_ANY), True
    elif is_url(device):
        ms = int(timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        with _ffmpeg_options(rtsp_transport if device.lower().startswith("rtsp") else ""):
            cap, live = cv2.VideoCapture(device, cv2.CAP_FFMPEG, params), True
    else:
        if not os.path.exists(device):
            raise Unavailable("no such file or device")
        live = not os.path.isfile(device)
        api = cv2.CAP_V4L2 if linux and device.startswith("/dev/video") else cv2.CAP_ANY
        cap = cv2.VideoCapture(device, api)
    if not cap.isOpened():
        cap.release()
        raise Unavailable("OpenCV could not open it")
    return _Capture(cap, live)


class CaptureSource(BaseSource):
    """Shared capture loop of ``camera`` and ``video``."""

    kind = "camera"
    loop = True

    def target(self) -> int | str:
        """What to open."""
        raise NotImplementedError

    def run(self) -> None:
        cfg = self.config
        backoff = Backoff(getattr(cfg, "reconnect_s", 1.0), getattr(cfg, "reconnect_max_s", 30.0))
        self.supervise(self._open, self._pump, _describe(self.target()), backoff)

    def _open(self) -> _Capture:
        cfg = self.config
        capture = _open(self.target(), getattr(cfg, "timeout_s", 10.0), getattr(cfg, "rtsp_transport", "tcp"))
        if capture.live and cfg.width:
            import cv2

            # A request only: the driver may pick another size; _fit() resizes then.
            capture.cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
            capture.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)
        return capture

    def _pump(self, capture: _Capture) -> str:
        return self._pump_live(capture) if capture.live else self._pump_file(capture)

    def _pump_live(self, capture: _Capture) -> str:
        # grab() every frame so the driver's buffer never holds stale ones;
        # decode only those the configured rate wants.
        pacer = Pacer(self.config.fps)
        while self.running():
            if not capture.cap.grab():
                return "read failed"
            if pacer.period and not pacer.ready():
                continue
            ok, image = capture.cap.retrieve()
            if not ok or image is None:
                return "decode failed"
            self.publish(self._fit(image))
        return STOPPED

    def _pump_file(self, capture: _Capture) -> str:
        import cv2

        fps = self.config.fps or capture.cap.get(cv2.CAP_PROP_FPS)
        if not _FILE_FPS_RANGE[0] <= fps <= _FILE_FPS_RANGE[1]:
            fps = _DEFAULT_FILE_FPS
        pacer, count = Pacer(fps), 0
        while self.sleep(pacer.delay()):
            ok, image = capture.cap.read()
            if not ok or image is None:
                if count == 0:
                    return "no frame could be decoded"
                return REWIND if self.loop else FINISHED
            count += 1
            self.publish(self._fit(image))
        return STOPPED

    def _fit(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 BGR of the configured size, whatever the device delivered."""
        import cv2

        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        if image.dtype != np.uint8:
            image = cv2.convertScaleAbs(image)
        w, h = self.config.width, self.config.height
        if w and (image.shape[1], image.shape[0]) != (w, h):
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(image)

    def extra_stats(self) -> dict:
        return {"reconnects": self.reconnects}


class CameraSource(CaptureSource):
    """A live camera (or a looping file); reconnects with backoff when it drops or was never there."""

    kind = "camera"

    def target(self) -> int | str:
        return self.config.device


class VideoSource(CaptureSource):
    """A video file paced at fps, looping unless ``loop = false``."""

    kind = "video"

    def __init__(self, config: VideoConfig) -> None:
        if not os.path.isfile(config.path):
            raise ConfigError(f"source '{config.id}' (video): path: no such file {config.path!r}")
        super().__init__(config)
        self.loop = config.loop

    def target(self) -> str:
        return self.config.path


def _describe(device: int | str) -> str:
    if isinstance(device, int):
        return f"camera index {device}"
    if is_url(device):
        # Credentials in a URL stay out of the log.
        scheme, _, rest = device.partition("://")
        return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
    return device
