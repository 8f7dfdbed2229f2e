"""The writer of one audit log: signed, hash-chained records, group-committed, checkpointed.

One process writes one log (``flock`` on its ``LOCK``); several server processes share a trail
directory, each taking the first free slot ``w0``, ``w1``, ... (or a name it is given).

Durability: :meth:`AuditLog.append` writes the record to the file (the OS has it; a killed
process loses nothing) and returns its seq; :meth:`AuditLog.sync` returns once that record is
on disk. The first caller of ``sync`` fsyncs for everyone waiting, so requests finishing
together share one fsync (group commit) and each still waits for its own record. Records
nobody waits for (a request's start record) are fsynced by a commit thread within
``BACKGROUND_SYNC_S``, or by the next ``sync``, whichever comes first. The server sends a
response only after ``sync`` of its completion record returns.

Failure: a write that fails (disk full, I/O error) is cut back off the file, so no torn line
stays behind, and raises :class:`AuditUnavailable`; the next append tries again. A failed
fsync or checkpoint makes every append fail until it succeeds again: the server answers 503
rather than serve without a durable record.

Start: a torn tail (bytes after the last newline, or a last line that is not a record) is moved
to ``quarantine/`` and a ``recovery`` record saying so is appended, so nothing is silently
dropped or accepted. Any other inconsistency (a broken chain, a gap) refuses to start: that is
for ``audit verify`` and a person.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsecircuits.audit import layout
from sparsecircuits.audit.errors import AuditDamaged, AuditUnavailable
from sparsecircuits.audit.merkle import Frontier
from sparsecircuits.audit.records import (
    CHECKPOINT_SCHEMA,
    GENESIS,
    RECORD_VERSION,
    RETENTION_SCHEMA,
    now_iso,
    record_hash,
    seal,
)
from sparsecircuits.audit.recovery import Recovering
from sparsecircuits.audit.signing import Signer
from sparsecircuits.errors import InputError
from sparsecircuits.fileio import atomic_write_bytes, fsync_dir, read_json_object

log = logging.getLogger("sparsecircuits.audit")
BACKGROUND_SYNC_S = 0.2  # the longest a record nobody waits for stays un-fsynced
__all__ = ["AuditDamaged", "AuditLog", "AuditUnavailable", "LogOptions"]


@dataclass(frozen=True)
class LogOptions:
    """How often to checkpoint and rotate, and what to keep.

    ``checkpoint_records`` / ``checkpoint_seconds``: a signed tree head after this many new
    records, or this long after the last one when records came since. ``segment_records``:
    records per segment file. ``retain_segments``: keep this many segments and delete older
    ones (their checkpoints and a signed retention statement stay); None keeps everything.
    """

    checkpoint_records: int = 1000
    checkpoint_seconds: float = 5.0
    segment_records: int = 100_000
    retain_segments: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_records < 1 or self.checkpoint_seconds <= 0:
            raise InputError("audit: checkpoint every >= 1 records and > 0 seconds")
        if self.segment_records < 1:
            raise InputError("audit: a segment holds >= 1 records")
        if self.retain_segments is not None and self.retain_segments < 1:
            raise InputError("audit: --audit-retain-segments must be >= 1")


class AuditLog(Recovering):
    """The log ``trail/log_id`` (``log_id`` None: the first free ``w0``, ``w1``, ...)."""

    def __init__(
        self,
        trail: Path,
        signer: Signer,
        *,
        log_id: str | None = None,
        options: LogOptions | None = None,
    ) -> None:
        self.signer, self.options = signer, options or LogOptions()
        self.trail = Path(trail)
        self._lock_fd, self.dir = self._claim(log_id)
        self.log_id = self.dir.name
        self._mu = threading.Condition()  # guards the chain state and the counters below
        self._io = threading.Lock()  # an fsync and a segment switch never overlap
        self.size, self.prev, self.frontier = 0, GENESIS, Frontier()
        self._seg_first, self._fd, self._gen = 0, -1, 0  # _gen: bumped at each segment switch
        self.recoveries: list[dict[str, Any]] = []  # quarantined tails no record names yet
        try:
            self._recover()
        except BaseException as exc:  # release the slot whatever went wrong
            if self._fd >= 0:
                os.close(self._fd)
            os.close(self._lock_fd)
            if isinstance(exc, OSError):  # an unreadable or unwritable log directory
                why = f"{self.dir}: cannot open the log ({exc.strerror})"
                raise AuditUnavailable(why) from None
            raise
        self.durable = self.size  # everything on disk at start is durable (fsynced below)
        self._cp_size, self._cp_time = self._last_checkpoint_size(), time.monotonic()
        self._failed: str | None = None  # fsync failure: permanent until restart
        self._cp_error: str | None = None  # checkpoint failure: until a retry succeeds
        self._closed = False
        self._leading = False  # a sync() caller is fsyncing for everyone waiting
        self._synced = time.monotonic()  # when the last fsync ended
        self._thread = threading.Thread(target=self._commit_loop, name="audit-commit", daemon=True)
        self._thread.start()
        try:
            for rec in self.recoveries:  # said in the log before anything else is written
                self.sync(self.append("recovery", rec))
        except BaseException:  # the slot, the thread and the files are given back
            self.close(checkpoint=False)
            raise

    @property
    def recovered(self) -> dict[str, Any] | None:
        """The last torn tail this open quarantined or announced (None: none)."""
        return self.recoveries[-1] if self.recoveries else None

    # ------------------------------------------------------------------ opening
    def _claim(self, log_id: str | None) -> tuple[int, Path]:
        try:
            self.trail.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AuditUnavailable(f"{self.trail}: cannot create ({err.strerror})") from None
        names = [log_id] if log_id is not None else [f"w{i}" for i in range(256)]
        for name in names:
            if not layout.LOG_ID_RE.match(name):
                raise InputError(f"audit log id {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
            d = self.trail / name
            try:
                if not d.is_dir():
                    d.mkdir()
                    fsync_dir(self.trail)
                fd = os.open(d / layout.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise AuditUnavailable(f"{d}: cannot open the log ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd, d
        raise AuditUnavailable(f"{self.trail}: every log slot is held by another process")

    def _open_segment(self, first: int) -> None:
        path = self.dir / layout.segment_name(first)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.fsync(fd)
        fsync_dir(self.dir)  # the new file's name is durable too
        self._fd, self._seg_first = fd, first

    def _last_checkpoint_size(self) -> int:
        cps = layout.checkpoints(self.dir)
        return cps[-1][0] if cps else 0

    # ------------------------------------------------------------------ writing
    def append(self, kind: str, fields: dict[str, Any]) -> int:
        """Write one record; returns its seq (pass it to :meth:`sync`). Raises
        :class:`AuditUnavailable` when it cannot be written."""
        with self._mu:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            if self._failed or self._cp_error:
                raise AuditUnavailable(f"audit log {self.log_id}: {self._failed or self._cp_error}")
            if self.size - self._seg_first >= self.options.segment_records:
                self._rotate()
            body = {**fields, "v": RECORD_VERSION, "log": self.log_id, "seq": self.size,
                    "prev": self.prev, "time": now_iso(), "kind": kind}  # fmt: skip
            line = seal(body, self.signer)
            self._write(line + b"\n")
            h = record_hash(line)
            self.frontier.append(h)
            self.prev, self.size = h.hex(), self.size + 1
            return self.size - 1

    def _write(self, data: bytes) -> None:
        offset = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as err:
            try:  # leave no torn line: the next record must start on a fresh line
                os.ftruncate(self._fd, offset)
            except OSError:
                self._failed = f"cannot cut a failed write back ({err.strerror})"
            why = f"audit log {self.log_id}: write failed ({err.strerror})"
            raise AuditUnavailable(why) from None

    def sync(self, seq: int, *, timeout: float = 30.0) -> None:
        """Return once record ``seq`` is on disk; :class:`AuditUnavailable` if it cannot be.

        The first waiter fsyncs itself (the leader of this group commit): a lone request
        does not wait for the commit thread to wake up; others wait for the leader's fsync,
        which covers every record written before it started."""
        deadline = time.monotonic() + timeout
        with self._mu:
            while self.durable <= seq:
                if self._failed:
                    raise AuditUnavailable(f"audit log {self.log_id}: {self._failed}")
                if not self._leading:
                    self._leading = True
                    target, gen = self.size, self._gen
                    self._mu.release()  # held once (the with): _fsync takes it itself
                    try:
                        self._fsync(gen, target)
                    finally:
                        self._mu.acquire()
                        self._leading = False
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AuditUnavailable(f"audit log {self.log_id}: fsync took over {timeout} s")
                self._mu.wait(left)

    def _commit_loop(self) -> None:
        while True:
            with self._mu:
                while not self._closed and (
                    self._failed or not (self._sync_due() or self._cp_due())
                ):  # after a failed fsync nothing more is synced: wait for close
                    self._mu.wait(min(self._cp_wait(), BACKGROUND_SYNC_S))
                if self._closed and (self._failed or self.durable == self.size):
                    return
                target, gen = self.size, self._gen
                snapshot = (self.frontier.copy(), self.prev)
            self._fsync(gen, target)
            with self._mu:
                if self._cp_error and self._cp_size >= target:
                    self._cp_error = None  # a head over these records exists after all
                due = self._cp_due() and self._cp_size < target <= self.durable
            if due:
                self._checkpoint(target, *snapshot)

    def _fsync(self, gen: int, target: int) -> None:
        """fsync the segment that held records up to ``target``; a segment switched since
        was fsynced by the switch."""
        error = None
        with self._io:
            if gen == self._gen:
                try:
                    os.fsync(self._fd)
                except OSError as err:
                    error = f"fsync failed ({err.strerror}); restart the server"
        with self._mu:  # never taken while holding _io: append holds _mu and then takes _io
            self._synced = time.monotonic()
            if error:
                self._failed = error
            else:
                self.durable = max(self.durable, target)
            self._mu.notify_all()

    def _sync_due(self) -> bool:
        """Records nobody waits for have waited long enough (a request's start record): an
        fsync each would double the fsyncs per request for no one's benefit."""
        return self.durable < self.size and time.monotonic() - self._synced >= BACKGROUND_SYNC_S

    def _cp_due(self) -> bool:
        since = time.monotonic() - self._cp_time
        if self._cp_error:
            return since >= 1.0  # retry once a second, not in a spin
        new = self.size - self._cp_size
        return new >= self.options.checkpoint_records or (
            new > 0 and since >= self.options.checkpoint_seconds
        )

    def _cp_wait(self) -> float:
        if self._cp_error:
            return 1.0
        return max(0.05, self.options.checkpoint_seconds - (time.monotonic() - self._cp_time))

    def _checkpoint(self, size: int, frontier: Frontier, last: str) -> None:
        """Sign and write the tree head over the first ``size`` records (all durable)."""
        body = {
            "schema": CHECKPOINT_SCHEMA,
            "log": self.log_id,
            "size": size,
            "root": frontier.root().hex(),
            "last_record": last,
            "frontier": frontier.to_json(),
            "time": now_iso(),
        }
        path = self.dir / layout.CHECKPOINT_DIR / layout.checkpoint_name(size)
        try:
            atomic_write_bytes(path, seal(body, self.signer) + b"\n")
            fsync_dir(path.parent)
            fsync_dir(self.dir)  # checkpoints/ itself, the first time
        except OSError as err:
            with self._mu:
                self._cp_error = f"cannot write a checkpoint ({err.strerror})"
                self._cp_time = time.monotonic()
            log.error("audit %s: checkpoint at %d failed: %s", self.log_id, size, err.strerror)
            return
        with self._mu:  # re-entrant: _rotate calls this holding _mu
            self._cp_size = max(self._cp_size, size)
            self._cp_time, self._cp_error = time.monotonic(), None

    def _rotate(self) -> None:
        """Checkpoint at the end of the full segment and open the next (caller holds _mu)."""
        try:
            with self._io:
                os.fsync(self._fd)
        except OSError as err:
            self._failed = f"fsync failed ({err.strerror}); restart the server"
            raise AuditUnavailable(f"audit log {self.log_id}: {self._failed}") from None
        self.durable = max(self.durable, self.size)
        if self._cp_size < self.size:  # the commit thread may have written this head already
            self._checkpoint(self.size, self.frontier.copy(), self.prev)
        if self._cp_error:  # the segment stays open and grows; the next append retries
            raise AuditUnavailable(f"audit log {self.log_id}: {self._cp_error}")
        try:
            with self._io:
                old = self._fd
                self._open_segment(self.size)
                self._gen += 1
                os.close(old)
        except OSError as err:
            raise AuditUnavailable(
                f"audit log {self.log_id}: cannot open a new segment ({err.strerror})"
            ) from None
        if self.options.retain_segments is not None:
            self._retain(self.options.retain_segments)

    def _retain(self, keep: int) -> None:
        """Delete all but the newest ``keep`` segments, after a signed statement bound to the
        checkpoint where the kept records start (best effort: a failure deletes nothing, or
        leaves extra files, and is logged)."""
        segs = layout.segments(self.dir)
        if len(segs) <= keep:
            return
        below = segs[-keep][0]  # the first seq kept: a segment start, so a checkpoint exists
        try:
            cp = read_json_object(self.dir / layout.CHECKPOINT_DIR / layout.checkpoint_name(below))
            body = {"schema": RETENTION_SCHEMA, "log": self.log_id, "deleted_below": below,
                    "root": cp["root"], "last_record": cp["last_record"],
                    "segments_kept": keep, "time": now_iso()}  # fmt: skip
            # The signed statement first, on disk: a crash before the deletions leaves extra
            # files, never deletions that nothing explains.
            atomic_write_bytes(self.dir / layout.RETENTION_FILE, seal(body, self.signer) + b"\n")
            fsync_dir(self.dir)
            for first, path in segs[:-keep]:
                path.unlink()
                log.info("audit %s: retention deleted %s (from record %d)", self.log_id, path,
                         first)  # fmt: skip
            fsync_dir(self.dir)
        except (OSError, ValueError, KeyError) as err:
            log.error("audit %s: retention did not run: %s", self.log_id, err)

    def checkpoint_now(self) -> None:
        """Write a checkpoint over every durable record now (tests, shutdown)."""
        with self._mu:
            target = self.size
        if target:
            self.sync(target - 1)
        with self._mu:
            if self._cp_size >= target:
                return
            snapshot = (self.frontier.copy(), self.prev)
        self._checkpoint(target, *snapshot)

    def close(self, *, checkpoint: bool = True) -> None:
        """Flush, checkpoint what is new, stop the commit thread, release the slot."""
        with self._mu:
            if self._closed:
                return
        try:
            if checkpoint and not self._failed:
                self.checkpoint_now()
        except AuditUnavailable as err:
            log.error("audit %s: closing without a final checkpoint: %s", self.log_id, err)
        with self._mu:
            self._closed = True
            self._mu.notify_all()
        self._thread.join(timeout=5)
        with self._io:
            os.close(self._fd)
        os.close(self._lock_fd)

    def state(self) -> dict[str, Any]:
        """For /healthz."""
        with self._mu:
            error = self._failed or self._cp_error
            return {"log": self.log_id, "records": self.size, "durable": self.durable,
                    "checkpointed": self._cp_size, "error": error}  # fmt: skip
