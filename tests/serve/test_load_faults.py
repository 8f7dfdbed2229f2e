"""``sparsecircuits serve --audit-dir`` as a real process under concurrent load and faults: every
acknowledged (200) request has exactly one ``complete`` record, and ``audit verify`` passes,
after SIGKILLs at random moments, a torn tail, several processes, a full disk and an
unwritable audit directory.

Each test starts its own servers on 127.0.0.1 (the shipped ``stdlib-sparse``), kills only the
PIDs it started, and bounds every wait. The tmpfs tests mount a small tmpfs (root only) and
skip when mounting is not permitted.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from sparsecircuits.audit.layout import read_records
from sparsecircuits.audit.signing import keygen
from sparsecircuits.cli import app as cli_app

PROMPTS = (
    "def add(a, b):\n    return",
    "import os\n\ndef main():\n",
    "for i in range(10):\n    if i % 2 ==",
    "with open(path) as f:\n    data =",
)
READY_S = 45.0  # loading the model under a busy machine
TORN = b'{"v":1,"log":"w0","seq'  # half a record line


# ---------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:  # loopback
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """``sparsecircuits serve`` as a child process on 127.0.0.1 (output to ``log``)."""

    def __init__(self, args: list[str], *, log: Path, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "sparsecircuits.cli", "serve", "--port", str(self.port),
               "--device", "cpu", *args]  # fmt: skip
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, *, processes: int = 1, timeout: float = READY_S) -> None:
        """Until GET /v1/models answers 200 and ``processes`` apps have started (bounded)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.text()[-3000:]}"
                )
            try:
                ok = httpx.get(f"{self.base}/v1/models", timeout=2).status_code == 200  # loopback
            except httpx.HTTPError:
                ok = False
            if ok and self.text().count("Application startup complete") >= processes:
                return
            time.sleep(0.1)
        raise AssertionError(f"no answer from {self.base} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL this server (the PID this test started) and reap it."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (graceful: the final checkpoint), SIGKILL to its own PIDs if it hangs."""
        if self.proc.poll() is not None:
            return
        children = _children(self.proc.pid)  # uvicorn's worker processes, if any
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            for pid in children:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


@contextmanager
def serving(args: list[str], *, log: Path, processes: int = 1):
    srv = Serve(args, log=log)
    try:
        srv.wait_ready(processes=processes)
        yield srv
    finally:
        srv.stop()


def _body(i: int, max_tokens: int = 4) -> dict[str, Any]:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.0}


def drive(base: str, *, clients: int, requests: int, limit_s: float = 50.0) -> list[tuple]:
    """``requests`` completions from ``clients`` coroutines over one connection pool:
    (status code or exception name, response id or None) each, bounded by ``limit_s``."""
    results: list[tuple] = []
    order = random.Random(0).sample(range(requests), requests)

    async def run() -> None:
        todo = iter(order)
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        # loopback: 127.0.0.1 only
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

            async def one() -> None:
                for i in todo:
                    try:
                        r = await client.post("/v1/completions", json=_body(i))
                        rid = r.json().get("id") if r.status_code == 200 else None
                        results.append((r.status_code, rid))
                    except (httpx.HTTPError, ValueError) as exc:
                        results.append((type(exc).__name__, None))

            await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), limit_s)

    asyncio.run(run())
    return results


class BackgroundLoad:
    """``threads`` clients posting completions until stopped, through server restarts:
    every outcome is kept as (status code or exception name, response id or None)."""

    def __init__(self, base: str, *, threads: int = 4) -> None:
        self.base, self.results = base, []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,)) for t in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, t: int) -> None:
        i = t
        with httpx.Client(base_url=self.base, timeout=20) as client:  # loopback
            while not self._stop.is_set():
                i += len(self._threads)
                try:
                    r = client.post("/v1/completions", json=_body(i))
                    out = (r.status_code, r.json().get("id") if r.status_code == 200 else None)
                except (httpx.HTTPError, ValueError) as exc:
                    out = (type(exc).__name__, None)
                    self._stop.wait(0.05)  # the server is down: do not spin
                with self._lock:
                    self.results.append(out)

    def ok(self) -> int:
        with self._lock:
            return sum(1 for s, _ in self.results if s == 200)

    def wait_ok(self, n: int, timeout: float = 20.0) -> None:
        """Until ``n`` more requests got 200 (bounded)."""
        target, t0 = self.ok() + n, time.monotonic()
        while self.ok() < target:
            assert time.monotonic() - t0 < timeout, f"no {n} answers within {timeout} s"
            time.sleep(0.02)

    def stop(self) -> list[tuple]:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        return list(self.results)


records = read_records  # every parseable record of every log, by log name


def assert_acknowledged_recorded(trail: Path, results: list[tuple]) -> Counter:
    """Every 200 id has exactly one start and one complete record over all logs; returns the
    count of complete records by request id."""
    starts: Counter[str] = Counter()
    completes: Counter[str] = Counter()
    for recs in records(trail).values():
        for r in recs:
            if r["kind"] == "start":
                starts[r["request_id"]] += 1
            elif r["kind"] == "complete":
                completes[r["request_id"]] += 1
    ok = [rid for status, rid in results if status == 200]
    assert ok, "no request was acknowledged"
    assert len(set(ok)) == len(ok), "a response id was answered twice"
    missing = [rid for rid in ok if completes[rid] != 1]
    assert not missing, f"{len(missing)} acknowledged requests lack exactly one complete record"
    assert all(starts[rid] == 1 for rid in ok), "an acknowledged request lacks its start record"
    assert max(completes.values()) == 1, "a request has two complete records"
    return completes


VERIFY_RE = re.compile(
    r"^OK log (\S+): (\d+) records .* (\d+) recovered tails, (\d+) started but not completed$"
)


def verify(trail: Path, pub: Path) -> dict[str, tuple[int, int, int]]:
    """``sparsecircuits audit verify``: asserts exit 0; per log (records, recovered tails,
    started but not completed)."""
    res = CliRunner().invoke(cli_app, ["audit", "verify", str(trail), "--pubkey", str(pub)])
    assert res.exit_code == 0, res.output
    logs = {}
    for line in res.output.splitlines():
        m = VERIFY_RE.match(line)
        if m:
            logs[m.group(1)] = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
    assert logs, res.output
    return logs


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub, _ = keygen(tmp_path / "keys")
    return priv, pub


def _audit_args(trail: Path, key: Path, *extra: str) -> list[str]:
    return ["--audit-dir", str(trail), "--audit-key", str(key), *extra]


@contextmanager
def tmpfs(path: Path, *options: str):
    """A tmpfs mounted at ``path`` (skips the test when mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join(["size=256k", *options])
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
    try:
        yield path
    finally:
        res = subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _assert_audit_503(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["type"] == "audit_unavailable", err
    assert "Traceback" not in r.text and 'File "' not in r.text


# ---------------------------------------------------------------------------- (a) load
@pytest.mark.slow
def test_load_every_acknowledged_request_is_recorded(tmp_path: Path, keys):
    priv, pub = keys
    trail = tmp_path / "audit"
    args = _audit_args(trail, priv, "--queue", "16")
    with serving(args, log=tmp_path / "server.log") as srv:
        results = drive(srv.base, clients=16, requests=150)
    codes = Counter(str(s) for s, _ in results)
    assert len(results) == 150
    assert not [c for c in codes if not c.isdigit() or c.startswith("5")], codes
    assert codes["200"] + codes["429"] == 150, codes
    assert codes["200"] >= 140, codes  # the queue holds every client: 429 is not expected
    assert_acknowledged_recorded(trail, results)
    logs = verify(trail, pub)
    assert list(logs) == ["w0"] and logs["w0"][2] == 0  # nothing left unfinished
    print(f"\nload: {dict(codes)}; verify {logs}")


# ---------------------------------------------------------------------------- (b) crashes
@pytest.mark.slow
def test_sigkill_at_random_moments_and_a_torn_tail(tmp_path: Path, keys):
    """SIGKILL the server three times under load (seeded random moments), restarting it on
    the same trail each time; then tear the last record line while it is down. Every
    acknowledged request keeps its complete record and the trail verifies."""
    priv, pub = keys
    trail = tmp_path / "audit"
    args = _audit_args(trail, priv, "--queue", "16")
    rng = random.Random(21)
    port, log = _free_port(), tmp_path / "server.log"
    srv = Serve(args, log=log, port=port)
    load = None
    try:
        srv.wait_ready()
        load = BackgroundLoad(srv.base, threads=4)
        for _ in range(3):
            load.wait_ok(3)  # requests are flowing through this server
            time.sleep(rng.uniform(0.0, 1.0))
            srv.kill()
            srv = Serve(args, log=log, port=port)
            srv.wait_ready()
        load.wait_ok(3)
        srv.kill()
        seg = sorted((trail / "w0").glob("seg-*.jsonl"))[-1]
        ended_clean = seg.read_bytes().endswith(b"\n")
        with open(seg, "ab") as f:  # half a record, as if the machine died mid-write
            f.write(TORN)
        srv = Serve(args, log=log, port=port)
        srv.wait_ready()
        load.wait_ok(5)
        results = load.stop()
        load = None
    finally:
        if load is not None:
            load.stop()
        srv.stop()
    quarantined = list((trail / "w0" / "quarantine").iterdir())
    assert quarantined and any(p.read_bytes().endswith(TORN) for p in quarantined)
    recs = records(trail)["w0"]
    recoveries = [r for r in recs if r["kind"] == "recovery"]
    assert recoveries and recoveries[-1]["bytes"] >= len(TORN)
    if ended_clean:  # the kill left whole lines: exactly the torn bytes were moved aside
        assert recoveries[-1]["bytes"] == len(TORN)
    assert sum(r["kind"] == "open" for r in recs) == 5  # one per start
    assert_acknowledged_recorded(trail, results)
    logs = verify(trail, pub)
    n_records, recovered, unfinished = logs["w0"]
    assert recovered == len(recoveries) >= 1
    codes = Counter(str(s) for s, _ in results)
    assert not [c for c in codes if c.isdigit() and c.startswith("5")], codes
    print(f"\ncrashes: client outcomes {dict(codes)}; {n_records} records, {recovered} "
          f"recovered tails, {unfinished} started but not completed")  # fmt: skip


# ---------------------------------------------------------------------------- (c) scale-out
@pytest.mark.slow
def test_two_processes_write_two_logs(tmp_path: Path, keys):
    priv, pub = keys
    trail = tmp_path / "audit"
    args = _audit_args(trail, priv, "--queue", "16", "--processes", "2")
    with serving(args, log=tmp_path / "server.log", processes=2) as srv:
        results = drive(srv.base, clients=16, requests=64)
    codes = Counter(str(s) for s, _ in results)
    assert codes["200"] + codes["429"] == 64 and codes["200"] >= 48, codes
    completes = assert_acknowledged_recorded(trail, results)
    logs = verify(trail, pub)
    assert sorted(logs) == ["w0", "w1"]
    per_log = {
        name: sum(r["kind"] == "complete" for r in recs) for name, recs in records(trail).items()
    }
    assert sum(per_log.values()) == sum(completes.values())
    print(f"\nscale-out: {dict(codes)}; complete records per log {per_log}")


# ---------------------------------------------------------------------------- (d) disk faults
def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` with a filler file until a write fails."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for _ in range(10_000):
            try:
                f.write(b"\0" * 4096)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                break
        with suppress(OSError):  # the last partial page
            while f.write(b"\0" * 64):
                pass
    return filler


@pytest.mark.slow
def test_full_disk_answers_503_then_recovers(tmp_path: Path, keys):
    priv, pub = keys
    with tmpfs(tmp_path / "fs") as fs:
        trail = fs / "audit"
        srv = Serve(_audit_args(trail, priv), log=tmp_path / "server.log")
        try:
            srv.wait_ready()
            with httpx.Client(base_url=srv.base, timeout=30) as client:  # loopback
                for i in range(3):
                    assert client.post("/v1/completions", json=_body(i)).status_code == 200
                filler = _fill(fs)
                seen: list[int] = []
                for i in range(60):  # the segment's last page may still take a few records
                    r = client.post("/v1/completions", json=_body(i))
                    seen.append(r.status_code)
                    if r.status_code == 503:
                        break
                assert seen[-1] == 503, seen
                assert set(seen) <= {200, 503}, seen
                _assert_audit_503(r)
                more = [client.post("/v1/completions", json=_body(i)) for i in range(5)]
                for r in more:  # still full: still refused
                    _assert_audit_503(r)
                # /healthz names no error here: a failed write is not a lasting state (the
                # next append tries again), so it still says "ok" while every request is refused.
                filler.unlink()
                t0, back = time.monotonic(), None
                while time.monotonic() - t0 < 15:  # a failed checkpoint is retried each second
                    back = client.post("/v1/completions", json=_body(0))
                    if back.status_code == 200:
                        break
                    assert back.status_code == 503, back.text
                    time.sleep(0.25)
                assert back is not None and back.status_code == 200, back.text
                after = [client.post("/v1/completions", json=_body(i)) for i in range(5)]
                assert [r.status_code for r in after] == [200] * 5
        finally:
            srv.stop()
        text = srv.text()
        assert "Traceback" not in text, text[-3000:]
        for seg in (trail / "w0").glob("seg-*.jsonl"):
            assert seg.read_bytes().endswith(b"\n"), f"{seg}: a torn line"
        logs = verify(trail, pub)
        assert logs["w0"][1] == 0  # no recovered tail: nothing was torn
        print(f"\nfull disk: before the first 503 {seen}; verify {logs}")


@contextmanager
def unwritable(tmp_path: Path, how: str):
    """An --audit-dir nobody can create a log in, even root: under a regular file, or a
    read-only tmpfs."""
    if how == "file":
        (tmp_path / "not-a-dir").write_text("")
        yield tmp_path / "not-a-dir" / "audit"
    else:
        with tmpfs(tmp_path / "ro", "ro") as path:
            yield path


@pytest.mark.slow
@pytest.mark.parametrize("how", ["file", "read-only"])
def test_unwritable_audit_dir_refuses_with_503(tmp_path: Path, keys, how):
    priv, _ = keys
    with unwritable(tmp_path, how) as trail:
        srv = Serve(_audit_args(trail, priv), log=tmp_path / "server.log")
        try:
            srv.wait_ready()
            with httpx.Client(base_url=srv.base, timeout=30) as client:  # loopback
                for i in range(3):
                    _assert_audit_503(client.post("/v1/completions", json=_body(i)))
                assert client.get("/healthz").json()["audit"]["error"]
        finally:
            srv.stop()


# ---------------------------------------------------------------------------- (e) recovery
def test_a_recovery_record_that_cannot_be_written_is_not_lost(tmp_path: Path, keys, monkeypatch):
    """The disk fills between moving a torn tail aside and recording that: the next open must
    still write the recovery record, in the same log."""
    from sparsecircuits.audit.log import AuditLog, AuditUnavailable
    from sparsecircuits.audit.signing import load_signer

    priv, pub = keys
    signer, trail = load_signer(priv), tmp_path / "audit"
    first = AuditLog(trail, signer)
    for i in range(3):
        first.sync(first.append("start", {"request_id": f"r{i}"}))
    first.close()
    with open(sorted((trail / "w0").glob("seg-*.jsonl"))[-1], "ab") as f:
        f.write(TORN)
    write = AuditLog._write

    def no_space_for_recovery(self, data: bytes) -> None:
        if b'"kind":"recovery"' in data:
            raise AuditUnavailable("audit log w0: write failed (No space left on device)")
        write(self, data)

    monkeypatch.setattr(AuditLog, "_write", no_space_for_recovery)
    with pytest.raises(AuditUnavailable):
        AuditLog(trail, signer)
    monkeypatch.setattr(AuditLog, "_write", write)
    again = AuditLog(trail, signer)  # the disk has room again
    try:
        assert again.log_id == "w0"
        assert again.recovered is not None
    finally:
        again.close()
    assert list((trail / "w0" / "quarantine").iterdir())
    assert verify(trail, pub)["w0"][1] == 1  # the quarantined tail is explained
