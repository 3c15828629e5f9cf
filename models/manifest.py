"""The manifest: one JSON file per model version, stored next to its .tflite.

It says what the file is (name, version, sha256, size), how to feed it and
read it (tensors read from the file itself, the pre/post-processing spec,
labels), what was measured (metrics) and whether it was trained at all, and
carries an Ed25519 signature over all of that (see ``signing.py``).

The signed bytes are :func:`canonical_bytes`: the manifest's fields except
``signature`` as compact JSON with sorted keys, fields left at their default
omitted. Omitting defaults means a later release may add a field with a
default without invalidating every manifest signed before it, while changing
any value (or a default a manifest relied on) breaks the signature.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lepton.errors import ModelError, as_value_error, describe_validation
from lepton.models.spec import PostprocessSpec, PreprocessSpec, parse_postprocess, parse_preprocess
from lepton.protocol.topics import ID_PATTERN

MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.tflite"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few KB; refuse anything absurd unread
# Beyond the file and its tensors, an interpreter costs about this much (measured: 1-2 MiB RSS).
INTERPRETER_OVERHEAD_MB = 2.0


class TensorDesc(BaseModel):
    """One input or output tensor, as ``read_metadata`` reports it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    index: int
    name: str
    shape: list[int]
    dtype: str
    scale: float
    zero_point: int

    def info(self):
        """As a ``lepton.models.metadata.TensorInfo``."""
        from lepton.models.metadata import TensorInfo

        return TensorInfo.from_json(self.model_dump())


class Manifest(BaseModel):
    """A model version: identity, integrity, interface, processing, measurements, signature."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: int = Field(1, ge=1, le=1, description="manifest format version")
    name: str = Field(pattern=ID_PATTERN.pattern, description="model name, e.g. digits-int8")
    version: str = Field(description="PEP 440 version, e.g. 1.0.0; newer versions replace older ones")
    family: str = Field("", description="models that solve the same task differently share a family, e.g. digits")
    variant: str = Field("", description="what sets this one apart in its family, e.g. float32 or int8")
    task: str = Field("", description="classification, anomaly, detection, ...")
    file: str = Field(MODEL_NAME, description="the .tflite file, in the manifest's directory")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the file")
    size: int = Field(gt=0, description="file size in bytes")
    op_count: int = Field(0, ge=0, description="operators in the model graph")
    inputs: list[TensorDesc] = Field(description="input tensors, read from the file")
    outputs: list[TensorDesc] = Field(description="output tensors, read from the file")
    preprocess: PreprocessSpec
    postprocess: PostprocessSpec
    labels: list[str] = Field(default_factory=list, description="class labels by output index")
    metrics: dict[str, float] = Field(default_factory=dict, description="what was measured, e.g. accuracy")
    trained: bool = Field(True, description="false: random weights, useful only to measure compute cost")
    notes: str = Field("", description="how it was made and what it is for")
    memory_mb: float = Field(0.0, ge=0, description="estimated memory to hold and run it")
    heldout: str = Field("", description="held-out evaluation data file (npz), in this directory or the family's")
    key_id: str = Field("", description="which key signed it (see signing.key_id)")
    signature: str = Field("", description="base64 Ed25519 signature over canonical_bytes()")

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        try:
            Version(value)
        except InvalidVersion:
            raise ValueError(f"'{value}' is not a PEP 440 version (e.g. 1.0.0)") from None
        return value

    @field_validator("file", "heldout")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # A manifest may only name files beside it: no paths, so no escaping the registry.
        if value and (value in (".", "..") or "/" in value or "\\" in value or "\0" in value):
            raise ValueError(f"'{value}' must be a plain file name in the manifest's directory")
        return value

    @field_validator("preprocess", mode="before")
    @classmethod
    def _pre(cls, value: Any) -> PreprocessSpec:
        return as_value_error(parse_preprocess, value, where="")

    @field_validator("postprocess", mode="before")
    @classmethod
    def _post(cls, value: Any) -> PostprocessSpec:
        return as_value_error(parse_postprocess, value, where="")

    @property
    def parsed_version(self) -> Version:
        """The version, comparable (1.10 > 1.9)."""
        return Version(self.version)

    def canonical_bytes(self) -> bytes:
        """The bytes the signature covers."""
        data = self.model_dump(mode="json", exclude={"signature"}, exclude_defaults=True)
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def to_json(self) -> str:
        """The file form: indented, sorted keys; every top-level field, the specs without their defaults."""
        data = self.model_dump(mode="json")
        for key in ("preprocess", "postprocess"):
            spec = getattr(self, key)
            data[key] = {"kind": spec.kind, **spec.model_dump(mode="json", exclude_defaults=True)}
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def parse_manifest(data: Any, where: str = "manifest") -> Manifest:
    """A Manifest from a dict, JSON text or bytes; ModelError naming the bad field."""
    if isinstance(data, Manifest):
        return data
    if isinstance(data, (bytes, str)):
        if len(data) > MAX_MANIFEST_BYTES:
            raise ModelError(f"{where}: {len(data)} bytes, larger than any manifest ({MAX_MANIFEST_BYTES})")
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{where}: must be a JSON object, got {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"{where}: {describe_validation(exc, 'manifest')}") from None


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest file; ModelError naming the file and the field."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"manifest {path}: cannot be read: {exc.strerror or exc}") from None
    return parse_manifest(data, where=f"manifest {path}")


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a manifest."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(manifest.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def estimate_memory_mb(path: str | os.PathLike) -> float:
    """Memory to hold and run a model, in MiB: a deliberately generous estimate.

    File bytes (the interpreter keeps the model buffer) + every tensor's
    bytes as if none shared the arena and every weight were repacked
    (XNNPACK repacks weights) + the interpreter's own overhead. The planner
    uses it as a per-device memory budget, where overestimating is safe.
    """
    import numpy as np

    from lepton.models.runtime import load_interpreter

    interpreter = load_interpreter(path)
    tensor_bytes = 0
    for detail in interpreter.get_tensor_details():
        shape = [max(int(d), 1) for d in detail.get("shape", ())]
        tensor_bytes += int(np.prod(shape, dtype=np.int64)) * np.dtype(detail["dtype"]).itemsize
    size = Path(path).stat().st_size
    return round((size + tensor_bytes) / (1 << 20) + INTERPRETER_OVERHEAD_MB, 2)


_SPEC_KEYS = {"family", "variant", "task", "preprocess", "postprocess", "labels", "metrics", "trained", "notes",
              "heldout"}


def build_manifest(tflite_path: str | os.PathLike, name: str, version: str, spec: dict) -> Manifest:
    """An unsigned manifest for a .tflite: tensors, size and hash read from the file, the rest from ``spec``.

    ``spec`` holds what the file cannot say: preprocess and postprocess (required),
    and optionally family, variant, task, labels, metrics, trained, notes, heldout.
    """
    from lepton.models.metadata import read_metadata

    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ModelError(f"spec: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_SPEC_KEYS))})")
    for key in ("preprocess", "postprocess"):
        if key not in spec:
            raise ModelError(f"spec: '{key}' is required (how to feed the model and read its outputs)")
    path = Path(tflite_path)
    meta = read_metadata(path)
    fields = dict(spec)
    fields.setdefault("task", parse_postprocess(spec["postprocess"]).kind)
    fields.update(
        name=name, version=version, file=path.name, sha256=meta.sha256, size=meta.size, op_count=meta.op_count,
        inputs=[t.to_json() for t in meta.inputs], outputs=[t.to_json() for t in meta.outputs],
        memory_mb=estimate_memory_mb(path),
    )
    manifest = parse_manifest(fields, where=f"manifest for {path}")
    check_spec_fits(manifest)
    return manifest


def check_spec_fits(manifest: Manifest) -> None:
    """ModelError if the spec cannot feed or read this model's tensors (checked without loading it)."""
    from lepton.models.postprocess import Postprocessor
    from lepton.models.preprocess import Preprocessor

    if len(manifest.inputs) != 1:
        raise ModelError(f"{manifest.name}: has {len(manifest.inputs)} inputs; one is supported")
    inp = manifest.inputs[0].info()
    Preprocessor(manifest.preprocess, inp)
    Postprocessor(manifest.postprocess, tuple(t.info() for t in manifest.outputs), manifest.labels, input=inp)
