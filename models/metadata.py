"""What a .tflite file says about itself: tensors, quantisation, size, hash, ops.

Nothing here is typed by hand: tensor names, shapes, dtypes and quantisation
parameters come from the interpreter, the operator count from the FlatBuffer.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import asdict, dataclass
from typing import Any

from lepton.errors import ModelError
from lepton.models.runtime import check_model_file, load_interpreter

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


class _FlatBuffer:
    """Bounds-checked reads of the few FlatBuffer fields we need."""

    def __init__(self, data: bytes):
        self.data = data

    def _u32(self, pos: int) -> int:
        if pos < 0 or pos + 4 > len(self.data):
            raise ModelError(f"offset {pos} outside the file ({len(self.data)} bytes)")
        return struct.unpack_from("<I", self.data, pos)[0]

    def _field(self, table: int, field: int) -> int | None:
        """Absolute position of a table field, or None when absent."""
        vtable = table - struct.unpack_from("<i", self.data, table)[0] if 0 <= table <= len(self.data) - 4 else -1
        if vtable < 0 or vtable + 4 > len(self.data):
            raise ModelError(f"table at {table} has its vtable outside the file")
        vtable_size = struct.unpack_from("<H", self.data, vtable)[0]
        slot = 4 + 2 * field
        if slot + 2 > vtable_size:
            return None
        offset = struct.unpack_from("<H", self.data, vtable + slot)[0]
        return table + offset if offset else None

    def root(self) -> int:
        return self._u32(0)

    def table_vector(self, table: int, field: int) -> list[int]:
        """Positions of the tables in a vector-of-tables field ([] when absent)."""
        pos = self._field(table, field)
        if pos is None:
            return []
        start = pos + self._u32(pos)
        length = self._u32(start)
        if start + 4 + 4 * length > len(self.data):
            raise ModelError(f"vector at {start} runs past the end of the file")
        return [start + 4 + 4 * i + self._u32(start + 4 + 4 * i) for i in range(length)]

    def vector_length(self, table: int, field: int) -> int:
        pos = self._field(table, field)
        if pos is None:
            return 0
        start = pos + self._u32(pos)
        return self._u32(start)


# Field numbers from the TFLite schema (schema.fbs): Model.subgraphs, SubGraph.operators.
_MODEL_SUBGRAPHS = 2
_SUBGRAPH_OPERATORS = 3


def count_ops(data: bytes) -> int:
    """Operators over all subgraphs of a .tflite FlatBuffer; ModelError if malformed."""
    fb = _FlatBuffer(data)
    try:
        subgraphs = fb.table_vector(fb.root(), _MODEL_SUBGRAPHS)
        if not subgraphs:
            raise ModelError("the model has no subgraph")
        return sum(fb.vector_length(sg, _SUBGRAPH_OPERATORS) for sg in subgraphs)
    except struct.error as exc:
        raise ModelError(f"malformed FlatBuffer: {exc}") from None


def read_metadata(path: str | os.PathLike, interpreter: Any = None) -> ModelMetadata:
    """Metadata of a .tflite file; ModelError naming the file if it is unusable.

    Pass an already loaded ``interpreter`` for this file to avoid loading it twice.
    """
    path = check_model_file(path)
    data = path.read_bytes()
    try:
        op_count = count_ops(data)
    except ModelError as exc:
        raise ModelError(f"model file {path}: truncated or corrupt TFLite FlatBuffer: {exc}") from None
    if interpreter is None:
        interpreter = load_interpreter(path)
    return ModelMetadata(
        inputs=tuple(TensorInfo.from_detail(d) for d in interpreter.get_input_details()),
        outputs=tuple(TensorInfo.from_detail(d) for d in interpreter.get_output_details()),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        op_count=op_count,
    )


