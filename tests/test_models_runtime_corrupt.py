"""Corrupt and truncated .tflite files become a ModelError, never a crash.

Some runtimes do not verify a model before using it (tensorflow.lite
segfaulted on a truncated file here, LiteRT on a negative quantisation
scale), so lepton walks the FlatBuffer itself before any interpreter sees it.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lepton.errors import ModelError
from lepton.models.flatbuffer import inspect_tflite
from lepton.models.runtime import load_interpreter

DATA = Path(__file__).parent / "data"
IMAGE_128 = struct.pack("<4i", 1, 128, 128, 3)


def patched(name: str, old: bytes, new: bytes) -> bytes:
    """The model with a byte pattern replaced wherever it occurs (same length)."""
    data = (DATA / name).read_bytes()
    assert data.count(old) >= 1 and len(old) == len(new)
    return data.replace(old, new)


def test_every_truncation_is_refused():
    data = (DATA / "dense_uint8.tflite").read_bytes()
    for cut in range(len(data)):
        with pytest.raises(ModelError):
            inspect_tflite(data[:cut])


def test_structure_counts_operators_tensors_and_buffers():
    found = inspect_tflite((DATA / "dense_uint8.tflite").read_bytes())
    assert (found.subgraphs, found.operators, found.tensors) == (1, 4, 8)
    assert found.buffers >= found.tensors - found.operators  # every constant has a buffer


@pytest.mark.parametrize(
    "name, old, new, message",
    [
        # The input's scale 1/255 turned negative, then zero: both crashed LiteRT 2.3.
        ("dense_uint8.tflite", struct.pack("<f", 0.003921551629900932), struct.pack("<f", -0.5), "quantisation scale"),
        ("dense_uint8.tflite", struct.pack("<f", 0.003921551629900932), struct.pack("<f", 0.0), "quantisation scale"),
        # The uint8 output's zero point 164 pushed outside 0..255.
        ("dense_uint8.tflite", struct.pack("<q", 164), struct.pack("<q", 10027172), "zero point outside"),
        # A corrupt dimension that would ask for a 51 GB input tensor.
        ("detector128_float.tflite", IMAGE_128, struct.pack("<4i", 1, 128, 33554560, 3), "GiB"),
        ("detector128_float.tflite", IMAGE_128, struct.pack("<4i", 1, -128, 128, 3), "negative"),
    ],
)
def test_corrupt_fields_are_named(tmp_path, name, old, new, message):
    path = tmp_path / name
    path.write_bytes(patched(name, old, new))
    with pytest.raises(ModelError, match=message) as err:
        load_interpreter(path)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)


def test_random_corruption_never_crashes_the_process(tmp_path):
    # In a child process: a crash there is a failed assertion here, not a dead test run.
    script = textwrap.dedent(
        """
        import random, sys
        from lepton.errors import ModelError
        from lepton.models.runtime import load_interpreter
        rng = random.Random(7)
        for name in ("dense_uint8.tflite", "classifier224_uint8.tflite", "detector128_float.tflite"):
            good = open(sys.argv[1] + "/" + name, "rb").read()
            for i in range(150):
                data = bytearray(good)
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                path = sys.argv[2] + "/fuzz.tflite"
                open(path, "wb").write(data)
                try:
                    load_interpreter(path)
                except ModelError:
                    pass
        print("survived")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(DATA), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "survived" in done.stdout, done.stderr[-2000:]
