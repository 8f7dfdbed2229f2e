"""Attacks and faults a hostile review found: a retention statement copied from another log,
a stray file hiding the logs, a checkpoint failure at a segment switch, hostile nesting, a
failing retention, and a segment name that is a directory."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from sparsecircuits.audit import layout
from sparsecircuits.audit import log as audit_log


def _with_retention(open_log, fill, trail: Path, *, log_id: str) -> None:
    """60 records in segments of 10; the two newest kept (records 0..39 deleted)."""
    log = open_log(trail, log_id=log_id, segment_records=10, retain_segments=2)
    fill(log, 60)
    log.close()


def _plain(open_log, fill, trail: Path, *, log_id: str) -> None:
    log = open_log(trail, log_id=log_id, segment_records=10)
    fill(log, 60)
    log.close()


def _delete_below(log_dir: Path, below: int) -> None:
    for first, path in layout.segments(log_dir):
        if first < below:
            path.unlink()


def test_retention_statement_of_another_log_is_refused(tmp_path, open_log, fill, verify):
    _with_retention(open_log, fill, tmp_path, log_id="w1")
    _plain(open_log, fill, tmp_path, log_id="w0")
    assert verify(tmp_path)["w0"].ok and verify(tmp_path)["w1"].ok  # the control
    shutil.copy(tmp_path / "w1" / layout.RETENTION_FILE, tmp_path / "w0" / layout.RETENTION_FILE)
    _delete_below(tmp_path / "w0", 50)
    damage = verify(tmp_path)["w0"].damages[0]
    assert damage.kind == "forged_retention" and "of log 'w1'" in damage.message


def test_retention_statement_of_a_same_named_log_elsewhere_is_refused(
    tmp_path, open_log, fill, verify
):
    """Replicas on two machines sharing a key both write ``w0``: one's statement must not
    explain deletions in the other."""
    a, b = tmp_path / "a", tmp_path / "b"
    _with_retention(open_log, fill, a, log_id="w0")
    _plain(open_log, fill, b, log_id="w0")
    shutil.copy(a / "w0" / layout.RETENTION_FILE, b / "w0" / layout.RETENTION_FILE)
    _delete_below(b / "w0", 40)
    damage = verify(b)["w0"].damages[0]
    assert damage.kind == "forged_retention" and "another tree head" in damage.message


def test_trusted_checkpoint_below_retention_is_compared(tmp_path, open_log, fill, verify):
    _with_retention(open_log, fill, tmp_path, log_id="w0")
    cp = tmp_path / "w0" / layout.CHECKPOINT_DIR / layout.checkpoint_name(20)
    trusted = json.loads(cp.read_bytes())
    assert verify(tmp_path, trusted=[trusted])["w0"].ok
    cp.unlink()  # the log no longer holds the head the auditor kept
    assert verify(tmp_path, trusted=[trusted])["w0"].damages[0].kind == "deleted"


def test_a_stray_segment_at_the_top_does_not_hide_the_logs(tmp_path, open_log, fill, verify):
    _plain(open_log, fill, tmp_path, log_id="w0")
    seg = layout.segments(tmp_path / "w0")[1][1]
    seg.write_bytes(seg.read_bytes().replace(b'"req-00', b'"req-99', 1))
    (tmp_path / layout.segment_name(0)).touch()
    reports = verify(tmp_path)
    assert reports["w0"].damages[0].kind == "edited"


def test_hostile_nesting_and_a_directory_named_like_a_segment(tmp_path, open_log, fill, verify):
    _plain(open_log, fill, tmp_path, log_id="w0")
    seg = layout.segments(tmp_path / "w0")[-1][1]
    lines = seg.read_bytes().split(b"\n")
    lines[3] = b"[" * 200_000 + b"]" * 200_000
    seg.write_bytes(b"\n".join(lines))
    damage = verify(tmp_path)["w0"].damages[0]
    assert damage.kind in ("edited", "inserted") and damage.seq == 53
    (tmp_path / "w0" / layout.segment_name(60)).mkdir()  # not a file: not a segment
    assert verify(tmp_path)["w0"].damages[0].seq == 53


def test_checkpoint_failure_at_a_segment_switch_recovers(tmp_path, open_log, fill, monkeypatch):
    """A head written while idle at a segment boundary; the switch must not need it again,
    and a failing checkpoint elsewhere clears once writes succeed (no spinning meanwhile)."""
    log = open_log(tmp_path, segment_records=5, checkpoint_seconds=0.05)
    fill(log, 5)
    deadline = time.monotonic() + 5
    while log.state()["checkpointed"] < 5:  # the commit thread's timed head at 5
        assert time.monotonic() < deadline
        time.sleep(0.02)
    real = audit_log.atomic_write_bytes
    failing = {"on": True}

    def write(path, data):
        if failing["on"] and path.parent.name == layout.CHECKPOINT_DIR:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(audit_log, "atomic_write_bytes", write)
    fill(log, 1, start=5)  # the switch: its head exists, so no rewrite is needed
    assert log.state()["error"] is None
    fill(log, 2, start=6)
    time.sleep(0.3)  # a timed checkpoint fails
    assert log.state()["error"] is not None
    failing["on"] = False
    deadline = time.monotonic() + 5
    while log.state()["error"] is not None:
        assert time.monotonic() < deadline, "the checkpoint error never cleared"
        time.sleep(0.05)
    fill(log, 1, start=8)


def test_a_failing_retention_deletes_nothing_and_keeps_writing(
    tmp_path, open_log, fill, verify, monkeypatch
):
    real = audit_log.atomic_write_bytes

    def write(path, data):
        if path.name == layout.RETENTION_FILE:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(audit_log, "atomic_write_bytes", write)
    log = open_log(tmp_path, segment_records=10, retain_segments=2)
    fill(log, 40)  # retention would have run twice
    log.close()
    assert len(layout.segments(tmp_path / "w0")) == 4  # nothing deleted without a statement
    assert verify(tmp_path)["w0"].ok


@pytest.mark.parametrize("requests", [1, 0])
def test_refused_request_refunds_its_whole_charge(requests: int) -> None:
    """A request refused after admission (full queue, no audit record) gives back its request
    and all its tokens; with the request count kept (the control) the key runs dry."""
    from sparsecircuits.serve.access import ApiKey, KeyStore, RateLimiter

    key = ApiKey(id="k", sha256="0" * 64, scope="user", requests_per_minute=2,
                 tokens_per_minute=100, created="2026-01-01T00:00:00+00:00")  # fmt: skip
    limiter = RateLimiter(KeyStore([key]))
    for _ in range(2):
        assert limiter.acquire(key, tokens=40, now=0.0) is None
        limiter.refund(key, tokens=40, requests=requests, now=0.0)
    wait = limiter.acquire(key, tokens=100, now=0.0)
    assert (wait is None) == (requests == 1)


def test_an_unsigned_chain_head_refuses_to_start(tmp_path, open_log, fill, signer):
    """A last record replaced by unsigned JSON with the right seq and prev: the server must
    not sign new records on top of it."""
    from sparsecircuits.audit.log import AuditDamaged
    from sparsecircuits.audit.records import canonical, parse_line

    log = open_log(tmp_path, checkpoint_records=1000, checkpoint_seconds=3600)
    fill(log, 6)
    log.close(checkpoint=False)  # no final head: the tail is covered by signatures only
    seg = layout.segments(tmp_path / "w0")[-1][1]
    lines = seg.read_bytes().split(b"\n")
    doc = parse_line(lines[-2])
    lines[-2] = canonical({**doc, "request_id": "forged"})  # same seq and prev, bad signature
    seg.write_bytes(b"\n".join(lines))
    with pytest.raises(AuditDamaged, match="not signed by this server's key"):
        open_log(tmp_path, log_id="w0", checkpoint_records=1000)
