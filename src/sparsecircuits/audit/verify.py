"""``audit verify``: check a trail, name the first bad record of each log and the damage.

Per log, in order: the retention statement (signed; it explains records deleted on purpose),
every checkpoint's signature, then the records one by one: canonical bytes, signature by a
trusted key, the log's id, the sequence number and the hash chain. Each checkpoint's tree head
is recomputed from the records it covers, and consecutive checkpoints are checked consistent
with RFC 9162 consistency proofs (what an auditor who kept only the older head would check).
Checkpoints beyond the last record mean the log was cut short. A trusted checkpoint (one kept
out of band) catches what the log alone cannot: a tail removed together with its checkpoints.

Damage kinds: ``edited``, ``deleted``, ``inserted``, ``reordered``, ``truncated``,
``forged_checkpoint``, ``forged_retention``, ``torn_last_line``. The walk of a log stops at its
first damage: after it, the chain no longer says what the records should be.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsecircuits.audit import layout
from sparsecircuits.audit.merkle import (
    Frontier,
    consistency_proof,
    verify_consistency,
)
from sparsecircuits.audit.records import (
    CHECKPOINT_SCHEMA,
    GENESIS,
    RETENTION_SCHEMA,
    canonical,
    has_record_fields,
    parse_line,
    record_hash,
    signature_ok,
)
from sparsecircuits.audit.signing import Keyring


@dataclass(frozen=True)
class Damage:
    """What is wrong, where: ``seq`` is the record's expected index (None for a file)."""

    kind: str
    log: str
    where: str  # file and line, e.g. "w0/seg-000000000000.jsonl:17"
    seq: int | None
    message: str

    def __str__(self) -> str:
        at = f"record {self.seq} " if self.seq is not None else ""
        return f"{self.kind}: log {self.log} {at}({self.where}): {self.message}"


@dataclass
class LogReport:
    """One log's verdict and what it holds."""

    log: str
    records: int = 0  # records verified (the chain walk stops at the first damage)
    first_seq: int = 0  # above 0 when retention deleted the older records
    checkpoints: int = 0
    last_checkpoint: int = 0
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # started, never completed
    request_ids: set[str] = field(default_factory=set)
    damages: list[Damage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list, repr=False)  # from first_seq on
    start_frontier: Frontier = field(default_factory=Frontier, repr=False)  # at first_seq

    def root_at(self, size: int) -> bytes:
        """The tree head over the first ``size`` records (first_seq <= size <= the end)."""
        f = self.start_frontier.copy()
        for h in self.leaves[: size - self.first_seq]:
            f.append(h)
        return f.root()

    @property
    def ok(self) -> bool:
        return not self.damages

    @property
    def unsigned_tail(self) -> int:
        """Records after the last checkpoint: protected by their own signatures and the
        chain, not yet by a tree head."""
        return self.first_seq + self.records - self.last_checkpoint


@dataclass
class _Line:
    path: Path
    first: int  # the first seq the segment's file name gives
    number: int  # 1-based
    data: bytes
    torn: bool  # the file's last bytes, with no newline after them

    def where(self, log_dir: Path) -> str:
        return f"{log_dir.name}/{self.path.name}:{self.number}"


def verify_log(
    log_dir: Path, keyring: Keyring, *, trusted: list[dict[str, Any]] | None = None
) -> LogReport:
    """Verify one log directory (``trusted``: checkpoints from elsewhere, any log's; the
    ones naming this log are used)."""
    rep = LogReport(log=log_dir.name)

    def damage(kind: str, where: str, seq: int | None, message: str) -> LogReport:
        rep.damages.append(Damage(kind, rep.log, where, seq, message))
        return rep

    cps = _checkpoints(log_dir, rep, keyring, damage)
    start = _retention(log_dir, rep, keyring, cps, damage)
    if start is None:
        return rep
    frontier, prev = start
    rep.first_seq = frontier.size
    lines = _lines(log_dir, rep.first_seq, rep)
    copies = Counter(ln.data for ln in lines)
    expected, leaves = frontier.size, rep.leaves
    rep.start_frontier = frontier.copy()
    started: dict[str, int] = {}
    last_cp = None
    for i, ln in enumerate(lines):
        where = ln.where(log_dir)
        doc = parse_line(ln.data)
        if ln.torn:  # the writer ends every record with a newline
            if i == len(lines) - 1:
                return damage("torn_last_line", where, expected,
                              f"{len(ln.data)} bytes after the last complete record")  # fmt: skip
            return damage("edited", where, expected, "a segment ends without a newline")
        valid = (
            doc is not None
            and has_record_fields(doc)
            and canonical(doc) == ln.data
            and signature_ok(doc, keyring)
        )
        if not valid:
            nxt = parse_line(lines[i + 1].data) if i + 1 < len(lines) else None
            if nxt is not None and nxt.get("seq") == expected and nxt.get("prev") == prev:
                return damage("inserted", where, expected, "a line the chain skips")
            if doc is None:
                return damage("edited", where, expected, "not a record (unparseable)")
            return damage("edited", where, expected, _why_invalid(doc, ln.data, keyring))
        seq = doc["seq"]
        if doc["log"] != rep.log:
            return damage("inserted", where, expected, f"a record of log {doc['log']!r}")
        if seq != expected or doc["prev"] != prev:
            if copies[ln.data] > 1:
                return damage("inserted", where, expected, f"a second copy of record {seq}")
            if seq < expected or any(
                (parse_line(x.data) or {}).get("seq") == expected for x in lines[i + 1 :]
            ):
                return damage("reordered", where, expected, f"record {seq} is out of place")
            if seq > expected:
                return damage("deleted", where, expected,
                              f"records {expected}..{seq - 1} are missing")  # fmt: skip
            return damage("edited", where, expected, "its chain hash does not match")
        if ln.number == 1 and ln.first != seq:
            why = f"its segment's file name says it starts at record {ln.first}"
            return damage("edited", where, expected, why)
        h = record_hash(ln.data)
        leaves.append(h)
        frontier.append(h)
        prev, expected = h.hex(), expected + 1
        _track(doc, started, rep)
        cp = cps.get(expected)
        if cp is not None:
            if cp["root"] != frontier.root().hex() or cp["last_record"] != prev:
                return damage("forged_checkpoint", _cp_where(log_dir, expected), expected,
                              "its tree head does not match the records it covers")  # fmt: skip
            if last_cp is not None and not _consistent(rep, last_cp, cp):
                return damage("forged_checkpoint", _cp_where(log_dir, expected), expected,
                              f"not consistent with checkpoint {last_cp['size']}")  # fmt: skip
            last_cp = cp
    rep.records = expected - rep.first_seq
    rep.unfinished = sorted(started)
    beyond = [s for s in cps if s > expected]
    if beyond:
        return damage("truncated", f"{log_dir.name}/{layout.CHECKPOINT_DIR}", expected,
                      f"checkpoint {beyond[-1]} covers {beyond[-1] - expected} records "
                      f"that are not in the log")  # fmt: skip
    rep.checkpoints = len(cps)
    rep.last_checkpoint = max(cps, default=rep.first_seq)
    for t in trusted or []:
        if t.get("log") == rep.log:
            _check_trusted(rep, t, expected, keyring, cps, damage)
    return rep


def _why_invalid(doc: dict[str, Any], data: bytes, keyring: Keyring) -> str:
    if not has_record_fields(doc):
        return "fields are missing"
    if canonical(doc) != data:
        return "its bytes are not the canonical form of its fields"
    if doc.get("key_id") not in keyring.keys:
        return f"signed by key {doc.get('key_id')!r}, which is not trusted"
    return "its signature does not match its contents"


def _track(doc: dict[str, Any], started: dict[str, int], rep: LogReport) -> None:
    rid = doc.get("request_id")
    if doc["kind"] == "start" and isinstance(rid, str):
        started[rid] = doc["seq"]
    elif doc["kind"] == "complete" and isinstance(rid, str):
        started.pop(rid, None)
        rep.request_ids.add(rid)
    elif doc["kind"] == "recovery":
        rep.recoveries.append({k: doc.get(k) for k in ("seq", "file", "offset", "bytes")})


def _consistent(rep: LogReport, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """An RFC 9162 consistency proof from ``old`` to ``new``, built from the records and
    checked against the two signed heads (only retained records can build one)."""
    m, n, base = old["size"], new["size"], rep.first_seq
    if base:
        return True  # the records before ``base`` are gone: the heads were compared above
    proof = consistency_proof(rep.leaves, m, size=n)
    return verify_consistency(
        old_size=m, new_size=n, proof=proof,
        old_root=bytes.fromhex(old["root"]), new_root=bytes.fromhex(new["root"]),
    )  # fmt: skip


def _cp_where(log_dir: Path, size: int) -> str:
    return f"{log_dir.name}/{layout.CHECKPOINT_DIR}/{layout.checkpoint_name(size)}"


def _checkpoints(log_dir: Path, rep: LogReport, keyring: Keyring, damage) -> dict[int, dict]:
    """The log's checkpoints by size; a forged one is reported (and not used)."""
    found: dict[int, dict] = {}
    for size, path in layout.checkpoints(log_dir):
        doc = _read_signed(path)
        where = _cp_where(log_dir, size)
        if doc is None or doc.get("schema") != CHECKPOINT_SCHEMA:
            damage("forged_checkpoint", where, None, "not a checkpoint")
        elif not signature_ok(doc, keyring):
            damage("forged_checkpoint", where, None,
                   f"bad signature (key {doc.get('key_id')!r})")  # fmt: skip
        elif doc.get("size") != size or doc.get("log") != rep.log:
            damage("forged_checkpoint", where, None, "its size or log does not match its name")
        else:
            found[size] = doc
    return found


def _retention(log_dir: Path, rep: LogReport, keyring: Keyring, cps: dict[int, dict], damage):
    """Where the records start: (frontier, chain head) there, or None after a damage."""
    path = log_dir / layout.RETENTION_FILE
    if not path.exists():
        return Frontier(), GENESIS
    where = f"{log_dir.name}/{layout.RETENTION_FILE}"
    doc = _read_signed(path)
    if doc is None or doc.get("schema") != RETENTION_SCHEMA or not signature_ok(doc, keyring):
        damage("forged_retention", where, None, "not a retention statement signed by a trusted key")
        return None
    below = doc.get("deleted_below")
    cp = cps.get(below)
    if doc.get("log") != rep.log:
        damage("forged_retention", where, None, f"a statement of log {doc.get('log')!r}")
        return None
    if cp is None:
        damage("forged_retention", where, None, f"no valid checkpoint at record {below}")
        return None
    if (doc.get("root"), doc.get("last_record")) != (cp["root"], cp["last_record"]):
        # bound to the tree head where the kept records start: a statement from another
        # log (or another machine's log of the same name) names another head
        damage("forged_retention", where, None, f"it names another tree head at record {below}")
        return None
    frontier = Frontier.from_json(cp["frontier"])
    if frontier.root().hex() != cp["root"]:
        damage("forged_checkpoint", _cp_where(log_dir, below), None, "its frontier is not its root")
        return None
    rep.notes.append(f"records 0..{below - 1} deleted by retention (signed statement)")
    return frontier, cp["last_record"]


def _lines(log_dir: Path, start: int, rep: LogReport) -> list[_Line]:
    out: list[_Line] = []
    for first, path in layout.segments(log_dir):
        if first < start:
            rep.notes.append(f"{path.name}: left over below the retention point; not read")
            continue
        data = path.read_bytes()
        parts = data.split(b"\n")
        tail = parts.pop()
        out.extend(_Line(path, first, n + 1, p, False) for n, p in enumerate(parts))
        if tail:
            out.append(_Line(path, first, len(parts) + 1, tail, True))
    return out


def _read_signed(path: Path) -> dict[str, Any] | None:
    """A checkpoint or retention file's fields, or None unless it is one canonical line."""
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or raw != canonical(doc) + b"\n":  # one spelling only
        return None
    return doc


def _check_trusted(
    rep: LogReport, t: dict[str, Any], n: int, keyring: Keyring, cps: dict[int, dict], damage
) -> None:
    """Compare the log with a tree head kept elsewhere (signature checked first)."""
    size, where = t.get("size"), "--trusted-checkpoint"
    if t.get("schema") != CHECKPOINT_SCHEMA or not signature_ok(t, keyring):
        damage("forged_checkpoint", where, None, "the trusted checkpoint's signature is bad")
    elif not isinstance(size, int) or size > n:
        damage("truncated", where, n,
               f"the trusted checkpoint covers {size} records; the log has {n}")  # fmt: skip
    elif size < rep.first_seq:  # its records are gone: the log's own signed head must match
        own = cps.get(size)
        if own is None:
            why = f"the log no longer holds its checkpoint at {size} (below retention)"
            damage("deleted", where, None, why)
        elif own["root"] != t.get("root"):
            why = f"the log's checkpoint at {size} does not match the trusted tree head"
            damage("edited", where, None, why)
    elif rep.root_at(size).hex() != t.get("root"):
        damage("edited", where, None,
               f"the log's first {size} records do not match the trusted tree head")  # fmt: skip


def verify_trail(
    trail: Path, keyring: Keyring, *, trusted: list[dict[str, Any]] | None = None
) -> list[LogReport]:
    """Every log of ``trail`` (one log directory, or a directory of them) as one trail."""
    dirs = layout.logs(trail)
    reports = [verify_log(d, keyring, trusted=trusted) for d in dirs]
    names = {r.log for r in reports}
    for t in trusted or []:
        if t.get("log") not in names:
            gone = LogReport(log=str(t.get("log")))
            why = "a trusted checkpoint names a log that is gone"
            gone.damages.append(Damage("deleted", gone.log, str(trail), None, why))
            reports.append(gone)
    return reports
