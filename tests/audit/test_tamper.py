"""Tamper detection, fuzzed: every change an attacker without the private key can make to an
audit log's files is reported, at the first record it touches, under the right name.

One pristine log (60 request records over three segments, checkpoints every 7 records) is built
per module; each example copies it, applies one mutation chosen by hypothesis, and runs
``verify_trail``. "The first bad record" (``Damage.seq``) is the index, in the pristine log, of
the first record whose line or position differs from the pristine stream as the verifier reads
it. Two consequences are spelled out where they matter: a verbatim copy of record p inserted
just before record p leaves position p intact (the copy is byte-identical), so the first bad
position is p + 1; and a moved record is bad at the earlier of its old and new positions.

What the log alone cannot show (a tail cut together with every checkpoint over it, a rollback
to an earlier copy, a log deleted whole) is asserted to verify clean, to document the limit,
and to be caught once a checkpoint kept elsewhere is passed as ``trusted``.

The tests at the end of the file pin bugs found (and fixed) while writing it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sparsecircuits.audit import layout
from sparsecircuits.audit.log import AuditLog, LogOptions
from sparsecircuits.audit.records import canonical, parse_line, record_hash, seal
from sparsecircuits.audit.signing import Signer
from sparsecircuits.audit.verify import Damage

N = 60  # records in the pristine log
EARLY = 30  # records when the first writer closed (the rollback copy is taken then)
OPTIONS = {"checkpoint_records": 7, "segment_records": 25}
FUZZ = settings(max_examples=40, deadline=None)


def one_line(lo: int, hi: int) -> st.SearchStrategy[bytes]:
    """Bytes of length lo..hi with no newline (one line's worth)."""
    return st.binary(min_size=lo, max_size=hi).filter(lambda b: b"\n" not in b)


B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# --------------------------------------------------------------------------- the files
class Stream:
    """A log's record lines across its segment files, edited as one list (lines without
    their newline; ``sizes``: how many of them each segment file holds)."""

    def __init__(self, log_dir: Path) -> None:
        self.paths = [p for _, p in layout.segments(log_dir)]
        self.sizes: list[int] = []
        self.lines: list[bytes] = []
        for p in self.paths:
            data = p.read_bytes()
            assert not data or data.endswith(b"\n"), f"{p} does not end with a newline"
            part = data.split(b"\n")[:-1]
            self.sizes.append(len(part))
            self.lines.extend(part)

    def start(self, s: int) -> int:
        return sum(self.sizes[:s])

    def segment_of(self, pos: int) -> int:
        """The segment holding stream position ``pos`` (the last one for the end)."""
        start = 0
        for s, size in enumerate(self.sizes):
            if pos < start + size:
                return s
            start += size
        return len(self.sizes) - 1

    def insert(self, pos: int, line: bytes, *, previous: bool = False) -> None:
        """Insert before stream position ``pos``; at a segment's first position, ``previous``
        puts the line at the end of the segment before instead (the same stream)."""
        s = self.segment_of(pos)
        if previous and s > 0 and pos == self.start(s):
            s -= 1
        self.lines.insert(pos, line)
        self.sizes[s] += 1

    def delete(self, j: int, k: int) -> None:
        """Remove positions j..k (inclusive)."""
        for pos in range(k, j - 1, -1):
            self.sizes[self.segment_of(pos)] -= 1
            del self.lines[pos]

    def offset(self, pos: int) -> tuple[Path, int]:
        """The file and byte offset where position ``pos``'s line starts."""
        s = self.segment_of(pos)
        return self.paths[s], sum(len(x) + 1 for x in self.lines[self.start(s) : pos])

    def save(self, *, drop_empty: bool = False) -> None:
        """Write every segment back; ``drop_empty``: delete a segment left with no lines
        (else leave it an empty file)."""
        start = 0
        for path, size in zip(self.paths, self.sizes, strict=True):
            chunk, start = self.lines[start : start + size], start + size
            if not chunk and drop_empty:
                path.unlink()
            else:
                path.write_bytes(b"".join(x + b"\n" for x in chunk))


def w0(trail: Path) -> Path:
    return trail / "w0"


def cp_path(trail: Path, size: int) -> Path:
    return w0(trail) / layout.CHECKPOINT_DIR / layout.checkpoint_name(size)


def resign(doc: dict[str, Any], key: Signer, *, claim: str | None = None) -> bytes:
    """``doc`` (its key_id and sig dropped) signed by ``key`` under the key id ``claim``
    (default: ``key``'s own): a forgery's canonical bytes, no newline."""
    body = {k: v for k, v in doc.items() if k not in ("key_id", "sig")}
    signed = {**body, "key_id": claim or key.key_id}
    return canonical({**signed, "sig": key.sign(canonical(signed))})


def malleate(sig: str) -> str:
    """The same 64 signature bytes in another base64 spelling: 64 bytes end in one byte
    written as two characters and ``==``, so the second character carries four bits that
    decoding ignores; flip one of them."""
    assert len(sig) == 88 and sig.endswith("==")
    return sig[:85] + B64[B64.index(sig[85]) ^ 1] + "=="


def same_signature_spelled_differently(orig: bytes, new: bytes) -> bool:
    """Whether ``new`` is ``orig`` with only its signature's base64 spelling changed: the
    malleability pinned by ``test_signature_encoding_is_not_malleable``, kept out of the
    general fuzzers so that they test the rest."""
    try:
        a, b = json.loads(orig), json.loads(new)
    except ValueError:
        return False
    if not isinstance(b, dict) or set(a) != set(b) or any(a[k] != b[k] for k in a if k != "sig"):
        return False
    try:
        return base64.b64decode(b["sig"], validate=True) == base64.b64decode(a["sig"])
    except (ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- fixtures
@dataclass(frozen=True)
class Pristine:
    trail: Path
    early: Path  # the same trail when it held EARLY records: what a rollback restores
    lines: tuple[bytes, ...]  # record lines by seq, no newline
    checkpoints: tuple[int, ...]  # checkpoint sizes
    foreign: tuple[bytes, ...]  # valid records of another log (w1), signed by our key
    fork_cp: dict[str, Any]  # a genuine checkpoint of another log also named w0
    work: Path  # where examples copy the trail

    def trusted(self, size: int = N) -> dict[str, Any]:
        """A copy of checkpoint ``size`` kept elsewhere (as an auditor would)."""
        return json.loads(cp_path(self.trail, size).read_bytes())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, signer: Signer, fill) -> Pristine:
    root = tmp_path_factory.mktemp("pristine")
    trail, early = root / "trail", root / "early"
    log = AuditLog(trail, signer, options=LogOptions(**OPTIONS))
    fill(log, EARLY)
    log.close()
    shutil.copytree(trail, early)
    log = AuditLog(trail, signer, options=LogOptions(**OPTIONS))
    fill(log, N - EARLY, start=EARLY)
    log.close()

    foreign = AuditLog(root / "foreign", signer, log_id="w1")
    fill(foreign, 5, start=100)
    foreign.close()
    fork = AuditLog(root / "fork", signer, log_id="w0")
    fill(fork, 10, start=200)
    fork.close()

    stream = Stream(w0(trail))
    assert stream.sizes == [25, 25, 10]
    checkpoints = tuple(size for size, _ in layout.checkpoints(w0(trail)))
    assert {25, EARLY, 50, N} <= set(checkpoints), checkpoints
    return Pristine(
        trail=trail,
        early=early,
        lines=tuple(stream.lines),
        checkpoints=checkpoints,
        foreign=tuple(Stream(root / "foreign" / "w1").lines),
        fork_cp=json.loads(cp_path(root / "fork", 10).read_bytes()),
        work=root,
    )


@contextlib.contextmanager
def copy_of(pristine: Pristine, src: Path | None = None) -> Iterator[Path]:
    """A fresh copy of the pristine trail (or of ``src``), removed afterwards."""
    d = Path(tempfile.mkdtemp(dir=pristine.work))
    try:
        shutil.copytree(src or pristine.trail, d / "trail")
        yield d / "trail"
    finally:
        shutil.rmtree(d)


def first_damage(verify, trail: Path, trusted: list[dict] | None = None) -> Damage:
    reports = verify(trail, trusted)
    assert list(reports) == ["w0"]
    damages = reports["w0"].damages
    assert damages, "the tampering went unnoticed: the log verified clean"
    return damages[0]


def expect(damage: Damage, kinds: str | set[str], seq: int | None) -> None:
    kinds = {kinds} if isinstance(kinds, str) else kinds
    assert damage.kind in kinds and damage.seq == seq, (
        f"expected {sorted(kinds)} at record {seq}, got {damage}"
    )


# --------------------------------------------------------------------------- control
def test_pristine_copy_verifies_clean(pristine: Pristine, verify) -> None:
    with copy_of(pristine) as trail:
        rep = verify(trail)["w0"]
    assert rep.ok, rep.damages
    assert rep.records == N and rep.first_seq == 0
    assert rep.checkpoints == len(pristine.checkpoints) and rep.last_checkpoint == N
    assert rep.unsigned_tail == 0 and rep.unfinished == [] and rep.recoveries == []
    assert len(rep.request_ids) == N // 2


def test_rollback_copy_verifies_clean(pristine: Pristine, verify) -> None:
    rep = verify(pristine.early)["w0"]
    assert rep.ok and rep.records == EARLY


# --------------------------------------------------------------------------- (a) edited
@FUZZ
@given(data=st.data())
def test_edited_record_bytes(pristine: Pristine, verify, data: st.DataObject) -> None:
    """Any change to the bytes of record j's line: edited at j."""
    j = data.draw(st.integers(0, N - 1), label="record")
    line = pristine.lines[j]
    how = data.draw(st.sampled_from(["replace", "insert", "delete", "rewrite", "merge"]))
    kinds: str | set[str] = "edited"
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        if how == "merge":  # the newline between j and j+1 removed (inside one segment)
            assume(j + 1 < N and s.segment_of(j) == s.segment_of(j + 1))
            s.lines[j] += s.lines[j + 1]
            s.delete(j + 1, j + 1)
            # One line now holds two records: an edit of j's line, or j+1 lost. Verify
            # names the line it cannot parse (edited); either reading is fair.
            kinds = {"edited", "deleted"}
        else:
            if how == "replace":  # one byte, newline included (it splits the line)
                pos = data.draw(st.integers(0, len(line) - 1), label="pos")
                byte = data.draw(st.integers(0, 255).filter(lambda b: b != line[pos]))
                new = line[:pos] + bytes([byte]) + line[pos + 1 :]
            elif how == "insert":
                pos = data.draw(st.integers(0, len(line)), label="pos")
                extra = data.draw(one_line(1, 8), label="bytes")
                new = line[:pos] + extra + line[pos:]
            elif how == "delete":  # a byte range; the whole line leaves an empty line
                a = data.draw(st.integers(0, len(line) - 1), label="from")
                b = data.draw(st.integers(a + 1, len(line)), label="to")
                new = line[:a] + line[b:]
            else:  # the line replaced by other bytes
                new = data.draw(one_line(0, 300))
                assume(new != line)
            assume(not same_signature_spelled_differently(line, new))
            s.lines[j] = new
        s.save()
        expect(first_damage(verify, trail), kinds, j)


@FUZZ
@given(data=st.data())
def test_resigned_forgery(pristine: Pristine, verify, stranger: Signer, data) -> None:
    """Record j replaced by a forgery: changed fields re-signed by the attacker's key (under
    its own key id or claiming ours), changed fields under the old signature, or the same
    fields re-signed: edited at j."""
    j = data.draw(st.integers(0, N - 1), label="record")
    doc = json.loads(pristine.lines[j])
    how = data.draw(st.sampled_from(["own_key_id", "our_key_id", "old_sig", "same_fields"]))
    if how != "same_fields":
        field = data.draw(st.sampled_from(sorted(k for k in doc if k not in ("key_id", "sig"))))
        value = data.draw(
            st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
            label="value",
        )
        doc = {**doc, field: value}
    if how == "own_key_id":
        new = resign(doc, stranger)
    elif how == "our_key_id":
        new = resign(doc, stranger, claim=doc["key_id"])
    elif how == "old_sig":
        new = canonical(doc)
    else:
        new = resign(doc, stranger)
    assume(new != pristine.lines[j])
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.lines[j] = new
        s.save()
        expect(first_damage(verify, trail), "edited", j)


# --------------------------------------------------------------------------- (b) deleted
@FUZZ
@given(data=st.data())
def test_deleted_records(pristine: Pristine, verify, data: st.DataObject) -> None:
    """Records j..k removed, the last record kept (else it is a truncation): deleted at j."""
    j = data.draw(st.integers(0, N - 2), label="from")
    k = data.draw(st.integers(j, N - 2), label="to")
    drop_empty = data.draw(st.booleans(), label="unlink emptied segments")
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.delete(j, k)
        s.save(drop_empty=drop_empty)
        expect(first_damage(verify, trail), "deleted", j)


@pytest.mark.parametrize("gone", [[0], [1], [0, 1]], ids=["first", "middle", "first-two"])
@pytest.mark.parametrize("how", ["unlink", "empty"])
def test_deleted_segments(pristine: Pristine, verify, gone: list[int], how: str) -> None:
    """Whole segment files removed (or emptied), not the last: deleted at the first record
    of the first one. (The last one is a truncation: test_truncated.)"""
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        for i in gone:
            if how == "unlink":
                s.paths[i].unlink()
            else:
                s.paths[i].write_bytes(b"")
        expect(first_damage(verify, trail), "deleted", s.start(gone[0]))


# --------------------------------------------------------------------------- (c) inserted
@FUZZ
@given(data=st.data())
def test_inserted_copy(pristine: Pristine, verify, data: st.DataObject) -> None:
    """A verbatim copy of record i inserted before position p (p == N: after the last)."""
    i = data.draw(st.integers(0, N - 1), label="copy of")
    p = data.draw(st.integers(0, N), label="before")
    previous = data.draw(st.booleans(), label="end of previous segment")
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.insert(p, pristine.lines[i], previous=previous)
        s.save()
        # A copy of record p before record p is byte-identical to what stood at p: the
        # stream first differs at p + 1, where the original now sits a second time.
        expect(first_damage(verify, trail), "inserted", p + 1 if i == p else p)


@FUZZ
@given(data=st.data())
def test_inserted_forgery(pristine: Pristine, verify, stranger: Signer, data) -> None:
    """A line that is a record but not one of this log's, inserted before position p: a
    forgery (re-signed by the attacker, or changed under the old signature, or the same
    fields re-signed) or a genuine record of another log signed by our key."""
    p = data.draw(st.integers(0, N), label="before")
    how = data.draw(st.sampled_from(["own_key_id", "our_key_id", "old_sig", "foreign"]))
    if how == "foreign":
        line = data.draw(st.sampled_from(pristine.foreign))
    else:
        doc = json.loads(data.draw(st.sampled_from(pristine.lines), label="based on"))
        if data.draw(st.booleans(), label="change a field"):
            doc = {**doc, "request_id": data.draw(st.text(max_size=8), label="request_id")}
        if how == "own_key_id":
            line = resign(doc, stranger)
        elif how == "our_key_id":
            line = resign(doc, stranger, claim=doc["key_id"])
        else:
            line = canonical(doc)
        assume(line not in pristine.lines)
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.insert(p, line, previous=data.draw(st.booleans(), label="end of previous segment"))
        s.save()
        kinds: str | set[str] = "inserted"
        if p == N and how != "foreign":
            # After the last record nothing follows to show that the chain skips the line:
            # an extra line or an edit of a record that never was. Verify says edited.
            kinds = {"inserted", "edited"}
        expect(first_damage(verify, trail), kinds, p)


@FUZZ
@given(data=st.data())
def test_inserted_garbage_is_caught(pristine: Pristine, verify, data: st.DataObject) -> None:
    """A line that is not a record inserted before position p: caught, at p. (Its kind
    should be ``inserted`` too, except after the last record; verify says ``edited``:
    pinned by test_garbage_line_is_reported_as_inserted.)"""
    p = data.draw(st.integers(0, N), label="before")
    garbage = data.draw(one_line(0, 200))
    assume(parse_line(garbage) is None)
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.insert(p, garbage, previous=data.draw(st.booleans(), label="end of previous segment"))
        s.save()
        damage = first_damage(verify, trail)
        assert damage.seq == p, damage
        assert damage.kind in {"inserted", "edited"}, damage


# --------------------------------------------------------------------------- (d) reordered
@FUZZ
@given(data=st.data())
def test_reordered_records(pristine: Pristine, verify, data: st.DataObject) -> None:
    """Two records swapped, or one moved: reordered at the first position that changed."""
    how = data.draw(st.sampled_from(["swap", "move"]))
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        if how == "swap":
            j = data.draw(st.integers(0, N - 2), label="j")
            k = data.draw(st.integers(j + 1, N - 1), label="k")
            s.lines[j], s.lines[k] = s.lines[k], s.lines[j]
            first = j
        else:
            j = data.draw(st.integers(0, N - 1), label="from")
            q = data.draw(st.integers(0, N - 1).filter(lambda q: q != j), label="to")
            line = s.lines[j]
            s.delete(j, j)
            s.insert(q, line)
            first = min(j, q)
        s.save()
        expect(first_damage(verify, trail), "reordered", first)


@pytest.mark.parametrize("a,b", [(0, 1), (1, 2), (0, 2)])
def test_reordered_segments(pristine: Pristine, verify, a: int, b: int) -> None:
    """Two segment files' contents swapped: reordered at the first one's first record."""
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        da, db = s.paths[a].read_bytes(), s.paths[b].read_bytes()
        s.paths[a].write_bytes(db)
        s.paths[b].write_bytes(da)
        expect(first_damage(verify, trail), "reordered", s.start(a))


def test_segment_renamed_out_of_order(pristine: Pristine, verify) -> None:
    """The last segment renamed to sort before the middle one: reordered at 25."""
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.paths[2].rename(w0(trail) / layout.segment_name(10))
        expect(first_damage(verify, trail), "reordered", 25)


# --------------------------------------------------------------------------- (e) truncated
@FUZZ
@given(data=st.data())
def test_truncated(pristine: Pristine, verify, data: st.DataObject) -> None:
    """Records j.. cut off the end (at a line boundary) while checkpoint N remains:
    truncated at j."""
    j = data.draw(st.integers(0, N - 1), label="cut from")
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.delete(j, N - 1)
        s.save(drop_empty=data.draw(st.booleans(), label="unlink emptied segments"))
        expect(first_damage(verify, trail), "truncated", j)


# --------------------------------------------------------------------------- (f) torn
@FUZZ
@given(data=st.data())
def test_torn_last_line(pristine: Pristine, verify, data: st.DataObject) -> None:
    """The file cut inside record j's line (everything after it gone), so the log ends in
    part of a line: torn_last_line at j. (A cut that removes only the newline leaves a whole
    record: test_record_line_without_newline.) The walk stops at the tear, so for j < N - 1
    the checkpoints that also show the truncation are not reached."""
    j = data.draw(st.integers(0, N - 1), label="record")
    keep = data.draw(st.integers(1, len(pristine.lines[j]) - 1), label="bytes kept")
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        path, off = s.offset(j)
        with path.open("r+b") as f:
            f.truncate(off + keep)
        for later in s.paths[s.segment_of(j) + 1 :]:
            later.unlink()
        expect(first_damage(verify, trail), "torn_last_line", j)


@FUZZ
@given(data=st.data())
def test_half_record_appended(pristine: Pristine, signer: Signer, verify, data) -> None:
    """What a crash mid-write leaves: the start of the next record (or other bytes) after
    the last newline: torn_last_line at N."""
    nxt = seal(
        {"request_id": "req-9999", "v": 1, "log": "w0", "seq": N,
         "prev": record_hash(pristine.lines[-1]).hex(), "time": "2026-01-01T00:00:00.000000Z",
         "kind": "start"},
        signer,
    )  # fmt: skip
    tail = data.draw(
        st.one_of(
            st.integers(1, len(nxt) - 1).map(lambda c: nxt[:c]),
            one_line(1, 100),
        ),
        label="tail",
    )
    assume(parse_line(tail) is None)
    with copy_of(pristine) as trail:
        with Stream(w0(trail)).paths[-1].open("ab") as f:
            f.write(tail)
        expect(first_damage(verify, trail), "torn_last_line", N)


# --------------------------------------------------------------------------- (g) checkpoints
@FUZZ
@given(data=st.data())
def test_forged_checkpoint(pristine: Pristine, verify, stranger: Signer, data) -> None:
    """A checkpoint file edited, cut, re-signed by the attacker (own key id or ours, tree
    head changed or not), or fabricated (signed by the attacker, a genuine one copied under
    another size's name, or garbage): forged_checkpoint, a file (no seq), and nothing else."""
    size = data.draw(st.sampled_from(pristine.checkpoints), label="checkpoint")
    how = data.draw(st.sampled_from(["byte", "cut", "own_key_id", "our_key_id", "fabricate"]))
    with copy_of(pristine) as trail:
        path = cp_path(trail, size)
        raw = path.read_bytes()
        doc = json.loads(raw)
        if how == "byte":  # one byte of the JSON replaced (the trailing newline aside)
            pos = data.draw(st.integers(0, len(raw) - 2), label="pos")
            byte = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
            new = raw[:pos] + bytes([byte]) + raw[pos + 1 :]
            assume(not same_signature_spelled_differently(raw, new))
            path.write_bytes(new)
        elif how == "cut":
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 2), label="keep")])
        elif how in ("own_key_id", "our_key_id"):
            if data.draw(st.booleans(), label="change the tree head"):
                doc["root"] = data.draw(st.binary(min_size=32, max_size=32)).hex()
            claim = doc["key_id"] if how == "our_key_id" else None
            path.write_bytes(resign(doc, stranger, claim=claim) + b"\n")
        else:
            at = data.draw(st.integers(1, 2 * N), label="fabricated size")
            what = data.draw(st.sampled_from(["signed", "copied", "garbage"]))
            assume(not (what == "copied" and at == size))
            if what == "signed":
                root = data.draw(st.binary(min_size=32, max_size=32), label="root").hex()
                claim = data.draw(st.sampled_from([None, doc["key_id"]]), label="key id")
                body = resign({**doc, "size": at, "root": root}, stranger, claim=claim)
            elif what == "copied":
                body = raw.rstrip(b"\n")
            else:
                body = data.draw(st.binary(max_size=100))
            cp_path(trail, at).write_bytes(body + b"\n")
        reports = verify(trail)
        assert list(reports) == ["w0"]
        damages = reports["w0"].damages
        assert damages, "the forged checkpoint went unnoticed"
        expect(damages[0], "forged_checkpoint", None)
        assert {d.kind for d in damages} == {"forged_checkpoint"}, damages


# --------------------------------------------------------------------------- beyond the log
@FUZZ
@given(k=st.integers(1, N - 1), drop_empty=st.booleans())
def test_tail_cut_with_its_checkpoints(pristine: Pristine, verify, k: int, drop_empty) -> None:
    """The last k records removed together with every checkpoint over any of them: the log
    alone looks complete (the documented limit); a trusted copy of checkpoint N says
    truncated at N - k."""
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.delete(N - k, N - 1)
        s.save(drop_empty=drop_empty)
        for size, path in layout.checkpoints(w0(trail)):
            if size > N - k:
                path.unlink()
        rep = verify(trail)["w0"]
        assert rep.ok and rep.records == N - k, rep.damages  # undetectable from the log
        damage = first_damage(verify, trail, [pristine.trusted()])
        expect(damage, "truncated", N - k)
        assert damage.where == "--trusted-checkpoint"


def test_rollback_to_an_earlier_copy(pristine: Pristine, verify) -> None:
    """The whole directory replaced by a copy from when it held EARLY records: clean alone;
    truncated at EARLY against a trusted copy of checkpoint N."""
    with copy_of(pristine, pristine.early) as trail:
        assert verify(trail)["w0"].ok  # undetectable from the log
        expect(first_damage(verify, trail, [pristine.trusted()]), "truncated", EARLY)


def test_log_deleted_whole(pristine: Pristine, verify) -> None:
    """The log's directory removed: nothing to report alone; a trusted checkpoint that names
    it says deleted."""
    with copy_of(pristine) as trail:
        shutil.rmtree(w0(trail))
        assert verify(trail) == {}  # undetectable from the trail
        rep = verify(trail, [pristine.trusted()])["w0"]
        expect(rep.damages[0], "deleted", None)


def test_dropping_checkpoints_alone_is_not_damage(pristine: Pristine, verify) -> None:
    """Checkpoints only add protection: without them the records still verify (their tail
    is then unsigned); a trusted checkpoint still matches."""
    with copy_of(pristine) as trail:
        for _, path in layout.checkpoints(w0(trail)):
            path.unlink()
        rep = verify(trail, [pristine.trusted()])["w0"]
        assert rep.ok and rep.unsigned_tail == N, rep.damages


def test_trusted_earlier_checkpoint_matches(pristine: Pristine, verify) -> None:
    with copy_of(pristine) as trail:
        reports = verify(trail, [pristine.trusted(EARLY), pristine.trusted(N)])
        assert reports["w0"].ok, reports["w0"].damages


@pytest.mark.parametrize("how", ["own_key_id", "our_key_id", "longer", "other_root"])
def test_trusted_checkpoint_resigned(pristine: Pristine, verify, stranger: Signer, how) -> None:
    """A 'trusted' checkpoint that our key did not sign: forged_checkpoint."""
    doc = pristine.trusted()
    if how == "longer":
        doc["size"] = N + 5
    elif how == "other_root":
        doc["root"] = "ab" * 32
    claim = None if how == "own_key_id" else doc["key_id"]
    forged = json.loads(resign(doc, stranger, claim=claim))
    with copy_of(pristine) as trail:
        damage = first_damage(verify, trail, [forged])
        expect(damage, "forged_checkpoint", None)
        assert damage.where == "--trusted-checkpoint"


def test_trusted_checkpoint_of_a_fork(pristine: Pristine, verify) -> None:
    """A genuine checkpoint of another history under the same log id (what a key holder who
    rewrote the log would leave behind): the records do not match it: edited."""
    with copy_of(pristine) as trail:
        damage = first_damage(verify, trail, [pristine.fork_cp])
        expect(damage, "edited", None)


# --------------------------------------------------------------------------- retention
RETAIN = {"checkpoint_records": 4, "segment_records": 10, "retain_segments": 2}
RETAINED_N = 45


@pytest.fixture(scope="module")
def retained(tmp_path_factory: pytest.TempPathFactory, signer: Signer, fill) -> Pristine:
    """A log whose oldest segments retention deleted (records 30.. kept)."""
    root = tmp_path_factory.mktemp("retained")
    log = AuditLog(root / "trail", signer, options=LogOptions(**RETAIN))
    fill(log, RETAINED_N)
    log.close()
    stream = Stream(w0(root / "trail"))
    assert [p.name for p in stream.paths] == [layout.segment_name(30), layout.segment_name(40)]
    return Pristine(
        trail=root / "trail", early=root, lines=tuple(stream.lines),
        checkpoints=tuple(s for s, _ in layout.checkpoints(w0(root / "trail"))),
        foreign=(), fork_cp={}, work=root,
    )  # fmt: skip


def test_retained_log_verifies_clean(retained: Pristine, verify) -> None:
    with copy_of(retained) as trail:
        rep = verify(trail)["w0"]
    assert rep.ok, rep.damages
    assert rep.first_seq == 30 and rep.records == RETAINED_N - 30 and rep.unsigned_tail == 0
    assert any("deleted by retention" in note for note in rep.notes)


def test_retention_statement_deleted(retained: Pristine, verify) -> None:
    """Without the signed statement nothing explains the missing records: deleted at 0."""
    with copy_of(retained) as trail:
        (w0(trail) / layout.RETENTION_FILE).unlink()
        expect(first_damage(verify, trail), "deleted", 0)


@FUZZ
@given(data=st.data())
def test_forged_retention(retained: Pristine, verify, stranger: Signer, data) -> None:
    """The retention statement edited, cut, re-signed by the attacker (own key id or ours,
    its point moved or not), or its checkpoint removed: forged_retention."""
    how = data.draw(st.sampled_from(["byte", "cut", "own_key_id", "our_key_id", "no_anchor"]))
    with copy_of(retained) as trail:
        path = w0(trail) / layout.RETENTION_FILE
        raw = path.read_bytes()
        doc = json.loads(raw)
        if how == "byte":
            pos = data.draw(st.integers(0, len(raw) - 2), label="pos")
            byte = data.draw(st.integers(0, 255).filter(lambda b: b != raw[pos]))
            new = raw[:pos] + bytes([byte]) + raw[pos + 1 :]
            assume(not same_signature_spelled_differently(raw, new))
            path.write_bytes(new)
        elif how == "cut":
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 2), label="keep")])
        elif how == "no_anchor":  # the checkpoint the statement stands on removed
            cp_path(trail, doc["deleted_below"]).unlink()
        else:
            doc["deleted_below"] = data.draw(st.sampled_from([0, 20, 30, 40]), label="below")
            claim = doc["key_id"] if how == "our_key_id" else None
            path.write_bytes(resign(doc, stranger, claim=claim) + b"\n")
        expect(first_damage(verify, trail), "forged_retention", None)


# --------------------------------------------------------------------------- bugs found (fixed)
@pytest.mark.parametrize("garbage", [b"garbage", b"", b"{}"], ids=["text", "blank", "json"])
@pytest.mark.parametrize("p", [3, 25])
def test_garbage_line_is_reported_as_inserted(pristine, verify, garbage: bytes, p: int) -> None:
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.insert(p, garbage)
        s.save()
        expect(first_damage(verify, trail), "inserted", p)


@pytest.mark.parametrize("what", ["record-10", "record-59", "checkpoint", "retention"])
def test_signature_encoding_is_not_malleable(pristine, retained, verify, what: str) -> None:
    """Edited record j must be reported at j (not as a chain break at j + 1, nor as a forged
    checkpoint over the last record); an edited checkpoint or statement must be caught."""
    src = retained if what == "retention" else pristine
    with copy_of(src) as trail:
        if what.startswith("record"):
            j = int(what.split("-")[1])
            s = Stream(w0(trail))
            doc = json.loads(s.lines[j])
            s.lines[j] = canonical({**doc, "sig": malleate(doc["sig"])})
            s.save()
            expect(first_damage(verify, trail), "edited", j)
        else:
            path = (
                cp_path(trail, src.checkpoints[1])
                if what == "checkpoint"
                else w0(trail) / layout.RETENTION_FILE
            )
            doc = json.loads(path.read_bytes())
            path.write_bytes(canonical({**doc, "sig": malleate(doc["sig"])}) + b"\n")
            kind = "forged_checkpoint" if what == "checkpoint" else "forged_retention"
            expect(first_damage(verify, trail), kind, None)


@pytest.mark.parametrize("seg", [2, 0], ids=["last-record", "end-of-first-segment"])
def test_record_line_without_newline(pristine: Pristine, verify, seg: int) -> None:
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        path = s.paths[seg]
        path.write_bytes(path.read_bytes()[:-1])
        last = s.start(seg) + s.sizes[seg] - 1
        damage = first_damage(verify, trail)
        assert damage.seq == last, damage
        if seg == 2:
            assert damage.kind == "torn_last_line", damage


def test_segment_renamed_in_place(pristine: Pristine, verify) -> None:
    with copy_of(pristine) as trail:
        s = Stream(w0(trail))
        s.paths[1].rename(w0(trail) / layout.segment_name(26))
        assert first_damage(verify, trail).seq == 25


@pytest.mark.parametrize("how", ["whitespace", "duplicate-key"])
def test_checkpoint_file_must_be_canonical(pristine: Pristine, verify, how: str) -> None:
    with copy_of(pristine) as trail:
        path = cp_path(trail, pristine.checkpoints[1])
        raw = path.read_bytes()
        if how == "whitespace":
            path.write_bytes(b" " + raw.replace(b",", b", ") + b"\n")
        else:
            path.write_bytes(b'{"root":"' + b"0" * 64 + b'",' + raw[1:])
        expect(first_damage(verify, trail), "forged_checkpoint", None)
