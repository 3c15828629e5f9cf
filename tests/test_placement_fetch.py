"""Model delivery over real HTTP: download, resume, local copies, and every refusal (real keys, real files)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_placement_kit import Store, build_version, flip_byte, make_keys, unloadable_version

from lepton.agent.fetch import Fetcher
from lepton.agent.reconcile import load_runner
from lepton.errors import ModelError
from lepton.models.registry import Registry, zoo_dir, zoo_public_key
from lepton.protocol import messages as m


class Runtime:
    threads, delegate, warmup, slowdown = 1, "", 3, 1.0


@pytest.fixture
def keys(tmp_path):
    return make_keys(tmp_path / "keys")


@pytest.fixture
def store():
    s = Store()
    yield s
    s.close()


def fetcher_for(tmp_path: Path, public: Path, **kw) -> Fetcher:
    zoo = Registry(zoo_dir(), trusted_keys=[zoo_public_key(), public])
    return Fetcher(tmp_path / "cache", [public], local=[zoo], **kw)


def cache_versions(fetcher: Fetcher) -> list[tuple[str, str]]:
    return [(e.name, e.version) for e in fetcher.cache.list()] if fetcher.cache.root.is_dir() else []


def test_download_verifies_installs_and_is_not_repeated(tmp_path, keys, store):
    private, public = keys
    ref = store.serve(build_version(tmp_path / "store", "digits", "2.0.0", private, public))
    sampled = []
    fetcher = fetcher_for(tmp_path, public, on_download=lambda n, s: sampled.append((n, s)))
    entry = fetcher.ensure(ref)
    assert (entry.name, entry.version, entry.manifest.sha256) == ("digits", "2.0.0", ref.sha256)
    assert Path(entry.path).is_relative_to(tmp_path / "cache") and fetcher.downloaded == 1
    assert not list((tmp_path / "cache" / ".downloads").iterdir()), "the part file is removed once installed"
    assert sampled and sampled[0][0] == ref.size, "the download is measured for the link estimate"
    # Already here: a second placement of the same version downloads nothing, even from a new process.
    again = fetcher_for(tmp_path, public)
    assert again.ensure(ref).manifest_path == entry.manifest_path and again.downloaded == 0


def test_a_model_shipped_in_the_zoo_is_not_downloaded(tmp_path, keys):
    _, public = keys
    zoo = Registry(zoo_dir()).get("digits-int8")
    man = zoo.manifest
    ref = m.ModelRef(name=man.name, version=man.version, sha256=man.sha256, size=man.size,
                     url="http://127.0.0.1:9/models/digits-int8/1.0.0/model.tflite")  # nothing listens there
    fetcher = fetcher_for(tmp_path, public)
    assert fetcher.ensure(ref).path == zoo.path and fetcher.downloaded == 0


class FlakyHandler(BaseHTTPRequestHandler):
    """Serves one file with Range support; the first whole-file answer breaks off halfway."""

    protocol_version = "HTTP/1.1"
    file: Path
    etag: str
    calls: list
    sent: list

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        data = self.file.read_bytes()
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.calls.append((rng, self.headers.get("If-Range")))
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", self.etag)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if len(self.calls) == 1:
            self.sent.append(len(data) // 2)
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the link drops mid-file
            return
        self.sent.append(len(data) - start)
        self.wfile.write(data[start:])


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path, keys, store):
    private, public = keys
    entry = build_version(tmp_path / "store", "digits", "2.0.0", private, public)
    ref = store.serve(entry)
    handler = type("H", (FlakyHandler,), {"file": Path(entry.path), "etag": f'"{ref.sha256}"', "calls": [], "sent": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, name="flaky-http", daemon=True).start()
    try:
        flaky = ref.model_copy(update={"url": f"http://127.0.0.1:{server.server_address[1]}/model.tflite"})
        got = fetcher_for(tmp_path, public).ensure(flaky)
    finally:
        server.shutdown()
        server.server_close()
    half = ref.size // 2
    assert handler.calls == [(None, None), (f"bytes={half}-", f'"{ref.sha256}"')], "one resume from the byte it had"
    assert handler.sent == [half, ref.size - half], "only the missing half travelled again"
    assert got.manifest.sha256 == ref.sha256 and Registry(got.manifest_path.parents[2], [public]).verify(got) is None


def test_every_bad_model_is_refused_naming_the_check_and_nothing_is_installed(tmp_path, keys, store):
    private, public = keys
    fetcher = fetcher_for(tmp_path, public)
    fetcher.ensure(store.serve(build_version(tmp_path / "store", "digits", "2.0.0", private, public)))
    before = cache_versions(fetcher)

    tampered = build_version(tmp_path / "store", "digits", "2.1.0", private, public)
    ref = store.serve(tampered)
    flip_byte(Path(tampered.path))  # the store's copy is changed after signing
    stranger_private, stranger_public = make_keys(tmp_path / "stranger", "stranger")
    unsigned_ref = store.serve(build_version(tmp_path / "store", "digits", "2.2.0", stranger_private, stranger_public))
    older_ref = store.serve(build_version(tmp_path / "store", "digits", "1.5.0", private, public))
    lying = ref.model_copy(update={"sha256": "0" * 64})
    cases = [(ref, "sha256 check failed"), (unsigned_ref, "signature check failed"),
             (older_ref, "version check failed: older than version 2.0.0"), (lying, "manifest check failed")]
    for bad, why in cases:
        with pytest.raises(ModelError, match=why):
            fetcher.ensure(bad)
        assert cache_versions(fetcher) == before, f"{bad.version}: nothing installed"
        assert not list((tmp_path / "cache" / ".downloads").iterdir()), "no bad part file is kept to resume from"


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resumed"])
def test_a_store_file_shorter_than_placement_named_fails_at_once(tmp_path, keys, store, resume):
    """A truncated file on the store is refused on the first answer, not retried until the attempts run out."""
    import time

    private, public = keys
    entry = build_version(tmp_path / "store", "digits", "2.0.0", private, public)
    ref = store.serve(entry)
    data = Path(entry.path).read_bytes()
    Path(entry.path).write_bytes(data[: len(data) // 3])  # the store lost the end of the file
    fetcher = fetcher_for(tmp_path, public)
    if resume:  # a part from an earlier try, longer than what the store now has: the store answers 416
        part = fetcher._part_path(ref)
        part.write_bytes(data[: len(data) // 2])
    started = time.monotonic()
    with pytest.raises(ModelError, match=rf"size check failed: the server's file is {len(data) // 3} bytes, "
                                         rf"placement named {ref.size}"):
        fetcher.ensure(ref)
    assert time.monotonic() - started < 2.0, "no retries with back-off for a file that cannot match"
    assert fetcher.downloaded == 0 and cache_versions(fetcher) == []
    assert not list((tmp_path / "cache" / ".downloads").iterdir()), "nothing kept to resume from"


def test_a_verified_file_that_cannot_load_is_refused_and_removed(tmp_path, keys, store):
    private, public = keys
    fetcher = fetcher_for(tmp_path, public)
    entry = fetcher.ensure(store.serve(unloadable_version(tmp_path / "store", "digits", "2.3.0", private)))
    with pytest.raises(ModelError, match="digits 2.3.0: load check failed"):
        load_runner(entry, Runtime)
    fetcher.discard(entry)
    assert ("digits", "2.3.0") not in cache_versions(fetcher), "a restart must not try it again"
    assert Path(zoo_dir() / "digits" / "model.tflite").exists(), "the zoo is never touched"


def test_slowdown_is_paused_and_reported(tmp_path):
    entry = Registry(zoo_dir()).get("digits-int8")
    fast, fast_ms = load_runner(entry, Runtime)

    class Slow(Runtime):
        slowdown = 40.0

    slow, slow_ms = load_runner(entry, Slow)
    assert slow_ms > 10 * fast_ms, "the reported invoke time includes the pause"
    import time

    import numpy as np

    frame = np.zeros((8, 8, 3), np.uint8)
    started = time.perf_counter()
    out, ms = slow.run(frame)
    wall = (time.perf_counter() - started) * 1000
    assert wall >= 0.9 * ms and out["top"], "the pause really happens, outside the model"


def test_slowdown_scales_the_hosts_usual_invoke_not_a_stalled_one():
    """One invoke stalled by the host's other work is not multiplied into a device hundreds of times slower."""
    import time

    from lepton.agent.runners import Runner

    class Host:  # a model whose invoke takes 2 ms, once 60 ms (the host was busy)
        name, version, sha256, input = "m", "1", "0" * 64, None
        durations = [0.002] * 10 + [0.060] + [0.002] * 3

        def invoke(self, tensor):
            time.sleep(self.durations.pop(0))
            return []

    runner = Runner(Host(), slowdown=3.0)
    reported = [runner.infer(None)[1] for _ in range(14)]
    stalled = reported[10]
    assert all(5.5 < ms < 15.0 for ms in reported[:10]), reported
    assert stalled < 90.0, f"the stalled invoke was reported as {stalled:.0f} ms (3 x 60 ms would be 180)"
    assert stalled >= 60.0, "never less than the invoke really took"
    assert all(5.5 < ms < 15.0 for ms in reported[11:]), "the stall is not carried into the next invokes"


def test_https_from_a_server_with_a_fleet_certificate(tmp_path, keys):
    """The coordinator serves HTTPS with the fleet's certificates; the device checks them against the fleet CA."""
    from lepton.coordinator.catalog import Catalog, CatalogModel
    from lepton.coordinator.http import ModelServer, model_url
    from lepton.provisioning.pki import CA, cert_pem, key_pem, new_key

    ca = CA.create("test fleet", 30)
    key = new_key()
    (tmp_path / "ca.crt").write_bytes(cert_pem(ca.cert))
    (tmp_path / "server.crt").write_bytes(cert_pem(ca.issue(key.public_key(), "coordinator", 30,
                                                            server_names=("127.0.0.1",))))
    (tmp_path / "server.key").write_bytes(key_pem(key))
    private, public = keys
    entry = build_version(tmp_path / "store", "digits", "2.0.0", private, public)
    man = entry.manifest
    catalog = Catalog(zoo_dir())
    catalog.add(CatalogModel(man.name, man.version, man.sha256, man.size, Path(entry.path), Path(entry.manifest_path)))
    server = ModelServer(catalog, "127.0.0.1", 0, str(tmp_path / "server.crt"), str(tmp_path / "server.key")).start()
    try:
        assert server.url.startswith("https://")
        ref = m.ModelRef(name=man.name, version=man.version, sha256=man.sha256, size=man.size,
                         url=model_url(server.url, man.name, man.version))
        with pytest.raises(ModelError, match="download failed.*CERTIFICATE_VERIFY_FAILED"):
            fetcher_for(tmp_path / "untrusting", public, attempts=1).ensure(ref)  # the system CAs do not know it
        got = fetcher_for(tmp_path, public, ca_file=str(tmp_path / "ca.crt")).ensure(ref)
        assert got.manifest.sha256 == man.sha256
    finally:
        server.stop()


@pytest.mark.parametrize("url, why", [
    ("/v1/models/digits/2.0.0/model.tflite", "is not an http:// or https:// URL"),  # no public base URL
    ("file:///etc/passwd", "is not an http:// or https:// URL"),
    ("http:///digits/model.tflite", "with a host"),
    ("http://[::1/model.tflite", "Invalid IPv6 URL"),
])
def test_a_url_that_is_not_http_is_refused_naming_it(tmp_path, keys, store, url, why):
    """urllib raised ValueError for a URL without a scheme, which escaped the fetcher (and the reconciler)."""
    private, public = keys
    ref = store.serve(build_version(tmp_path / "store", "digits", "2.0.0", private, public))
    fetcher = fetcher_for(tmp_path, public)
    for bad in (ref.model_copy(update={"url": url, "manifest_url": ""}), ref.model_copy(update={"manifest_url": url})):
        with pytest.raises(ModelError) as err:
            fetcher.ensure(bad)
        assert str(err.value).startswith("model digits 2.0.0: URL check failed: ") and url in str(err.value)
        assert why in str(err.value), err.value
    assert cache_versions(fetcher) == [] and fetcher.downloaded == 0


def test_a_model_cache_that_cannot_be_written_is_a_reason(tmp_path, keys, store):
    """The part file's directory was made outside any try: its OSError escaped the fetcher."""
    private, public = keys
    ref = store.serve(build_version(tmp_path / "store", "digits", "2.0.0", private, public))
    (tmp_path / "not-a-dir").write_text("")
    fetcher = Fetcher(tmp_path / "not-a-dir" / "cache", [public])
    with pytest.raises(ModelError) as err:
        fetcher.ensure(ref)
    message = str(err.value)
    assert message.startswith("model digits 2.0.0: cannot write the model cache: ") and "not-a-dir" in message
    assert "Not a directory" in message, message


def test_an_agent_reports_a_bad_url_or_cache_as_failed_and_applies_the_next_generation(tmp_path, keys, store,
                                                                                       broker, prefix):
    """The reconciler only caught LeptonError: a ValueError or OSError ended the whole generation, and the
    model stayed reported 'loading' for ever, with no reason and no retry."""
    from test_agent_standins import AgentProcess, agent_config, wait_for
    from test_placement_kit import Placer

    from lepton.protocol import Topics

    private, public = keys
    ref = store.serve(build_version(tmp_path / "store", "digits", "2.0.0", private, public))
    (tmp_path / "not-a-dir").write_text("")
    placer = Placer(broker.port, Topics(prefix))
    agent = AgentProcess(agent_config(tmp_path, broker.port, prefix,
                                      models={"cache_dir": str(tmp_path / "not-a-dir" / "cache"),
                                              "trusted_keys": [str(public)]}), tmp_path).start()
    try:
        zoo = Registry(zoo_dir()).get("digits-int8").manifest
        held = m.ModelRef(name=zoo.name, version=zoo.version, sha256=zoo.sha256, size=zoo.size,
                          url=f"{store.url}/unused")
        for bad, why in ((ref.model_copy(update={"url": "/v1/models/digits/2.0.0/model.tflite", "manifest_url": ""}),
                          "URL check failed"),
                         (ref, "cannot write the model cache")):
            gen = placer.place("dev1", models=[held, bad])
            report = wait_for(lambda: placer.report("dev1", gen), 20, f"generation {gen} applied and reported")
            state = report.models["digits"]
            assert state.state == "failed" and why in state.reason, state
            assert report.models["digits-int8"].state == "loaded", "the other model of the generation is held"
    finally:
        agent.stop()
        placer.close()


def test_the_cache_keeps_two_versions_per_model_and_those_in_use(tmp_path, keys, store):
    """Each update used to stay in the cache for ever: a device fed a new version a week fills its card."""
    import os
    import time

    private, public = keys
    fetcher = fetcher_for(tmp_path, public)
    refs = {v: store.serve(build_version(tmp_path / "store", "digits", v, private, public))
            for v in ("2.0.0", "2.1.0", "2.2.0", "2.10.0")}
    for ref in refs.values():
        fetcher.ensure(ref)
    fetcher.ensure(store.serve(build_version(tmp_path / "store", "other", "1.0.0", private, public)))
    downloads = tmp_path / "cache" / ".downloads"
    stale, fresh = downloads / "digits-3.0.0-0123456789abcdef.part", downloads / "digits-3.1.0-fedcba9876543210.part"
    for part in (stale, fresh):
        part.write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 8 * 86400,) * 2)
    (tmp_path / "cache" / ".trash-digits-1.0.0").mkdir()  # a removal a crash interrupted

    removed = fetcher.prune({("digits", "2.0.0")})  # 2.0.0 still runs (e.g. 2.10.0 failed to load)
    assert removed == [("digits", "2.1.0")]
    assert sorted(cache_versions(fetcher)) == [("digits", "2.0.0"), ("digits", "2.10.0"), ("digits", "2.2.0"),
                                               ("other", "1.0.0")]
    assert not stale.exists() and fresh.exists() and not (tmp_path / "cache" / ".trash-digits-1.0.0").exists()
    assert fetcher.prune(set()) == [("digits", "2.0.0")]
    assert Path(zoo_dir() / "digits" / "model.tflite").exists(), "the zoo is never touched"
    # what is kept still verifies and is used without a download (a rollback to 2.2.0 costs nothing)
    downloads_before = fetcher.downloaded
    assert fetcher.ensure(refs["2.2.0"]).version == "2.2.0" and fetcher.downloaded == downloads_before
