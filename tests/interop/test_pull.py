"""``pull``: downloads from a loopback blob store (a thread in this process, 127.0.0.1 only),
resumed after an interruption, checked against pinned or given hashes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from sparsecircuits.errors import DownloadError, InputError
from sparsecircuits.interop import pull as pull_mod
from sparsecircuits.interop.pull import MANIFEST_FILE, Artefact, pull
from sparsecircuits.model.io import load_model
from tests.model.test_official_format import BASE_CONFIG, official_state, resolve, write_official

TIMEOUT = 5.0  # seconds; everything is local, so any wait this long is a failure
PREFIX = "circuit-sparsity"


@dataclass
class Store:
    """What the loopback server serves, and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)  # path below the base URL -> bytes
    cut_first: dict[str, int] = field(default_factory=dict)  # drop after N body bytes, once
    ignore_range: bool = False  # answer every request with the whole file (200)
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    url: str = ""


def _handler(store: Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            path = self.path.removeprefix(f"/{PREFIX}/")
            rng = self.headers.get("Range")
            store.seen.append((path, rng))
            data = store.files.get(path)
            if data is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if_range = self.headers.get("If-Range")
            if if_range is not None and if_range != etag:  # changed: RFC 9110, the whole file
                m = None
            if m and not store.ignore_range:
                start = int(m.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = store.cut_first.pop(path, None)
            if cut is not None:  # announce the whole body, send part of it, hang up
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

    return Handler


@pytest.fixture
def store(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # never through a proxy
    monkeypatch.delenv(pull_mod.BLOB_URL_ENV, raising=False)
    s = Store()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    s.url = f"http://127.0.0.1:{httpd.server_address[1]}/{PREFIX}"
    try:
        yield s
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny official model directory, plus stand-in tokenizer files, as store contents."""
    directory = write_official(
        tmp_path_factory.mktemp("official"), BASE_CONFIG, official_state(resolve(BASE_CONFIG), 0)
    )
    out = {f"models/csp_yolo1/{p.name}": p.read_bytes() for p in directory.iterdir()}
    out["tinypython/encoder.json"] = b'{"a": 0}'
    out["tinypython/vocab.bpe"] = b"#version: 0.2\n"
    return out


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_registry_model_lands_in_the_cache_and_loads(store, official_files, tmp_path, caplog):
    store.files.update(official_files)
    with caplog.at_level(logging.WARNING, logger="sparsecircuits.interop.pull"):
        got = pull("csp_yolo1", cache=tmp_path, url=store.url, timeout=TIMEOUT)
    assert got == tmp_path / "csp_yolo1"
    for path, data in official_files.items():
        assert (got / Path(path).name).read_bytes() == data
    assert not list(tmp_path.rglob("*.part"))
    manifest = json.loads((got / MANIFEST_FILE).read_text())
    assert manifest["final_model.pt"]["sha256"] == _sha(official_files[
        "models/csp_yolo1/final_model.pt"])  # fmt: skip
    assert manifest["final_model.pt"]["pinned"] is False
    assert "unverified" in caplog.text  # nothing is pinned yet: say so
    load_model(got)  # an official directory our loader opens
    n = len(store.seen)
    assert pull("csp_yolo1", cache=tmp_path, url=store.url, timeout=TIMEOUT) == got
    assert len(store.seen) == n  # already there: no request at all


def test_interrupted_transfer_resumes_byte_identical(store, official_files, tmp_path):
    store.files.update(official_files)
    path = "models/csp_yolo1/final_model.pt"
    store.cut_first[path] = 1000
    got = pull("blob:models/csp_yolo1", cache=tmp_path, url=store.url, timeout=TIMEOUT)
    assert (got / "final_model.pt").read_bytes() == official_files[path]
    ranges = [r for p, r in store.seen if p == path]
    assert ranges == [None, "bytes=1000-"]
    assert not list(tmp_path.rglob("*.part"))


def test_interruption_without_retries_keeps_the_part_for_the_next_run(store, tmp_path):
    data = os.urandom(30_000)
    store.files["x/a.bin"] = data
    store.cut_first["x/a.bin"] = 7_000
    with pytest.raises(DownloadError, match=r"interrupted .* 7000 bytes kept .*run pull again"):
        pull("blob:x/a.bin", cache=tmp_path, url=store.url, retries=0, timeout=TIMEOUT)
    part = tmp_path / "blob/x/a.bin.part"
    assert part.read_bytes() == data[:7_000] and not part.with_suffix("").exists()
    got = pull("blob:x/a.bin", cache=tmp_path, url=store.url, retries=0, timeout=TIMEOUT)
    assert got.read_bytes() == data and not part.exists()
    assert [r for _, r in store.seen] == [None, "bytes=7000-"]


def test_a_file_that_changed_between_attempts_is_not_spliced(store, tmp_path):
    old, new = os.urandom(30_000), os.urandom(30_000)  # same size: only If-Range can tell
    store.files["x/a.bin"] = old
    store.cut_first["x/a.bin"] = 9_000
    with pytest.raises(DownloadError, match="interrupted"):
        pull("blob:x/a.bin", cache=tmp_path, url=store.url, retries=0, timeout=TIMEOUT)
    store.files["x/a.bin"] = new  # replaced on the server before the resume
    got = pull("blob:x/a.bin", cache=tmp_path, url=store.url, retries=0, timeout=TIMEOUT)
    assert got.read_bytes() == new
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob("*.etag"))


def test_existing_part_file_is_resumed(store, tmp_path):
    data = os.urandom(50_000)
    store.files["viz/m/t/s/9/viz_data.pt"] = data
    dest = tmp_path / "blob/viz/m/t/s/9/viz_data.pt"
    dest.parent.mkdir(parents=True)
    dest.with_name("viz_data.pt.part").write_bytes(data[:12_345])
    got = pull("blob:viz/m/t/s/9/viz_data.pt", cache=tmp_path, url=store.url, sha256=_sha(data),
               timeout=TIMEOUT)  # fmt: skip
    assert got == dest and got.read_bytes() == data
    assert store.seen == [("viz/m/t/s/9/viz_data.pt", "bytes=12345-")]
    assert sorted(_files(tmp_path)) == [dest.with_name(MANIFEST_FILE), dest]  # no .part left
    # a pinned-by-argument file is not fetched twice
    pull("blob:viz/m/t/s/9/viz_data.pt", cache=tmp_path, url=store.url, sha256=_sha(data))
    assert len(store.seen) == 1


def test_server_without_range_support_restarts_from_zero(store, tmp_path):
    data = os.urandom(20_000)
    store.files["x/a.bin"] = data
    store.ignore_range = True
    dest = tmp_path / "blob/x/a.bin"
    dest.parent.mkdir(parents=True)
    dest.with_name("a.bin.part").write_bytes(b"stale bytes from another file")
    got = pull("blob:x/a.bin", cache=tmp_path, url=store.url, timeout=TIMEOUT)
    assert got.read_bytes() == data


def test_wrong_checksum_is_refused_and_nothing_is_left(store, tmp_path):
    data = os.urandom(10_000)
    store.files["x/a.bin"] = data
    with pytest.raises(DownloadError) as err:
        pull("blob:x/a.bin", cache=tmp_path, url=store.url, sha256="0" * 64, timeout=TIMEOUT)
    msg = str(err.value)
    assert "a.bin" in msg and "0" * 64 in msg and _sha(data) in msg and "\n" not in msg
    assert _files(tmp_path) == []


def test_pinned_registry_entries_are_checked(store, tmp_path, monkeypatch, caplog):
    data = b"pinned bytes"
    store.files["p/a.bin"] = data
    monkeypatch.setitem(pull_mod.REGISTRY, "good", (Artefact("p/a.bin", "a.bin", 12, _sha(data)),))
    monkeypatch.setitem(pull_mod.REGISTRY, "bad_size", (Artefact("p/a.bin", "a.bin", 13),))
    monkeypatch.setitem(pull_mod.REGISTRY, "bad_sha", (Artefact("p/a.bin", "a.bin", 12, "f" * 64),))
    with caplog.at_level(logging.WARNING, logger="sparsecircuits.interop.pull"):
        assert (pull("good", cache=tmp_path, url=store.url) / "a.bin").read_bytes() == data
    assert "unverified" not in caplog.text
    assert json.loads((tmp_path / "good" / MANIFEST_FILE).read_text())["a.bin"]["pinned"]
    with pytest.raises(DownloadError, match=r"a\.bin: expected 13 bytes .*got 12"):
        pull("bad_size", cache=tmp_path, url=store.url)
    with pytest.raises(DownloadError, match=r"a\.bin: expected sha256 f{64}, got " + _sha(data)):
        pull("bad_sha", cache=tmp_path, url=store.url)
    assert not (tmp_path / "bad_size").exists() and not (tmp_path / "bad_sha").exists()


def test_missing_artefact_is_a_one_line_404(store, tmp_path):
    with pytest.raises(DownloadError) as err:
        pull("blob:viz/none/viz_data.pt", cache=tmp_path, url=store.url, timeout=TIMEOUT)
    assert str(err.value) == f"no such artefact at {store.url}/viz/none/viz_data.pt (HTTP 404)"
    assert _files(tmp_path) == []


def test_refused_connection_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with socket.socket() as s:  # a port nobody listens on (bound, then released)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1") as err:
        pull("tinypython", cache=tmp_path, url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # not even an empty folder


def test_base_url_from_the_environment(store, tmp_path, monkeypatch):
    store.files["x/a.bin"] = b"abc"
    monkeypatch.setenv(pull_mod.BLOB_URL_ENV, store.url)
    assert pull("blob:x/a.bin", cache=tmp_path).read_bytes() == b"abc"


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("csp_nope", {}, "unknown artefact 'csp_nope'; known: csp_yolo1"),
        ("blob:../etc/passwd", {}, "no '..'"),
        ("blob:viz/a/b", {}, "not a file"),
        ("hub:not a repo", {}, "hub:OWNER/REPO"),
        ("csp_yolo1", {"sha256": "a" * 64}, "single-file blob:PATH only"),
        ("blob:x/a.bin", {"sha256": "xyz"}, "64 hex digits"),
        ("blob:x/a.bin", {"url": "ftp://example.org"}, "expected http"),
    ],
)
def test_bad_names_and_options(tmp_path, name, kwargs, match):
    with pytest.raises(InputError, match=re.escape(match)):
        pull(name, cache=tmp_path, **kwargs)
    assert _files(tmp_path) == []


def test_hub_snapshot_only_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        Path(kwargs["local_dir"]).mkdir(parents=True)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    got = pull("hub:openai/circuit-sparsity", cache=tmp_path)
    assert got == tmp_path / "hub" / "openai--circuit-sparsity"
    assert calls == [{"repo_id": "openai/circuit-sparsity", "local_dir": got,
                      "force_download": False}]  # fmt: skip

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DownloadError, match=r"^hub:openai/circuit-sparsity: OSError: We") as err:
        pull("hub:openai/circuit-sparsity", cache=tmp_path)
    assert "second line" not in str(err.value)


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSECIRCUITS_CACHE": str(cache), "NO_PROXY": "127.0.0.1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop(pull_mod.BLOB_URL_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "sparsecircuits.cli", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_cli_pull_and_its_one_line_errors(store, tmp_path):
    data = torch.arange(10).numpy().tobytes()
    store.files["viz/m/t/s/3/viz_data.pt"] = data
    res = _cli("pull", "blob:viz/m/t/s/3/viz_data.pt", "--base-url", store.url, "--sha256",
               _sha(data), "--timeout", "5", cache=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    want = tmp_path / "pull" / "blob/viz/m/t/s/3/viz_data.pt"  # the cache's pull/ by default
    assert str(want) in res.stdout and want.read_bytes() == data
    res = _cli("pull", "blob:viz/m/t/s/4/viz_data.pt", "--base-url", store.url, cache=tmp_path)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no such artefact at {store.url}/viz/m/t/s/4/viz_data.pt (HTTP 404)"]
    assert "Traceback" not in res.stderr
