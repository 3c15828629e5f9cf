"""Model files over HTTP: whole, ranged (resume), ETag, 404 and 416."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import subprocess

import pytest

from lepton.coordinator.catalog import Catalog, CatalogModel
from lepton.coordinator.http import ModelServer, model_url
from lepton.errors import ConfigError


@pytest.fixture
def served(tmp_path):
    """A server over one model version whose artifact is 300 KB of random bytes (crosses chunk sizes)."""
    data = os.urandom(300_000)
    model = tmp_path / "model.tflite"
    model.write_bytes(data)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"name": "digits", "version": "1.2.0"}))
    catalog = Catalog(tmp_path)
    sha = hashlib.sha256(data).hexdigest()
    catalog.add(CatalogModel("digits", "1.2.0", sha, len(data), model, manifest))
    server = ModelServer(catalog, "127.0.0.1", 0).start()
    yield server, data, sha
    server.stop()


def get(server, path, headers=None, method="GET", context=None):
    cls = http.client.HTTPSConnection if context else http.client.HTTPConnection
    kwargs = {"context": context} if context else {}
    conn = cls("127.0.0.1", server.port, timeout=10, **kwargs)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_whole_file_with_sha256_etag(served):
    server, data, sha = served
    url = model_url(server.url, "digits", "1.2.0")
    assert url == f"{server.url}/models/digits/1.2.0/model.tflite"
    resp, body = get(server, "/models/digits/1.2.0/model.tflite")
    assert resp.status == 200 and body == data
    assert resp.getheader("ETag") == f'"{sha}"' and resp.getheader("Accept-Ranges") == "bytes"
    resp, _ = get(server, "/models/digits/1.2.0/model.tflite", {"If-None-Match": f'"{sha}"'})
    assert resp.status == 304


def test_interrupted_download_resumes_with_range(served):
    server, data, sha = served
    # A download cut after 123,457 bytes resumes from there and the pieces join into the original.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/models/digits/1.2.0/model.tflite")
    first = conn.getresponse().read(123_457)
    conn.close()
    resp, rest = get(server, "/models/digits/1.2.0/model.tflite",
                     {"Range": f"bytes={len(first)}-", "If-Range": f'"{sha}"'})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes {len(first)}-{len(data) - 1}/{len(data)}"
    assert hashlib.sha256(first + rest).hexdigest() == sha
    resp, tail = get(server, "/models/digits/1.2.0/model.tflite", {"Range": "bytes=-100"})
    assert resp.status == 206 and tail == data[-100:]
    resp, mid = get(server, "/models/digits/1.2.0/model.tflite", {"Range": "bytes=10-19"})
    assert resp.status == 206 and mid == data[10:20] and resp.getheader("Content-Length") == "10"


def test_resume_against_a_changed_file_gets_the_whole_new_file(served):
    server, data, _ = served
    resp, body = get(server, "/models/digits/1.2.0/model.tflite", {"Range": "bytes=100-", "If-Range": '"0000"'})
    assert resp.status == 200 and body == data  # never splice two versions together


def test_unsatisfiable_range_is_416_and_malformed_is_ignored(served):
    server, data, _ = served
    resp, body = get(server, "/models/digits/1.2.0/model.tflite", {"Range": f"bytes={len(data)}-"})
    assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{len(data)}" and body == b""
    resp, body = get(server, "/models/digits/1.2.0/model.tflite", {"Range": "bytes=5-1"})
    assert resp.status == 416
    resp, body = get(server, "/models/digits/1.2.0/model.tflite", {"Range": "pages=1-2"})
    assert resp.status == 200 and body == data


@pytest.mark.parametrize("path", [
    "/models/digits/9.9.9/model.tflite",  # unknown version
    "/models/nope/1.2.0/model.tflite",  # unknown model
    "/models/digits/1.2.0/other.bin",  # not a served file
    "/models/../../etc/passwd",
    "/",
])
def test_unknown_paths_are_404(served, path):
    server, _, _ = served
    resp, body = get(server, path)
    assert resp.status == 404 and b"no such model file" in body


def test_manifest_and_index(served):
    server, _, _ = served
    resp, body = get(server, "/models/digits/1.2.0/manifest.json")
    assert resp.status == 200 and json.loads(body)["version"] == "1.2.0"
    assert resp.getheader("Content-Type") == "application/json"
    resp, body = get(server, "/models/")
    assert [m["name"] for m in json.loads(body)] == ["digits"]
    resp, body = get(server, "/models/digits/1.2.0/model.tflite", method="HEAD")
    assert resp.status == 200 and body == b"" and resp.getheader("Content-Length") == "300000"


def test_https_with_certificate_files(tmp_path, served):
    _, data, _ = served
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = ModelServer(served[0].catalog, "127.0.0.1", 0, str(cert), str(key)).start()
    try:
        assert server.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        resp, body = get(server, "/models/digits/1.2.0/model.tflite", {"Range": "bytes=0-9"}, context=ctx)
        assert resp.status == 206 and body == data[:10]
    finally:
        server.stop()


def test_port_in_use_is_a_clear_error(served):
    server, _, _ = served
    with pytest.raises(ConfigError, match="cannot listen"):
        ModelServer(server.catalog, "127.0.0.1", server.port)


def test_a_configured_registry_is_offered_beside_the_zoo_while_the_zoo_key_is_trusted(tmp_path):
    """A fleet that adds its own models ([models] dir) keeps offering the zoo's, unless it stopped trusting
    the zoo's key; a version in its directory wins over the same version in the zoo."""
    from test_placement_kit import DIGITS_SPEC as spec
    from test_placement_kit import INT8_FILE, make_keys

    from lepton.models.registry import Registry, zoo_dir, zoo_public_key

    private, public = make_keys(tmp_path / "keys")
    own = tmp_path / "models"
    Registry(own, trusted_keys=[public]).add(INT8_FILE, "digits-fleet", "1.0.0", spec, private)
    zoo = {(c.name, c.version) for c in Catalog(zoo_dir()).reload()}
    assert ("digits-int8", "1.0.0") in zoo

    only_own = {(c.name, c.version) for c in Catalog(own, [public]).reload()}
    assert only_own == {("digits-fleet", "1.0.0")}
    both = Catalog(own, [public, zoo_public_key()])
    assert {(c.name, c.version) for c in both.reload()} == zoo | {("digits-fleet", "1.0.0")}
    assert both.roots() == [own, zoo_dir()]
    # The same name and version in the fleet's directory, signed by the fleet: that copy is offered.
    Registry(own, trusted_keys=[public]).add(INT8_FILE, "digits-int8", "1.0.0", spec, private)
    mine = both
    mine.reload()
    assert mine.get("digits-int8", "1.0.0").manifest_path.parent.parent.parent == own
