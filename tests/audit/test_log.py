"""The audit log writer: chain across restarts, one writer per log, crash recovery, durability
(sync, group commit), failures (a failed write, a full disk, an unwritable directory, a failed
fsync), time-based checkpoints, retention, and the final checkpoint on close.

Faults are injected through :class:`conftest.OsStandIn`, which replaces only the ``os`` name
inside ``sparsecircuits.audit.log``. Bugs found are pinned by ``xfail(strict=True)`` tests
next to the behaviour they concern.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sparsecircuits.audit import layout
from sparsecircuits.audit.log import AuditDamaged, AuditLog, AuditUnavailable, LogOptions
from sparsecircuits.audit.records import record_hash
from sparsecircuits.audit.signing import Signer

QUIET = {"checkpoint_records": 1000, "checkpoint_seconds": 3600.0}  # checkpoints only on close


def seg_lines(log_dir: Path) -> list[bytes]:
    """Every record line of a log (no newlines), across its segments."""
    out: list[bytes] = []
    for _, path in layout.segments(log_dir):
        out.extend(path.read_bytes().splitlines())
    return out


def last_segment(log_dir: Path) -> Path:
    return layout.segments(log_dir)[-1][1]


def release_leaked_lock(excinfo: pytest.ExceptionInfo, lock: Path) -> None:
    """Close the LOCK descriptor a constructor that raised left open (see
    test_refused_open_releases_the_slot), so later tests in this process are not affected.
    Only a descriptor that still refers to ``lock`` itself is closed."""
    ino = lock.stat().st_ino
    tb = excinfo.tb
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        fd = getattr(obj, "_lock_fd", None) if isinstance(obj, AuditLog) else None
        if isinstance(fd, int):
            try:
                if os.fstat(fd).st_ino == ino:
                    os.close(fd)
            except OSError:
                pass
        tb = tb.tb_next


# --------------------------------------------------------------------------- chain, slots
def test_chain_and_seq_continue_across_reopen(tmp_path: Path, open_log, fill, verify) -> None:
    log = open_log(tmp_path, segment_records=4, checkpoint_records=3)
    assert fill(log, 6) == list(range(6))
    log.close()
    before = seg_lines(tmp_path / "w0")

    again = open_log(tmp_path, segment_records=4, checkpoint_records=3)
    assert (again.log_id, again.size, again.durable) == ("w0", 6, 6)
    assert again.recovered is None
    again.close()  # a session that appends nothing
    again = open_log(tmp_path, segment_records=4, checkpoint_records=3)
    assert fill(again, 5, start=6) == list(range(6, 11))
    again.close()

    lines = seg_lines(tmp_path / "w0")
    assert lines[:6] == before
    first_new = json.loads(lines[6])
    assert first_new["seq"] == 6 and first_new["prev"] == record_hash(before[-1]).hex()
    rep = verify(tmp_path)["w0"]
    assert rep.ok and rep.records == 11 and rep.unsigned_tail == 0, rep.damages


def test_two_writers_get_their_own_logs(tmp_path: Path, open_log, fill, verify) -> None:
    a, b = open_log(tmp_path), open_log(tmp_path)
    assert (a.log_id, b.log_id) == ("w0", "w1")
    with pytest.raises(AuditUnavailable, match="held"):
        open_log(tmp_path, log_id="w0")
    fill(a, 3)
    fill(b, 2, start=3)
    a.close()
    c = open_log(tmp_path, log_id="w0")  # released by close
    assert c.size == 3
    c.close()
    b.close()
    reports = verify(tmp_path)
    assert sorted(reports) == ["w0", "w1"]
    assert [reports[k].records for k in ("w0", "w1")] == [3, 2]
    assert all(r.ok for r in reports.values())


# --------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("what", ["half-line", "non-record-line"])
def test_torn_tail_is_quarantined_on_reopen(tmp_path: Path, open_log, fill, verify, what) -> None:
    log = open_log(tmp_path)
    fill(log, 5)
    log.close()
    seg = last_segment(tmp_path / "w0")
    good = seg.stat().st_size
    # A crash mid-write leaves the start of a line; a line that is no record is handled alike.
    torn = seg_lines(tmp_path / "w0")[-1][:100] if what == "half-line" else b"not a record\n"
    with seg.open("ab") as f:
        f.write(torn)
    assert not verify(tmp_path)["w0"].ok

    again = open_log(tmp_path)
    quarantined = tmp_path / "w0" / layout.QUARANTINE_DIR / f"{seg.name}.{good}.torn"
    assert quarantined.read_bytes() == torn
    assert again.size == 6  # 5 records and the recovery record
    recovery = json.loads(seg_lines(tmp_path / "w0")[-1])
    assert recovery["kind"] == "recovery" and recovery["seq"] == 5
    assert recovery["file"] == seg.name and recovery["offset"] == good
    assert recovery["bytes"] == len(torn)
    assert recovery["sha256"] == hashlib.sha256(torn).hexdigest()
    assert recovery["quarantined_as"] == f"{layout.QUARANTINE_DIR}/{quarantined.name}"
    fill(again, 2, start=5)
    again.close()

    rep = verify(tmp_path)["w0"]
    assert rep.ok and rep.records == 8, rep.damages
    assert rep.recoveries == [{"seq": 5, "file": seg.name, "offset": good, "bytes": len(torn)}]


@pytest.mark.parametrize("how", ["line-deleted", "field-edited", "prev-edited", "garbage-line"])
def test_broken_chain_refuses_to_reopen(tmp_path: Path, open_log, fill, how: str) -> None:
    log = open_log(tmp_path)
    fill(log, 8)
    log.close()
    seg = last_segment(tmp_path / "w0")
    data = seg.read_bytes()
    lines = data.split(b"\n")
    doc = json.loads(lines[2])  # a start record, in the middle
    if how == "line-deleted":
        del lines[2]
    elif how == "field-edited":  # its hash changes, so record 3's prev no longer matches
        lines[2] = lines[2].replace(b'"top_p":0.9', b'"top_p":0.8')
    elif how == "prev-edited":
        lines[2] = lines[2].replace(doc["prev"].encode(), b"0" * 64)
    else:
        lines.insert(2, b"garbage")
    seg.write_bytes(b"\n".join(lines))
    assert seg.read_bytes() != data
    with pytest.raises(AuditDamaged) as excinfo:
        open_log(tmp_path)
    release_leaked_lock(excinfo, tmp_path / "w0" / layout.LOCK_FILE)


def test_refused_open_releases_the_slot(tmp_path: Path, open_log, fill) -> None:
    log = open_log(tmp_path)
    fill(log, 5)
    log.close()
    seg = last_segment(tmp_path / "w0")
    lines = seg.read_bytes().split(b"\n")
    del lines[2]
    seg.write_bytes(b"\n".join(lines))
    lock = tmp_path / "w0" / layout.LOCK_FILE
    with pytest.raises(AuditDamaged) as first:
        open_log(tmp_path, log_id="w0")
    try:
        with pytest.raises(AuditDamaged) as second:  # the same answer, not "held"
            open_log(tmp_path, log_id="w0")
        release_leaked_lock(second, lock)
    finally:
        release_leaked_lock(first, lock)


@pytest.mark.parametrize("how", ["records-cut", "newline-cut"])
def test_reopen_refuses_a_log_shorter_than_its_checkpoint(
    tmp_path: Path, open_log, fill, verify, how: str
) -> None:
    log = open_log(tmp_path, **QUIET)
    fill(log, 10)
    log.close()  # checkpoint 10
    seg = last_segment(tmp_path / "w0")
    data = seg.read_bytes()
    if how == "records-cut":
        seg.write_bytes(b"".join(line + b"\n" for line in data.splitlines()[:7]))
        with pytest.raises(AuditDamaged) as excinfo:
            open_log(tmp_path, **QUIET)
        release_leaked_lock(excinfo, tmp_path / "w0" / layout.LOCK_FILE)
    else:
        # Record 9 is whole and a checkpoint covers it: quarantining it as a torn tail would
        # drop a record a signed head covers, so the writer refuses to start (a person looks).
        seg.write_bytes(data[:-1])
        with pytest.raises(AuditDamaged, match="covers 10 records, the log holds 9") as excinfo:
            open_log(tmp_path, **QUIET)
        release_leaked_lock(excinfo, tmp_path / "w0" / layout.LOCK_FILE)
        assert verify(tmp_path)["w0"].damages[0].kind == "torn_last_line"


# --------------------------------------------------------------------------- durability
def test_sync_returns_only_once_durable(tmp_path: Path, log_os, open_log, fill) -> None:
    log = open_log(tmp_path, **QUIET)
    for seq in fill(log, 5):  # fill syncs each record
        assert log.durable >= seq + 1

    entered, release = threading.Event(), threading.Event()

    def slow_fsync(fd: int) -> None:
        entered.set()
        release.wait(10)
        os.fsync(fd)

    log_os(fsync=slow_fsync)
    seq = log.append("start", {"request_id": "slow"})
    result: list[BaseException | None] = []
    waiter = threading.Thread(target=lambda: result.append(_catch(log.sync, seq)))
    waiter.start()
    assert entered.wait(5), "the commit thread never fsynced"
    time.sleep(0.2)
    assert waiter.is_alive() and log.durable == seq, "sync returned before the fsync did"
    with pytest.raises(AuditUnavailable, match="fsync took over"):
        log.sync(seq, timeout=0.1)
    release.set()
    waiter.join(5)
    assert result == [None] and log.durable >= seq + 1


def _catch(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as err:  # handed back to the test thread
        return err
    return None


def test_group_commit(tmp_path: Path, log_os, open_log, verify) -> None:
    """8 threads x 50 records, each synced: all durable, the log verifies, and fewer fsyncs
    than records. Counted: every os.fsync the writer module makes (commit thread, segment
    switches, checkpoint directories), an upper bound on the group commits. Each fsync takes
    1 ms here, as a disk's would (on tmpfs it costs nothing, and the count would measure
    thread scheduling rather than batching)."""
    log = open_log(tmp_path, checkpoint_records=50, segment_records=64)
    fsyncs = [0]
    count_lock = threading.Lock()

    def counting_fsync(fd: int) -> None:
        with count_lock:
            fsyncs[0] += 1
        time.sleep(0.001)
        os.fsync(fd)

    log_os(fsync=counting_fsync)
    errors: list[str] = []

    def worker(t: int) -> None:
        for i in range(50):
            seq = log.append("start", {"request_id": f"t{t}-{i}", "value": i / 7})
            log.sync(seq)
            if log.durable <= seq:
                errors.append(f"sync({seq}) returned with durable {log.durable}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads) and errors == []
    assert log.size == log.durable == 400
    committed = fsyncs[0]
    log.close()
    rep = verify(tmp_path)["w0"]
    assert rep.ok and rep.records == 400 and rep.unsigned_tail == 0, rep.damages
    assert len(rep.unfinished) == 400  # starts without completes: all there
    assert committed < 400, f"{committed} fsyncs for 400 records: no group commit"


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize("how", ["nothing-written", "half-written", "short-write"])
def test_failed_write_leaves_no_partial_line(tmp_path, log_os, open_log, fill, verify, how):
    log = open_log(tmp_path, **QUIET)
    fill(log, 3)
    seg = last_segment(log.dir)
    before = seg.read_bytes()
    armed = [True]

    def write(fd: int, data: bytes) -> int:
        if not armed[0]:
            return os.write(fd, data)
        armed[0] = False
        if how == "short-write":  # the kernel took part of it
            return os.write(fd, data[: len(data) // 2])
        if how == "half-written":  # part of it landed before the error
            os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log_os(write=write)
    with pytest.raises(AuditUnavailable, match="write failed"):
        log.append("start", {"request_id": "lost"})
    assert seg.read_bytes() == before
    seq = log.append("start", {"request_id": "kept"})
    log.sync(seq)
    assert seq == 3
    log.close()
    rep = verify(tmp_path)["w0"]
    assert rep.ok and rep.records == 4, rep.damages


def test_full_disk(tmp_path: Path, signer: Signer, fill, verify) -> None:
    """A real ENOSPC on a 64 KiB tmpfs: the append that does not fit fails whole, the log on
    disk stays valid, and once space is freed the log goes on."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    log = None
    try:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * 16384)
        log = AuditLog(mnt / "trail", signer, options=LogOptions(**QUIET))
        pad = "x" * 3000
        written = 0
        with pytest.raises(AuditUnavailable, match="write failed"):
            for i in range(100):  # 300 KB: cannot all fit
                log.sync(log.append("start", {"request_id": f"r{i}", "pad": pad}))
                written += 1
        assert written > 5
        assert last_segment(log.dir).read_bytes().endswith(b"\n")
        rep = verify(mnt / "trail")["w0"]
        assert rep.ok and rep.records == written, rep.damages

        filler.unlink()
        seq = log.append("complete", {"request_id": "after", "pad": pad})
        log.sync(seq)
        assert seq == written
        log.close()
        rep = verify(mnt / "trail")["w0"]
        assert rep.ok and rep.records == written + 1 and rep.unsigned_tail == 0, rep.damages
    finally:
        if log is not None:
            log.close()
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("where", ["trail", "log-dir"])
def test_unwritable_trail_raises_at_open(tmp_path: Path, signer: Signer, where: str) -> None:
    """The trail (or the log's directory) cannot be created. Root ignores permission bits, so
    as root a regular file stands where the directory must go; otherwise a read-only parent
    does it."""
    parent = tmp_path / "parent"
    parent.mkdir()
    trail = parent / "trail"
    if os.geteuid() == 0:
        blocked = trail if where == "trail" else trail / "w0"
        blocked.parent.mkdir(parents=True, exist_ok=True)
        blocked.write_text("a file where a directory must go")
    else:
        ro = parent if where == "trail" else trail
        ro.mkdir(exist_ok=True)
        ro.chmod(0o500)
    try:
        with pytest.raises(AuditUnavailable, match="cannot"):
            AuditLog(trail, signer)
    finally:
        for d in (parent, trail):
            if d.is_dir():
                d.chmod(0o700)


def test_failed_fsync_makes_the_log_unavailable(tmp_path: Path, log_os, open_log) -> None:
    log = open_log(tmp_path, **QUIET)
    failing = [True]

    def fsync(fd: int) -> None:
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)

    log_os(fsync=fsync)
    seq = log.append("start", {"request_id": "a"})
    try:
        with pytest.raises(AuditUnavailable, match="fsync failed"):
            log.sync(seq)
        with pytest.raises(AuditUnavailable, match="fsync failed"):
            log.append("start", {"request_id": "b"})
        assert log.state()["error"]
    finally:
        failing[0] = False  # let the commit thread catch up (see test_failed_fsync_does_not_spin)


def test_failed_fsync_does_not_spin(tmp_path: Path, log_os, open_log) -> None:
    log = open_log(tmp_path, **QUIET)
    failing, calls = [True], [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)

    log_os(fsync=fsync)
    with pytest.raises(AuditUnavailable):
        log.sync(log.append("start", {"request_id": "a"}))
    start = calls[0]
    time.sleep(0.3)
    spins = calls[0] - start
    failing[0] = False  # heal before asserting, so the thread parks and close() is quick
    assert spins <= 5, f"{spins} fsyncs in 0.3 s after the failure"


# --------------------------------------------------------------------------- checkpoints
def cp_sizes(log_dir: Path) -> list[int]:
    return [size for size, _ in layout.checkpoints(log_dir)]


def test_checkpoint_after_checkpoint_seconds(tmp_path: Path, open_log, fill, verify) -> None:
    """Few records, far below checkpoint_records: a checkpoint still follows within about a
    second of them (0.2 s configured; the margin absorbs a busy machine's fsyncs)."""
    log = open_log(tmp_path, checkpoint_records=1000, checkpoint_seconds=0.2)
    for total in (3, 5):
        fill(log, total - log.size, start=log.size)
        t0 = time.monotonic()
        while total not in cp_sizes(log.dir):
            assert time.monotonic() - t0 < 1.5, f"no checkpoint {total} within 1.5 s"
            time.sleep(0.02)
    assert cp_sizes(log.dir) == [3, 5]
    log.close()
    rep = verify(tmp_path)["w0"]
    assert rep.ok and rep.last_checkpoint == 5 and rep.unsigned_tail == 0


def test_close_writes_a_final_checkpoint(tmp_path: Path, open_log, fill, verify) -> None:
    log = open_log(tmp_path, **QUIET)
    fill(log, 5)
    assert layout.checkpoints(log.dir) == []
    assert verify(tmp_path)["w0"].unsigned_tail == 5
    log.close()
    log.close()  # twice is harmless
    with pytest.raises(AuditUnavailable, match="closed"):
        log.append("start", {})
    assert cp_sizes(tmp_path / "w0") == [5]
    rep = verify(tmp_path)["w0"]
    assert rep.ok and rep.last_checkpoint == 5 and rep.unsigned_tail == 0


def test_retention_deletes_old_segments(tmp_path: Path, open_log, fill, verify) -> None:
    opts = {"checkpoint_records": 4, "segment_records": 5, "retain_segments": 2}
    log = open_log(tmp_path, **opts)
    fill(log, 23)  # segments switch at 5, 10, 15, 20: 15 and 20 are kept
    log.close()
    log_dir = tmp_path / "w0"
    assert [first for first, _ in layout.segments(log_dir)] == [15, 20]
    statement = json.loads((log_dir / layout.RETENTION_FILE).read_bytes())
    assert statement["deleted_below"] == 15 and statement["segments_kept"] == 2
    rep = verify(tmp_path)["w0"]
    assert rep.ok and rep.first_seq == 15 and rep.records == 8, rep.damages

    again = open_log(tmp_path, **opts)
    assert again.size == 23
    assert fill(again, 10, start=23)[0] == 23  # switches at 25 and 30: 25 and 30 kept
    again.close()
    assert [first for first, _ in layout.segments(log_dir)] == [25, 30]
    rep = verify(tmp_path)["w0"]
    assert rep.ok and rep.first_seq == 25 and rep.records == 8 and rep.unsigned_tail == 0
