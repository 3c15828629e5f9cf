"""A bounds-checked walk over the structure of a .tflite FlatBuffer.

Some runtimes (tensorflow.lite, older tflite-runtime) do not verify a model
before using it, and a truncated or corrupt file then crashes the process.
This walk checks what an interpreter dereferences first (every table,
vector and string it reaches, tensor/buffer/opcode indices) so such a file
becomes a ModelError instead. It also counts operators for the metadata.

Field numbers follow the TFLite schema (schema.fbs).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lepton.errors import ModelError

# Model
_OPERATOR_CODES, _SUBGRAPHS, _BUFFERS = 1, 2, 4
# SubGraph
_SG_TENSORS, _SG_INPUTS, _SG_OUTPUTS, _SG_OPERATORS = 0, 1, 2, 3
# Tensor
_T_SHAPE, _T_TYPE, _T_BUFFER, _T_NAME, _T_QUANTIZATION, _T_SPARSITY = 0, 1, 2, 3, 4, 6
# Operator
_OP_OPCODE, _OP_INPUTS, _OP_OUTPUTS, _OP_OPTIONS, _OP_CUSTOM = 0, 1, 2, 4, 5
# Buffer
_B_DATA, _B_OFFSET, _B_SIZE = 0, 1, 2
# QuantizationParameters
_Q_SCALE, _Q_ZERO_POINT = 2, 3

# No edge device holds a larger tensor; a corrupt shape must not become an
# allocation that gets the process OOM-killed.
MAX_TENSOR_BYTES = 1 << 30
_MIN_SCALE = 1e-30  # smallest positive float32 scale worth dividing by (tiny denormals overflow)

# TensorType -> (bytes per element, zero point range); unlisted types are not checked.
_TYPES = {
    0: (4, None),  # FLOAT32
    1: (2, None),  # FLOAT16
    2: (4, (-(2**31), 2**31 - 1)),  # INT32
    3: (1, (0, 255)),  # UINT8
    4: (8, None),  # INT64
    6: (1, None),  # BOOL
    7: (2, (-(2**15), 2**15 - 1)),  # INT16
    9: (1, (-128, 127)),  # INT8
}


@dataclass(frozen=True)
class Structure:
    """Counts found by :func:`inspect_tflite`."""

    subgraphs: int
    operators: int  # over all subgraphs
    tensors: int  # over all subgraphs
    buffers: int


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def need(self, pos: int, length: int, what: str) -> None:
        if pos < 0 or length < 0 or pos + length > self.size:
            raise ModelError(f"{what} at byte {pos} (+{length}) lies outside the file ({self.size} bytes)")

    def unpack(self, fmt: str, pos: int, what: str):
        self.need(pos, struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, pos)[0]

    def table(self, pos: int, what: str) -> tuple[int, int, int]:
        """(table position, vtable position, vtable size), all checked."""
        soffset = self.unpack("<i", pos, what)
        vtable = pos - soffset
        vsize = self.unpack("<H", vtable, f"{what} vtable")
        if vsize < 4 or vsize % 2:
            raise ModelError(f"{what} at byte {pos} has a malformed vtable (size {vsize})")
        self.need(vtable, vsize, f"{what} vtable")
        self.need(pos, self.unpack("<H", vtable + 2, f"{what} vtable"), what)  # the table's inline fields
        return pos, vtable, vsize

    def field(self, table: tuple[int, int, int], field: int) -> int | None:
        pos, vtable, vsize = table
        slot = 4 + 2 * field
        if slot + 2 > vsize:
            return None
        offset = self.unpack("<H", vtable + slot, "vtable entry")
        return pos + offset if offset else None

    def scalar(self, table, field: int, fmt: str, default: int, what: str) -> int:
        pos = self.field(table, field)
        return default if pos is None else self.unpack(fmt, pos, what)

    def ref(self, table, field: int, what: str) -> int | None:
        """Position of the object a table field points to, or None when absent."""
        pos = self.field(table, field)
        return None if pos is None else pos + self.unpack("<I", pos, what)

    def vector(self, table, field: int, elem: int, what: str) -> tuple[int, int]:
        """(position of the first element, length), checked; (0, 0) when absent."""
        start = self.ref(table, field, what)
        if start is None:
            return 0, 0
        length = self.unpack("<I", start, what)
        self.need(start + 4, length * elem, what)
        return start + 4, length

    def ints(self, table, field: int, what: str) -> tuple[int, ...]:
        first, length = self.vector(table, field, 4, what)
        return struct.unpack_from(f"<{length}i", self.data, first) if length else ()

    def tables(self, table, field: int, what: str) -> list[tuple[int, int, int]]:
        first, length = self.vector(table, field, 4, what)
        return [self.table(first + 4 * i + self.unpack("<I", first + 4 * i, what), what) for i in range(length)]


def _check_indices(values: tuple[int, ...], limit: int, what: str, optional: bool = False) -> None:
    low = -1 if optional else 0  # -1 marks an omitted optional operator input
    for value in values:
        if not low <= value < limit:
            raise ModelError(f"{what} refers to tensor {value}, but the subgraph has {limit}")


def _check_tensor(r: _Reader, tensor, buffers: list[int], what: str) -> None:
    """Shape, quantisation and constant data that an interpreter would trust."""
    first, rank = r.vector(tensor, _T_SHAPE, 4, f"{what} shape")
    shape = struct.unpack_from(f"<{rank}i", r.data, first) if rank else ()
    if any(d < 0 for d in shape):
        raise ModelError(f"{what} has a negative dimension in shape {shape}")
    r.vector(tensor, _T_NAME, 1, f"{what} name")
    dtype = r.scalar(tensor, _T_TYPE, "<b", 0, f"{what} type")
    elem, zp_range = _TYPES.get(dtype, (None, None))
    quant = r.ref(tensor, _T_QUANTIZATION, f"{what} quantization")
    if quant is not None:
        q = r.table(quant, f"{what} quantization")
        first, n_scales = r.vector(q, _Q_SCALE, 4, f"{what} scales")
        scales = struct.unpack_from(f"<{n_scales}f", r.data, first) if n_scales else ()
        first, n_zps = r.vector(q, _Q_ZERO_POINT, 8, f"{what} zero points")
        zero_points = struct.unpack_from(f"<{n_zps}q", r.data, first) if n_zps else ()
        # Integer tensors divide by their scale: it must be > 0. Chained
        # comparisons are False for NaN, so NaN is refused too.
        low = 0.0 if zp_range is None else _MIN_SCALE
        if any(not low <= s < float("inf") for s in scales):
            raise ModelError(f"{what} has an invalid quantisation scale {scales[:4]}")
        if zp_range and any(not zp_range[0] <= z <= zp_range[1] for z in zero_points):
            raise ModelError(f"{what} has a zero point outside its type's range {zp_range}")
    if elem and elem * _product(shape) > MAX_TENSOR_BYTES:
        raise ModelError(f"{what} shape {shape} needs more than {MAX_TENSOR_BYTES >> 30} GiB")
    buffer = r.scalar(tensor, _T_BUFFER, "<I", 0, f"{what} buffer")
    if buffer >= max(len(buffers), 1):
        raise ModelError(f"{what} refers to buffer {buffer}, but the model has {len(buffers)}")
    size = buffers[buffer] if buffer else 0
    sparse = r.field(tensor, _T_SPARSITY) is not None  # stored compressed: no fixed size
    if size and elem and not sparse and size != elem * _product(shape):
        raise ModelError(f"{what} has {size} bytes of data, its shape {shape} needs {elem * _product(shape)}")


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def _check_subgraph(r: _Reader, sg, buffers: list[int], n_opcodes: int, number: int) -> tuple[int, int]:
    where = f"subgraph {number}"
    tensors = r.tables(sg, _SG_TENSORS, f"{where} tensors")
    for i, tensor in enumerate(tensors):
        _check_tensor(r, tensor, buffers, f"{where} tensor {i}")
    _check_indices(r.ints(sg, _SG_INPUTS, f"{where} inputs"), len(tensors), f"{where} inputs")
    _check_indices(r.ints(sg, _SG_OUTPUTS, f"{where} outputs"), len(tensors), f"{where} outputs")
    operators = r.tables(sg, _SG_OPERATORS, f"{where} operators")
    for i, op in enumerate(operators):
        opcode = r.scalar(op, _OP_OPCODE, "<I", 0, f"{where} operator {i} opcode")
        if opcode >= n_opcodes:
            raise ModelError(f"{where} operator {i} has opcode {opcode}, but the model defines {n_opcodes}")
        _check_indices(r.ints(op, _OP_INPUTS, "inputs"), len(tensors), f"{where} operator {i} inputs", optional=True)
        _check_indices(r.ints(op, _OP_OUTPUTS, "outputs"), len(tensors), f"{where} operator {i} outputs")
        options = r.ref(op, _OP_OPTIONS, f"{where} operator {i} options")
        if options is not None:
            r.table(options, f"{where} operator {i} options")
        r.vector(op, _OP_CUSTOM, 1, f"{where} operator {i} custom options")
    return len(operators), len(tensors)


def _buffer_size(r: _Reader, buffer, i: int) -> int:
    """Bytes of a buffer's data, checked to lie inside the file."""
    _, length = r.vector(buffer, _B_DATA, 1, f"buffer {i} data")
    offset = r.scalar(buffer, _B_OFFSET, "<Q", 0, f"buffer {i} offset")
    if offset > 1:  # data stored after the FlatBuffer (models > 2 GB)
        length = r.scalar(buffer, _B_SIZE, "<Q", 0, f"buffer {i} size")
        r.need(offset, length, f"buffer {i} external data")
    return length


def inspect_tflite(data: bytes) -> Structure:
    """Walk a .tflite FlatBuffer; ModelError naming the first inconsistency."""
    r = _Reader(data)
    try:
        model = r.table(r.unpack("<I", 0, "root offset"), "model")
        opcodes = r.tables(model, _OPERATOR_CODES, "operator codes")
        buffers = [_buffer_size(r, b, i) for i, b in enumerate(r.tables(model, _BUFFERS, "buffers"))]
        subgraphs = r.tables(model, _SUBGRAPHS, "subgraphs")
        if not subgraphs:
            raise ModelError("the model has no subgraph")
        counts = [_check_subgraph(r, sg, buffers, len(opcodes), n) for n, sg in enumerate(subgraphs)]
    except struct.error as exc:  # defensive: need() should catch every short read first
        raise ModelError(f"malformed FlatBuffer: {exc}") from None
    return Structure(
        subgraphs=len(subgraphs),
        operators=sum(c[0] for c in counts),
        tensors=sum(c[1] for c in counts),
        buffers=len(buffers),
    )
