"""What a .tflite file says about itself: tensors, quantisation, size, hash, ops.

Nothing here is typed by hand: tensor names, shapes, dtypes and quantisation
parameters come from the interpreter, the operator count from the FlatBuffer (models/flatbuffer.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any

from lepton.models.flatbuffer import inspect_tflite
from lepton.models.runtime import check_model_file, load_interpreter, read_model_bytes

_QUANTISED_DTYPES = frozenset({"uint8", "int8", "int16"})


@dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor of a model."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "uint8", "int8", ...
    scale: float  # 0.0 when the tensor is not quantised
    zero_point: int

    @property
    def quantized(self) -> bool:
        """True if real = scale * (q - zero_point) applies to this tensor."""
        return self.dtype in _QUANTISED_DTYPES and self.scale > 0.0

    @classmethod
    def from_detail(cls, detail: dict[str, Any]) -> "TensorInfo":
        """Build from one entry of ``Interpreter.get_input_details()``."""
        import numpy as np

        scale, zero_point = detail.get("quantization", (0.0, 0)) or (0.0, 0)
        return cls(
            index=int(detail["index"]),
            name=str(detail["name"]),
            shape=tuple(int(d) for d in detail["shape"]),
            dtype=np.dtype(detail["dtype"]).name,
            scale=float(scale),
            zero_point=int(zero_point),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (shape as a list)."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorInfo":
        """Inverse of :meth:`to_json`."""
        return cls(
            index=int(data["index"]),
            name=str(data["name"]),
            shape=tuple(int(d) for d in data["shape"]),
            dtype=str(data["dtype"]),
            scale=float(data["scale"]),
            zero_point=int(data["zero_point"]),
        )


@dataclass(frozen=True)
class ModelMetadata:
    """Facts about one .tflite file."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    size: int  # bytes
    sha256: str  # hex
    op_count: int  # operators over all subgraphs

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "size": self.size,
            "sha256": self.sha256,
            "op_count": self.op_count,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelMetadata":
        """Inverse of :meth:`to_json`."""
        return cls(
            inputs=tuple(TensorInfo.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorInfo.from_json(t) for t in data["outputs"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            op_count=int(data["op_count"]),
        )


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(path: str | os.PathLike, interpreter: Any = None) -> ModelMetadata:
    """Metadata of a .tflite file; ModelError naming the file if it is unusable.

    Pass an already loaded ``interpreter`` for this file to avoid loading it twice.
    """
    path = check_model_file(path)
    data = read_model_bytes(path)
    op_count = inspect_tflite(data).operators
    if interpreter is None:
        interpreter = load_interpreter(path)
    return ModelMetadata(
        inputs=tuple(TensorInfo.from_detail(d) for d in interpreter.get_input_details()),
        outputs=tuple(TensorInfo.from_detail(d) for d in interpreter.get_output_details()),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        op_count=op_count,
    )


