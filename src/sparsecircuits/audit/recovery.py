"""Opening a log again: rebuild its chain state from disk, quarantine a torn tail, announce
quarantined tails no record names yet (the writer's half that runs once, at start)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from sparsecircuits.audit import layout
from sparsecircuits.audit.errors import AuditDamaged
from sparsecircuits.audit.merkle import Frontier
from sparsecircuits.audit.records import parse_line, record_hash, signature_ok
from sparsecircuits.audit.signing import Keyring, Signer
from sparsecircuits.fileio import atomic_write_bytes, fsync_dir, read_json_object

log = logging.getLogger("sparsecircuits.audit")


class Recovering:
    """Mixed into :class:`~sparsecircuits.audit.log.AuditLog`: its start-up half."""

    dir: Path
    log_id: str
    size: int
    prev: str
    frontier: Frontier
    recoveries: list[dict[str, Any]]
    signer: Signer
    _seg_first: int

    def _open_segment(self, first: int) -> None: ...  # the writer's

    def _last_checkpoint_size(self) -> int: ...  # the writer's

    def _recover(self) -> None:
        """Rebuild the chain state from disk; quarantine a torn tail."""
        start = self._retention_start()
        segs = [(first, p) for first, p in layout.segments(self.dir) if first >= start]
        expected = self.size
        torn: tuple[Path, int, bytes] | None = None
        named: set[str] = set()  # quarantine files that recovery records already name
        # Records after the last checkpoint become the chain head the server signs on top
        # of: checked against its own key (records of an earlier key pass: it is not held).
        signed_upto = self._last_checkpoint_size()
        own = Keyring([self.signer.private.public_key()])
        for i, (first, path) in enumerate(segs):
            if first != expected:
                raise AuditDamaged(
                    f"{path}: starts at record {first}, expected {expected}; run "
                    "`sparsecircuits audit verify` and move the log aside to start a new one"
                )
            data = path.read_bytes()
            lines = data.split(b"\n")
            tail = lines.pop()  # after the last newline: b"" unless torn
            last_seg = i == len(segs) - 1
            if last_seg and lines and parse_line(lines[-1]) is None:
                tail = lines.pop() + b"\n" + tail  # a last line that is not a record
            if tail and not last_seg:
                raise AuditDamaged(f"{path}: ends mid-record but is not the last segment")
            for n, line in enumerate(lines):
                doc = parse_line(line)
                if doc is None or doc.get("seq") != expected or doc.get("prev") != self.prev:
                    raise AuditDamaged(
                        f"{path}: line {n + 1} does not continue the chain at record "
                        f"{expected}; run `sparsecircuits audit verify`"
                    )
                theirs = doc.get("key_id") != self.signer.key_id  # a rotated-out key: verify's
                if expected >= signed_upto and not theirs and not signature_ok(doc, own):
                    raise AuditDamaged(
                        f"{path}: line {n + 1} (record {expected}) is not signed by this "
                        "server's key; run `sparsecircuits audit verify`"
                    )
                if doc.get("kind") == "recovery":
                    named.add(str(doc.get("quarantined_as")))
                h = record_hash(line)
                self.frontier.append(h)
                self.prev, expected = h.hex(), expected + 1
            self.size = expected
            self._seg_first = first
            if tail:
                torn = (path, len(data) - len(tail), tail)
        if self._last_checkpoint_size() > self.size:  # records a signed head covers are gone
            raise AuditDamaged(
                f"{self.dir}: a checkpoint covers {self._last_checkpoint_size()} records, the "
                f"log holds {self.size}; run `sparsecircuits audit verify`"
            )
        self._unannounced(named, start)
        if torn is not None:
            self._quarantine(torn[0], good=torn[1], torn=torn[2])
        if not segs:
            self._seg_first = self.size
        self._open_segment(self._seg_first)

    def _retention_start(self) -> int:
        """The first retained seq (0 without retention), with the frontier and chain head
        there taken from the checkpoint the retention statement names."""
        path = self.dir / layout.RETENTION_FILE
        if not path.exists():
            return 0
        ret = read_json_object(path)
        below = int(ret["deleted_below"])
        cp = read_json_object(self.dir / layout.CHECKPOINT_DIR / layout.checkpoint_name(below))
        self.frontier = Frontier.from_json(cp["frontier"])
        self.size, self.prev = below, cp["last_record"]
        return below

    def _quarantine(self, path: Path, *, good: int, torn: bytes) -> None:
        qpath = self.dir / layout.QUARANTINE_DIR / f"{path.name}.{good}.torn"
        atomic_write_bytes(qpath, torn)  # moved aside before the segment is cut
        fsync_dir(qpath.parent)
        fsync_dir(self.dir)
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
        self.recoveries.append(_recovery(qpath, torn))
        log.warning("audit %s: torn tail of %d bytes quarantined", self.log_id, len(torn))

    def _unannounced(self, named: set[str], start: int) -> None:
        """Quarantined tails no record names (the process stopped between moving one aside
        and recording it): announced now."""
        qdir = self.dir / layout.QUARANTINE_DIR
        for qpath in sorted(qdir.glob("*.torn")) if qdir.is_dir() else []:
            m = layout.SEGMENT_RE.match(qpath.name.split(".jsonl.")[0] + ".jsonl")
            below = m is not None and int(m.group(1)) < start  # its records left by retention
            if f"{layout.QUARANTINE_DIR}/{qpath.name}" not in named and not below:
                self.recoveries.append(_recovery(qpath, qpath.read_bytes()))


def _recovery(qpath: Path, torn: bytes) -> dict[str, Any]:
    """A recovery record's fields for the quarantined file ``qpath``
    (``SEGMENT.OFFSET.torn``)."""

    file, _, rest = qpath.name.partition(".jsonl.")
    return {
        "file": f"{file}.jsonl",
        "offset": int(rest.split(".")[0]) if rest.split(".")[0].isdigit() else None,
        "bytes": len(torn),
        "sha256": hashlib.sha256(torn).hexdigest(),
        "quarantined_as": f"{layout.QUARANTINE_DIR}/{qpath.name}",
    }
