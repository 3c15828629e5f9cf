"""Sources: real video files, a late camera, synthetic digits and vibration, CSV files and ttys, IIO sysfs."""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pytest

from lepton.agent.sources import SOURCE_TYPES, Frame, Source, build_source, validate_source_config
from lepton.agent.sources.base import BaseSource, SourceConfig
from lepton.errors import ConfigError

LEVELS = (0, 50, 100, 150, 200, 250)  # one gray level per frame of the test video


def write_video(path, levels=LEVELS, size=(64, 48), fps=30.0) -> None:
    """A real MJPG .avi whose frame k is a flat gray of levels[k]."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for level in levels:
        writer.write(np.full((size[1], size[0], 3), level, np.uint8))
    writer.release()


def collect(source, seconds: float, limit: int = 10_000) -> list[Frame]:
    """Take every frame a fast consumer can for *seconds*."""
    frames: list[Frame] = []
    seq, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and len(frames) < limit:
        frame = source.latest(seq, 0.2)
        if frame is not None:
            frames.append(frame)
            seq = frame.seq
    return frames


@pytest.fixture
def stop():
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def started(stop):
    """Start sources built from configs; close them all at the end."""
    sources = []

    def make(config: dict):
        source = build_source(config)
        sources.append(source)
        source.start(stop)
        return source

    yield make
    for source in sources:
        source.close()


def nearest_level(frame: Frame) -> int:
    mean = float(frame.data.mean())
    return min(LEVELS, key=lambda level: abs(level - mean))


# -- video files --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["video", "camera"])
def test_video_file_is_read_in_order_and_loops(tmp_path, started, kind):
    path = tmp_path / "clip.avi"
    write_video(path)
    key = "path" if kind == "video" else "device"
    source = started({"id": "clip", "type": kind, key: str(path), "fps": 120})
    frames = collect(source, 0.5)
    assert isinstance(source, Source)
    assert len(frames) > 2 * len(LEVELS), "a 6-frame file at 120 fps must loop within 0.5 s"
    assert all(f.data.shape == (48, 64, 3) and f.data.dtype == np.uint8 for f in frames)
    levels = [nearest_level(f) for f in frames]
    assert set(levels) == set(LEVELS)
    # Each frame follows the one before it in the file, wrapping at the end.
    steps = {(LEVELS.index(b) - LEVELS.index(a)) % len(LEVELS) for a, b in zip(levels, levels[1:])}
    assert steps <= {1, 2, 3}, steps  # 1 when the consumer keeps up; a skip only if it fell behind
    assert source.stats()["connected"] is True


def test_video_without_loop_finishes_and_resizes(tmp_path, started):
    path = tmp_path / "once.avi"
    write_video(path)
    source = started({"id": "once", "type": "video", "path": str(path), "fps": 200, "loop": False,
                      "width": 32, "height": 24})
    frames = collect(source, 0.4)
    assert 1 <= len(frames) <= len(LEVELS)
    assert frames[-1].data.shape == (24, 32, 3)
    stats = source.stats()
    assert stats["frames_in"] == len(LEVELS) and stats["connected"] is False


def test_camera_missing_at_start_connects_when_it_appears(tmp_path, started, caplog):
    path = tmp_path / "late.avi"
    caplog.set_level(logging.INFO, logger="lepton.agent.sources")
    source = started({"id": "late", "type": "camera", "device": str(path), "fps": 100,
                      "reconnect_s": 0.05, "reconnect_max_s": 0.1})
    assert source.latest(0, 0.5) is None
    stats = source.stats()
    assert stats.pop("down_s") >= 0.5  # not delivering since it started (0.5 s of waiting for a frame above)
    assert stats == {"frames_in": 0, "frames_dropped": 0, "connected": False, "delivering": False,
                     "last_frame_s": None, "reconnects": 0}
    write_video(tmp_path / "partial.avi")
    os.replace(tmp_path / "partial.avi", path)  # appears whole, as a device node would
    frame = source.latest(0, 5.0)
    assert frame is not None and frame.data.shape == (48, 64, 3)
    assert source.stats()["connected"] is True
    messages = [r.getMessage() for r in caplog.records if "late" in r.getMessage()]
    # Several failed attempts, but one line for the outage and one for the connect.
    assert sum("cannot open" in m for m in messages) == 1, messages
    assert sum("connected to" in m for m in messages) == 1, messages


def _delivering_over(source, seconds: float) -> set[bool]:
    """Every value ``stats()["delivering"]`` took, sampled for *seconds*."""
    seen, end = set(), time.monotonic() + seconds
    while time.monotonic() < end:
        seen.add(source.stats()["delivering"])
        time.sleep(0.002)
    return seen


def test_camera_that_opens_but_gives_no_frame_is_named_once_and_again_when_it_gives_frames(tmp_path, started,
                                                                                          caplog):
    """A device that opens and gives nothing (here a video file with no frames) logged a connected/lost pair
    at every retry, for ever."""
    import cv2

    path = tmp_path / "blank.avi"
    writer = cv2.VideoWriter(str(tmp_path / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    writer.release()
    os.replace(tmp_path / "empty.avi", path)
    caplog.set_level(logging.INFO, logger="lepton.agent.sources")
    source = started({"id": "blank", "type": "camera", "device": str(path), "fps": 100,
                      "reconnect_s": 0.05, "reconnect_max_s": 0.1})
    assert source.latest(0, 1.0) is None
    messages = [r.getMessage() for r in caplog.records if "blank" in r.getMessage()]
    assert sum("opens but gives no frame (no frame could be decoded)" in m for m in messages) == 1, messages
    assert not any("connected to" in m or "lost" in m for m in messages), messages
    assert source.stats()["reconnects"] == 0  # it never came back
    assert _delivering_over(source, 0.5) == {False}  # opened now and then, never delivering: telemetry says down
    write_video(tmp_path / "partial.avi")
    os.replace(tmp_path / "partial.avi", path)
    assert source.latest(0, 5.0) is not None
    assert True in _delivering_over(source, 0.5)
    assert source.stats()["connected"] is True and source.stats()["reconnects"] == 1
    time.sleep(0.5)  # several passes of the 5-frame file: each reopened at its end
    assert source.stats()["frames_in"] > 2 * len(LEVELS)
    messages = [r.getMessage() for r in caplog.records if "blank" in r.getMessage()]
    assert sum("gives frames again" in m for m in messages) == 1, messages


def test_camera_on_missing_v4l2_index_waits_without_crashing(started):
    index = next(i for i in range(40, 64) if not os.path.exists(f"/dev/video{i}"))
    source = started({"id": "usb", "type": "camera", "device": index, "reconnect_s": 0.05})
    assert source.latest(0, 0.3) is None
    stats = source.stats()
    assert stats["connected"] is False and stats["frames_in"] == 0
    assert any(t.name == "source-usb" and t.is_alive() for t in threading.enumerate())


def test_camera_that_vanishes_is_reported_and_recovers(tmp_path, started):
    path = tmp_path / "cam.avi"
    write_video(path)
    source = started({"id": "flaky", "type": "camera", "device": str(path), "fps": 200,
                      "reconnect_s": 0.05, "reconnect_max_s": 0.1})
    assert source.latest(0, 2.0) is not None
    os.replace(path, tmp_path / "away.avi")
    deadline = time.monotonic() + 3
    while source.stats()["connected"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert source.stats()["connected"] is False
    os.replace(tmp_path / "away.avi", path)
    seq = source.stats()["frames_in"]
    assert source.latest(seq, 3.0) is not None
    assert source.stats()["connected"] is True


def test_camera_reads_a_network_stream_and_keeps_credentials_out_of_logs(tmp_path, started, caplog):
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    write_video(tmp_path / "net.avi")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, name="test-http", daemon=True).start()
    caplog.set_level(logging.INFO, logger="lepton.agent.sources")
    try:
        url = f"http://viewer:s3cret@127.0.0.1:{server.server_port}/net.avi"
        source = started({"id": "ipcam", "type": "camera", "device": url, "timeout_s": 2, "reconnect_s": 0.05})
        frames = collect(source, 0.5, limit=3)
        assert frames and frames[0].data.shape == (48, 64, 3)
        source.close()
    finally:
        server.shutdown()
        server.server_close()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "connected to http://127.0.0.1:" in logged and "s3cret" not in logged


# -- the mailbox --------------------------------------------------------------


class _Manual(BaseSource):
    """A source fed by the test itself: the mailbox logic alone, no thread."""

    def run(self) -> None:
        pass


def test_mailbox_keeps_only_the_latest_and_counts_drops():
    box = _Manual(SourceConfig(id="m", type="manual"))
    assert box.latest(0, 0.05) is None
    for value in range(3):
        box.publish(np.full(2, value))
    frame = box.latest(0, 0.0)
    assert frame.seq == 3 and frame.data[0] == 2
    assert box.stats()["frames_dropped"] == 2, "frames 1 and 2 were replaced unseen"
    assert box.latest(3, 0.05) is None
    box.publish(np.zeros(2))
    assert box.stats()["frames_dropped"] == 2, "frame 3 was taken, so replacing it is no drop"
    with pytest.raises(ValueError):
        frame.data[0] = 9  # shared between streams: read-only


def test_latest_wakes_as_soon_as_a_frame_arrives():
    box = _Manual(SourceConfig(id="m", type="manual"))
    threading.Timer(0.1, lambda: box.publish(np.zeros(1))).start()
    started = time.monotonic()
    frame = box.latest(0, 5.0)
    assert frame is not None and frame.seq == 1
    assert time.monotonic() - started < 1.0


def test_slow_consumer_gets_latest_frames_and_drops_are_counted(started):
    source = started({"id": "fast", "type": "synthetic", "pattern": "noise", "fps": 200, "width": 32, "height": 32})
    taken, seq = [], 0
    for _ in range(8):
        time.sleep(0.05)  # a model much slower than the source
        frame = source.latest(seq, 1.0)
        newest = source.stats()["frames_in"]
        assert frame is not None and newest - frame.seq <= 1, "a taken frame is the newest one"
        taken.append(frame)
        seq = frame.seq
    source.close()
    stats = source.stats()
    assert all(b.seq - a.seq > 3 for a, b in zip(taken, taken[1:])), "no backlog is replayed"
    untaken = stats["frames_in"] - len(taken) - stats["frames_dropped"]
    assert untaken in (0, 1), stats  # only the very last frame may be neither taken nor dropped
    assert stats["frames_dropped"] > 30


def test_rate_is_frames_delivered_taken_or_dropped(started):
    """rate() is the stream's demand the coordinator plans for: every frame delivered counts, even when
    no consumer takes any (a stream nobody serves still asks for its rate)."""
    source = started({"id": "rated", "type": "synthetic", "pattern": "noise", "fps": 40, "width": 16, "height": 16})
    assert source.rate() is None  # one look: nothing measured yet (a stopped source reads 0, not this)
    time.sleep(1.5)
    assert source.rate() == pytest.approx(40, rel=0.2)
    assert source.stats()["frames_dropped"] > 30  # nothing was taken, all of it counted


def test_close_and_stop_end_the_thread(stop, tmp_path):
    a = build_source({"id": "a", "type": "synthetic", "pattern": "noise", "fps": 50})
    b = build_source({"id": "b", "type": "synthetic", "pattern": "noise", "fps": 50})
    a.start(stop)
    b.start(stop)
    assert a.latest(0, 2.0) is not None
    a.close()
    names = {t.name for t in threading.enumerate()}
    assert "source-a" not in names and "source-b" in names
    stop.set()  # the daemon's shared stop event ends every source
    deadline = time.monotonic() + 2
    while "source-b" in {t.name for t in threading.enumerate()} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "source-b" not in {t.name for t in threading.enumerate()}
    b.close()


# -- synthetic digits ---------------------------------------------------------


def test_synthetic_digits_carry_their_true_label(started):
    from lepton.models import synth
    images, labels = synth.digits_heldout()
    expected = np.clip(np.rint(np.asarray(images, np.float64) * 255 / 16), 0, 255).astype(np.uint8)
    source = started({"id": "digits", "type": "synthetic", "pattern": "digits", "fps": 200,
                      "width": 96, "height": 80, "seed": 3})
    frames = collect(source, 0.3, limit=30)
    assert len(frames) >= 10
    for frame in frames:
        assert frame.data.shape == (80, 96, 3) and frame.data.dtype == np.uint8
        assert (frame.data[:, :, 0] == frame.data[:, :, 2]).all(), "gray rendered as BGR"
        small = frame.data[5::10, 6::12, 0]  # one pixel from the middle of each 12x10 block
        matches = np.flatnonzero((expected == small).all(axis=(1, 2)))
        assert len(matches) and {int(labels[i]) for i in matches} == {frame.meta["truth"]}
    assert len({f.meta["truth"] for f in frames}) > 3


# -- sensor -------------------------------------------------------------------


def _kurtosis(window: np.ndarray) -> float:
    centered = window - window.mean(axis=0)
    return float(((centered**4).mean(axis=0) / (centered**2).mean(axis=0) ** 2).mean())


def _high_band_share(window: np.ndarray, fs: float) -> float:
    spectrum = np.abs(np.fft.rfft(window - window.mean(axis=0), axis=0)) ** 2
    freqs = np.fft.rfftfreq(len(window), 1 / fs)
    return float(spectrum[freqs > fs / 8].sum() / spectrum.sum())


def test_synthetic_vibration_faults_differ_from_normal(started):
    source = started({"id": "vib", "type": "sensor", "mode": "synthetic", "fps": 200, "fault_every": 2})
    frames = collect(source, 0.6, limit=40)
    assert len(frames) >= 10
    assert all(f.data.shape == (256, 3) and f.data.dtype == np.float32 for f in frames)
    faults = [f.data for f in frames if f.meta["fault"]]
    normal = [f.data for f in frames if not f.meta["fault"]]
    assert faults and normal
    # Bearing impacts ring a resonance far above the shaft harmonics and make the signal spiky.
    high = [np.mean([_high_band_share(w, 1000.0) for w in ws]) for ws in (faults, normal)]
    assert high[0] > 3 * high[1], high
    assert np.mean([_kurtosis(w) for w in faults]) > np.mean([_kurtosis(w) for w in normal])


def test_sensor_fault_can_be_forced_and_released(started):
    source = started({"id": "vib", "type": "sensor", "fps": 100, "length": 64})
    assert not any(f.meta["fault"] for f in collect(source, 0.15))
    source.set_fault(True)
    seq = source.stats()["frames_in"] + 1
    frame = source.latest(seq, 1.0)
    assert frame.meta["fault"] is True
    source.set_fault(None)  # back to fault_rate = 0
    frame = source.latest(source.stats()["frames_in"] + 1, 1.0)
    assert frame.meta["fault"] is False


def test_csv_file_windows_and_malformed_lines(tmp_path, started, caplog):
    path = tmp_path / "accel.csv"
    good = [[i * 0.1, -i * 0.1, 1.0 + i] for i in range(8)]
    lines = ["t,x,y,z", "# calibration run"]
    lines += [f"{100 + i},{x},{y},{z}" for i, (x, y, z) in enumerate(good[:3])]
    lines += ["103,0.3,abc,4.0", "104,0.5,0.6"]  # lines 6 and 7: rejected
    lines += [f"{105 + i};{x};{y};{z}" for i, (x, y, z) in enumerate(good[3:])]
    path.write_text("\n".join(lines) + "\n")
    caplog.set_level(logging.WARNING, logger="lepton.agent.sources")
    source = started({"id": "csv", "type": "sensor", "mode": "csv", "path": str(path), "length": 4,
                      "channels": 3, "header": True, "skip_columns": 1, "loop": False, "fps": 100})
    frames = collect(source, 0.4)
    assert [f.data.shape for f in frames] == [(4, 3), (4, 3)]
    np.testing.assert_allclose(np.concatenate([f.data for f in frames]), np.asarray(good, np.float32))
    assert source.stats()["rejected"] == 2
    reasons = " | ".join(r.getMessage() for r in caplog.records)
    assert "line 6 rejected: 'abc' is not a number" in reasons


def test_a_looped_csv_file_keeps_its_rate_across_passes(tmp_path, started):
    """Two windows per pass at 20 windows/s: the start of each pass is paced like any other window (it once
    went out at once, replacing the last window of the pass before and running the loop at 700/s)."""
    path = tmp_path / "accel.csv"
    path.write_text("".join(f"{i},{-i},{i * 2}\n" for i in range(8)))
    source = started({"id": "csv", "type": "sensor", "mode": "csv", "path": str(path), "length": 4,
                      "channels": 3, "fps": 20})
    frames = collect(source, 1.0)
    assert 15 <= len(frames) <= 23
    assert source.stats()["frames_dropped"] == 0
    assert [int(f.data[0, 0]) for f in frames[:6]] == [0, 4, 0, 4, 0, 4]


def test_csv_from_a_serial_tty(started):
    master, slave = os.openpty()
    try:
        source = started({"id": "tty", "type": "sensor", "mode": "csv", "path": os.ttyname(slave),
                          "length": 3, "channels": 2})
        time.sleep(0.2)  # let the source open the port and set raw mode
        os.write(master, b"1,2\r\n3,4\r\nnoise\r\n5,")
        os.write(master, b"6\r\n")
        frame = source.latest(0, 3.0)
        assert frame is not None
        np.testing.assert_allclose(frame.data, [[1, 2], [3, 4], [5, 6]])
        assert source.stats()["rejected"] == 1
    finally:
        os.close(master)
        os.close(slave)


def _fake_iio(root, name="adxl345", raw=(100, -200, 500), scale="0.038307"):
    device = root / "iio:device0"
    device.mkdir(parents=True)
    (device / "name").write_text(name + "\n")
    for axis, value in zip("xyz", raw):
        (device / f"in_accel_{axis}_raw").write_text(f"{value}\n")
    (device / "in_accel_scale").write_text(scale + "\n")
    (device / "in_accel_z_offset").write_text("-10\n")
    return device


def test_iio_reads_raw_times_scale_in_g(tmp_path, started):
    _fake_iio(tmp_path / "iio")
    source = started({"id": "acc", "type": "sensor", "mode": "iio", "iio_root": str(tmp_path / "iio"),
                      "iio_device": "adxl345", "fs": 400, "length": 20})
    frame = source.latest(0, 3.0)
    assert frame is not None and frame.data.shape == (20, 3) and frame.data.dtype == np.float32
    expected = np.array([100, -200, 500 - 10]) * 0.038307 / 9.80665
    np.testing.assert_allclose(frame.data, np.tile(expected, (20, 1)), rtol=1e-5)
    assert source.stats()["connected"] is True


def test_iio_missing_device_is_reported_not_fatal(tmp_path, started, caplog):
    _fake_iio(tmp_path / "iio", name="bmi160")
    caplog.set_level(logging.WARNING, logger="lepton.agent.sources")
    source = started({"id": "acc", "type": "sensor", "mode": "iio", "iio_root": str(tmp_path / "iio"),
                      "iio_device": "adxl345"})
    assert source.latest(0, 0.3) is None
    assert source.stats()["connected"] is False
    assert any("no IIO device 'adxl345'" in r.getMessage() and "iio:device0 (bmi160)" in r.getMessage()
               for r in caplog.records)


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"id": "c", "type": "camera", "fsp": 10}, ["'c'", "unknown key 'fsp'"]),
        ({"id": "c", "type": "webcam"}, ["unknown type 'webcam'", "camera"]),
        ({"id": "c", "type": "camera", "fps": -5}, ["fps", "-5"]),
        ({"id": "s", "type": "synthetic", "fps": 0}, ["fps", "greater than 0"]),
        ({"id": "c"}, ["missing key 'type'"]),
        ({"type": "camera"}, ["missing key 'id'"]),
        ({"id": "a/b", "type": "camera"}, ["id", "'a/b'"]),
        ({"id": "c", "type": "camera", "width": 320}, ["width", "height"]),
        ({"id": "s", "type": "synthetic", "pattern": "stripes"}, ["pattern", "'stripes'"]),
        ({"id": "s", "type": "sensor", "mode": "csv"}, ["needs path"]),
        ({"id": "s", "type": "sensor", "fault_rate": 1.5}, ["fault_rate", "1.5"]),
        ({"id": "s", "type": "sensor", "mode": "iio", "path": "/dev/ttyUSB0"}, ["path", "'csv'"]),
        ({"id": "s", "type": "sensor", "mode": "csv", "path": "/dev/ttyUSB0", "baud": 12345}, ["baud 12345"]),
        ({"id": "v", "type": "video", "path": "/no/such/clip.mp4"}, ["path", "/no/such/clip.mp4"]),
        (["camera"], ["table"]),
    ],
)
def test_bad_config_names_the_field(config, names):
    with pytest.raises(ConfigError) as info:
        build_source(config)
    for name in names:
        assert name in str(info.value), str(info.value)


def test_every_type_is_documented_with_defaults():
    assert set(SOURCE_TYPES) == {"camera", "video", "synthetic", "sensor"}
    for kind, (config_class, _source_class) in SOURCE_TYPES.items():
        for name, field in config_class.model_fields.items():
            assert field.description, f"{kind}.{name} lacks a description"
            if name not in ("id", "type", "path"):
                assert not field.is_required(), f"{kind}.{name} lacks a default"
    config = validate_source_config({"id": "cam0", "type": "camera", "device": "2"})
    assert config.device == 2, "a string of digits is a V4L2 index"
