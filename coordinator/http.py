"""Model files over HTTP(S): what ``placement/desired`` URLs point at.

    GET /models/<name>/<version>/model.tflite     the artifact (ETag: its sha256)
    GET /models/<name>/<version>/manifest.json    its signed manifest
    GET /models/                                  index of what is served (JSON)

Range requests (one range; ``206`` + ``Content-Range``; ``416`` when it cannot
be satisfied) let an interrupted download resume; ``If-Range`` protects a
resume from mixing two versions. Any HTTP store serving the same paths (nginx,
S3) can stand in: devices only see ``[http] base_url``. Model files never go
over MQTT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lepton.coordinator.catalog import Catalog
from lepton.errors import ConfigError

log = logging.getLogger(__name__)

PATH = re.compile(r"^/models/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/([^/]{1,64})/(model\.tflite|manifest\.json)$")
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 256 * 1024


def model_url(base: str, name: str, version: str, file: str = "model.tflite") -> str:
    """Where a device fetches *file* of a model version under *base*."""
    return f"{base.rstrip('/')}/models/{name}/{version}/{file}"


class ModelServer:
    """A threaded HTTP(S) server over a ``Catalog``."""

    def __init__(self, catalog: Catalog, bind: str = "127.0.0.1", port: int = 8080, tls_cert: str = "", tls_key: str = ""):
        self.catalog = catalog
        handler = type("Handler", (_Handler,), {"catalog": catalog})
        try:
            self.server = ThreadingHTTPServer((bind, port), handler)
        except OSError as exc:
            raise ConfigError(f"http: cannot listen on {bind}:{port}: {exc.strerror}") from None
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ctx.load_cert_chain(tls_cert, tls_key or None)
            except (OSError, ssl.SSLError) as exc:
                self.server.server_close()
                raise ConfigError(f"http: cannot load TLS certificate {tls_cert}: {exc}") from None
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        """The base URL of this server (a wildcard bind is named as the loopback address)."""
        host = self.server.server_address[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> "ModelServer":
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), name="model-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    catalog: Catalog
    protocol_version = "HTTP/1.1"
    server_version = "lepton-models"

    def log_message(self, fmt: str, *args) -> None:  # route access logs through logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/models", "/models/"):
            return self._index(body)
        match = PATH.match(path)
        model = self.catalog.get(match.group(1), match.group(2)) if match else None
        if model is None:
            return self._error(HTTPStatus.NOT_FOUND, f"no such model file: {path}")
        if match.group(3) == "model.tflite":
            file, etag, ctype = model.path, model.sha256, "application/octet-stream"
        else:
            file, ctype = model.manifest_path, "application/json"
            etag = _sha256(file)
        try:
            size = file.stat().st_size
        except OSError:
            return self._error(HTTPStatus.NOT_FOUND, f"model file missing on the server: {path}")
        self._send_file(file, size, f'"{etag}"', ctype, body)

    def _send_file(self, file: Path, size: int, etag: str, ctype: str, body: bool) -> None:
        if self.headers.get("If-None-Match") == etag:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, size - 1
        status = HTTPStatus.OK
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        # A malformed or multi-range header is ignored (the whole file, 200), as RFC 9110 allows.
        if rng and RANGE.match(rng.strip()) and (if_range is None or if_range == etag):
            parsed = _parse_range(rng, size)
            if parsed is None:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = HTTPStatus.PARTIAL_CONTENT
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body and length:
            self._copy(file, start, length)

    def _copy(self, file: Path, start: int, length: int) -> None:
        try:
            with open(file, "rb") as fh:
                fh.seek(start)
                while length > 0:
                    chunk = fh.read(min(CHUNK, length))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    length -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            log.debug("client went away during %s", self.path)  # it resumes with a Range request

    def _index(self, body: bool) -> None:
        data = json.dumps([{"name": c.name, "version": c.version, "sha256": c.sha256, "size": c.size}
                           for c in self.catalog.all()]).encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: HTTPStatus, message: str) -> None:
        data = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One byte range as (first, last), or None when it cannot be satisfied."""
    match = RANGE.match(header.strip())
    if not match or size == 0:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end


_sha_cache: dict[tuple[str, float, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _sha_cache:
        _sha_cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _sha_cache[key]
