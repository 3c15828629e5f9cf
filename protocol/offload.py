"""Binary framing for offloaded inputs (``devices/{origin}/offload/{target}/{model}``).

A frame is ``b"LPO1"`` + 4-byte big-endian header length + JSON header +
body. The body is the preprocessed tensor's raw bytes (``encoding: raw``,
shape and dtype in the header) or a JPEG of the input frame
(``encoding: jpeg``, where the model's spec allows it). Binary keeps a
96x96x3 uint8 input at 27 KiB instead of ~100 KiB of JSON numbers.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lepton.errors import ProtocolError
from lepton.protocol.topics import ID_PATTERN

MAGIC = b"LPO1"
MAX_FRAME_BYTES = 8 * 1024 * 1024
_HDR = struct.Struct(">I")
DTYPES = ("uint8", "int8", "int16", "int32", "float16", "float32")

Id = Annotated[str, Field(pattern=ID_PATTERN.pattern)]


class OffloadHeader(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = 1
    origin: Id
    stream: Id
    request: Annotated[int, Field(ge=0)]
    model: Id
    version: str = ""
    encoding: Literal["raw", "jpeg"] = "raw"
    dtype: Literal[DTYPES] = "uint8"  # type: ignore[valid-type]
    shape: list[Annotated[int, Field(ge=1, le=65536)]] = []
    sent_at: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    captured_at: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


def encode_frame(header: OffloadHeader, body: bytes) -> bytes:
    """Pack a header and body into one frame."""
    head = header.model_dump_json().encode()
    return MAGIC + _HDR.pack(len(head)) + head + body


def decode_frame(payload: bytes) -> tuple[OffloadHeader, bytes]:
    """Unpack and validate a frame; ProtocolError names what is wrong."""
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"offload: frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise ProtocolError("offload: not an LPO1 frame")
    (n,) = _HDR.unpack_from(payload, 4)
    if n > 64 * 1024 or 8 + n > len(payload):
        raise ProtocolError(f"offload: header length {n} does not fit the frame")
    try:
        header = OffloadHeader.model_validate_json(payload[8 : 8 + n])
    except (ValidationError, ValueError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"offload: bad header: {str(exc).splitlines()[0]}") from None
    body = payload[8 + n :]
    if header.encoding == "raw":
        import numpy as np

        expected = int(np.prod(header.shape or [0])) * np.dtype(header.dtype).itemsize
        if expected != len(body):
            raise ProtocolError(f"offload: body is {len(body)} bytes, shape {header.shape} {header.dtype} needs {expected}")
    return header, body
