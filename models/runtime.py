"""The one place that chooses a TFLite interpreter.

Order: ``ai_edge_litert.interpreter`` (LiteRT, the default dependency), then
``tflite_runtime.interpreter`` (the legacy wheel, needs numpy < 2), then
``tensorflow.lite``. ``LEPTON_TFLITE_RUNTIME`` (``ai-edge-litert``,
``tflite-runtime`` or ``tensorflow``) forces one of them.

Every failure to load a model or a delegate becomes a ``ModelError`` that
names the file or library and the cause, so the agent can report it and keep
serving the model it had.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lepton.errors import ConfigError, ModelError
from lepton.models.flatbuffer import inspect_tflite

log = logging.getLogger(__name__)

RUNTIME_ENV = "LEPTON_TFLITE_RUNTIME"

# (runtime name = distribution name, module holding Interpreter and load_delegate)
_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("ai-edge-litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow"),
)

# The FlatBuffer file identifier every .tflite carries at bytes 4..8.
TFLITE_IDENTIFIER = b"TFL3"


@dataclass(frozen=True)
class Runtime:
    """The interpreter implementation in use."""

    name: str
    version: str
    interpreter_cls: Any
    load_delegate: Callable[..., Any]


def _import_runtime(name: str, module_name: str) -> Runtime:
    module = importlib.import_module(module_name)
    if name == "tensorflow":
        interpreter_cls = module.lite.Interpreter
        load_delegate = module.lite.experimental.load_delegate
    else:
        interpreter_cls = module.Interpreter
        load_delegate = module.load_delegate
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        # tensorflow-cpu and similar distributions install the same module.
        version = str(getattr(module, "__version__", "unknown"))
    return Runtime(name, version, interpreter_cls, load_delegate)


@functools.lru_cache(maxsize=None)
def get_runtime() -> Runtime:
    """The first importable runtime (or the one ``LEPTON_TFLITE_RUNTIME`` names)."""
    forced = os.environ.get(RUNTIME_ENV, "").strip()
    candidates = _CANDIDATES
    if forced:
        candidates = tuple(c for c in _CANDIDATES if c[0] == forced)
        if not candidates:
            names = ", ".join(c[0] for c in _CANDIDATES)
            raise ConfigError(f"{RUNTIME_ENV}={forced!r} is not a known runtime (choose one of: {names})")
    errors = []
    for name, module_name in candidates:
        try:
            runtime = _import_runtime(name, module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        log.debug("TFLite runtime: %s %s", runtime.name, runtime.version)
        return runtime
    raise ModelError("no TFLite runtime could be imported (pip install ai-edge-litert); tried " + "; ".join(errors))


def runtime_info() -> tuple[str, str]:
    """(runtime name, version), e.g. ``("ai-edge-litert", "2.3.0")``."""
    runtime = get_runtime()
    return runtime.name, runtime.version


def check_model_file(model_path: str | os.PathLike) -> Path:
    """Cheap checks before the interpreter sees the file; ModelError naming the cause."""
    path = Path(model_path)
    if not path.exists():
        raise ModelError(f"model file {path}: not found")
    if not path.is_file():
        raise ModelError(f"model file {path}: not a regular file")
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelError(f"model file {path}: cannot be read: {exc.strerror or exc}") from None
    if len(head) < 8:
        raise ModelError(f"model file {path}: truncated ({len(head)} bytes), not a TFLite model")
    if head[4:8] != TFLITE_IDENTIFIER:
        raise ModelError(
            f"model file {path}: not a TFLite model (identifier {head[4:8]!r}, expected {TFLITE_IDENTIFIER!r})"
        )
    return path


def read_model_bytes(path: Path) -> bytes:
    """The file's bytes after a structural check (a corrupt file can crash some runtimes)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"model file {path}: cannot be read: {exc.strerror or exc}") from None
    try:
        inspect_tflite(data)
    except ModelError as exc:
        raise ModelError(f"model file {path}: truncated or corrupt: {exc}") from None
    return data


def load_delegate(library: str, options: dict[str, Any] | None = None) -> Any:
    """Load a TFLite delegate (e.g. ``libedgetpu.so.1``); ModelError naming the library."""
    try:
        # dlopen first: its message says *why* (missing file, wrong arch), the
        # runtime's own message only says that loading failed.
        handle = ctypes.CDLL(library)
    except OSError as exc:
        raise ModelError(f"delegate library {library!r} cannot be loaded: {exc}") from None
    if not hasattr(handle, "tflite_plugin_create_delegate"):
        raise ModelError(f"delegate library {library!r} is not a TFLite delegate (no tflite_plugin_create_delegate)")
    try:
        return get_runtime().load_delegate(library, options or {})
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"delegate library {library!r} loaded but the delegate failed to start: {exc}") from None


def load_interpreter(
    model_path: str | os.PathLike,
    num_threads: int = 1,
    delegate: str | None = None,
    delegate_options: dict[str, Any] | None = None,
) -> Any:
    """An Interpreter with tensors allocated, ready to invoke.

    ``num_threads`` must be >= 1. ``delegate`` is a library path or soname
    (e.g. ``libedgetpu.so.1``); a missing library gives a ModelError naming
    it. A missing, truncated or garbage model file gives a ModelError naming
    the file and the cause.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ConfigError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    path = check_model_file(model_path)
    data = read_model_bytes(path)
    runtime = get_runtime()
    delegates = [load_delegate(delegate, delegate_options)] if delegate else None
    try:
        # From the verified bytes, not the path: what was checked is what runs.
        interpreter = runtime.interpreter_cls(
            model_content=data, num_threads=num_threads, experimental_delegates=delegates
        )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        cause = "truncated or corrupt" if "flatbuffer" in reason.lower() else "cannot be loaded"
        raise ModelError(f"model file {path}: {cause}: {runtime.name} says: {reason}") from None
    log.debug("loaded %s with %s %s (threads=%d, delegate=%s)", path, runtime.name, runtime.version,
              num_threads, delegate)
    return interpreter
