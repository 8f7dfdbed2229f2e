"""Inclusion proofs of one request's record (``audit prove`` / ``check-proof``): every request
of logs of many sizes proves, every kind of tampering is named, and the audit path equals the
independent pymerkle implementation's."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pymerkle import InmemoryTree

from sparsecircuits.audit import layout
from sparsecircuits.audit.log import AuditLog, LogOptions
from sparsecircuits.audit.merkle import from_hex_list, hex_list, inclusion_proof, leaf_hash
from sparsecircuits.audit.proofs import PROOF_SCHEMA, check_proof, prove
from sparsecircuits.audit.records import seal
from sparsecircuits.audit.signing import Keyring, Signer
from sparsecircuits.errors import InputError

SIGNER = Signer.generate()
OTHER = Signer.generate()
KEYRING = Keyring([SIGNER.private.public_key()])


def _rid(i: int) -> str:
    return f"cmpl-{i:04d}"


def _write_log(trail: Path, n: int, *, segment_records: int = 100_000) -> list[str]:
    """A closed log ``trail/w0`` of ``n`` start records, record i naming request ``_rid(i)``;
    returns the request ids in record order."""
    log = AuditLog(
        trail, SIGNER, options=LogOptions(checkpoint_records=5, segment_records=segment_records)
    )
    try:
        for i in range(n):
            log.append("start", {"request_id": _rid(i), "params": {"i": i, "note": "x" * (i % 3)}})
    finally:
        log.close()
    return [_rid(i) for i in range(n)]


def _lines(trail: Path) -> list[bytes]:
    """The record lines of ``trail/w0`` in order (no newlines)."""
    out = []
    for _, seg in layout.segments(trail / "w0"):
        out.extend(x for x in seg.read_bytes().split(b"\n") if x)
    return out


@pytest.fixture(scope="module")
def log13(tmp_path_factory) -> tuple[Path, list[str]]:
    """13 records (not a power of two), over three segments (the proof reads them all)."""
    trail = tmp_path_factory.mktemp("trail13")
    return trail, _write_log(trail, 13, segment_records=6)


@pytest.fixture
def proof(log13) -> dict[str, Any]:
    """A proof with a few path elements (record 6 of 13: a 4-element path)."""
    trail, ids = log13
    p = prove(trail, ids[6])
    assert check_proof(p, KEYRING) == [] and len(p["proof"]) >= 3
    return copy.deepcopy(p)


# --- Every request proves -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 11, 16, 17])
def test_every_request_proves_against_the_last_checkpoint(tmp_path, n):
    ids = _write_log(tmp_path, n)
    lines = _lines(tmp_path)
    assert len(lines) == n
    tree = InmemoryTree(algorithm="sha256")  # independent RFC 9162 implementation
    assert tree.leaf_prefix == b"\x00" and tree.node_prefix == b"\x01"
    for line in lines:
        tree.append_entry(line)
    for i, rid in enumerate(ids):  # first, last and everything between
        p = prove(tmp_path, rid)
        assert p["schema"] == PROOF_SCHEMA and p["log"] == "w0" and p["request_id"] == rid
        assert p["index"] == i and p["record"].encode() == lines[i]
        cp = p["checkpoint"]
        assert cp["size"] == n, "the latest checkpoint (close() writes one over every record)"
        assert check_proof(p, KEYRING) == []
        # pymerkle's inclusion path is [leaf hash, our audit path...]; the roots agree too
        ours = from_hex_list(p["proof"], field="proof")
        theirs = tree.prove_inclusion(i + 1, n)
        assert theirs.path == [leaf_hash(lines[i]), *ours]
        assert tree.get_root(n).hex() == cp["root"]
        theirs.verify(leaf_hash(lines[i]), bytes.fromhex(cp["root"]), index=i + 1, size=n)


def test_proof_over_several_segments_and_against_a_smaller_tree(log13):
    trail, ids = log13
    assert len(layout.segments(trail / "w0")) == 3
    for rid in ids:
        assert check_proof(prove(trail, rid), KEYRING) == []
    # an auditor holding only the 6-record checkpoint (written at the first rotation) checks a
    # record it covers: the same proof shape, against that older, smaller tree head
    cp6 = json.loads((trail / "w0" / "checkpoints" / layout.checkpoint_name(6)).read_bytes())
    lines = _lines(trail)[:6]
    tree = InmemoryTree(algorithm="sha256")
    for line in lines:
        tree.append_entry(line)
    assert tree.get_root(6).hex() == cp6["root"]
    p = prove(trail, ids[4])
    p["checkpoint"] = cp6
    p["proof"] = hex_list(inclusion_proof([leaf_hash(x) for x in lines], 4))
    assert check_proof(p, KEYRING) == []


def test_a_request_with_a_completion_proves_its_completion_record(tmp_path):
    log = AuditLog(tmp_path, SIGNER, options=LogOptions(checkpoint_records=5))
    try:
        log.append("open", {"server": {"pid": 1}})  # no request_id
        log.append("start", {"request_id": "cmpl-a"})
        log.append("start", {"request_id": "cmpl-b"})
        log.append("complete", {"request_id": "cmpl-a", "outcome": "completed"})
        log.append("start", {"request_id": "cmpl-a-suffix"})  # a longer id with the same prefix
    finally:
        log.close()
    p = prove(tmp_path, "cmpl-a")
    assert p["index"] == 3 and json.loads(p["record"])["kind"] == "complete"
    assert check_proof(p, KEYRING) == []
    p = prove(tmp_path, "cmpl-b")  # no completion: its start record
    assert p["index"] == 2 and json.loads(p["record"])["kind"] == "start"
    assert check_proof(p, KEYRING) == []


# --- prove refuses -------------------------------------------------------------------------------
def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_prove_an_unknown_request(log13):
    trail, _ = log13
    with pytest.raises(InputError) as err:
        prove(trail, "cmpl-nope")
    assert "cmpl-nope" in _one_line(err)
    with pytest.raises(InputError) as err:  # a directory with no log at all
        prove(trail / "missing", "cmpl-0000")
    _one_line(err)


def test_prove_a_record_no_checkpoint_covers_yet(tmp_path):
    _write_log(tmp_path, 4)  # closed: a checkpoint over 4 records
    opts = LogOptions(checkpoint_records=1000, checkpoint_seconds=3600.0)
    log = AuditLog(tmp_path, SIGNER, log_id="w0", options=opts)
    try:
        seq = log.append("start", {"request_id": "cmpl-late"})
        log.sync(seq)
        assert seq == 4
        with pytest.raises(InputError) as err:
            prove(tmp_path, "cmpl-late")
        assert "not covered by a checkpoint" in _one_line(err)
        assert check_proof(prove(tmp_path, _rid(3)), KEYRING) == []  # the older ones still prove
    finally:
        log.close()
    assert check_proof(prove(tmp_path, "cmpl-late"), KEYRING) == []  # close() checkpoints it


def test_prove_a_request_id_that_json_escapes(tmp_path):
    log = AuditLog(tmp_path, SIGNER, options=LogOptions(checkpoint_records=5))
    try:
        log.append("start", {"request_id": 'id-"é'})
    finally:
        log.close()
    assert check_proof(prove(tmp_path, 'id-"é'), KEYRING) == []


# --- check_proof names what is wrong -------------------------------------------------------------
def _flip_hex(s: str, i: int = 0) -> str:
    return s[:i] + ("0" if s[i] != "0" else "1") + s[i + 1 :]


def _resign(cp: dict[str, Any], signer: Signer, **changes: Any) -> dict[str, Any]:
    body = {k: v for k, v in cp.items() if k not in ("key_id", "sig")}
    return json.loads(seal({**body, **changes}, signer))


def _edit_record(p: dict[str, Any]) -> None:
    rec = p["record"]
    i = rec.index("cmpl-") + len("cmpl-")  # one digit of the request id
    p["record"] = rec[:i] + ("9" if rec[i] != "9" else "8") + rec[i + 1 :]
    assert len(p["record"]) == len(rec) and json.loads(p["record"])


def _bad_index(p: dict[str, Any]) -> None:
    p["index"] += 1


def _flip_element(p: dict[str, Any]) -> None:
    p["proof"][1] = _flip_hex(p["proof"][1], 5)


def _truncate(p: dict[str, Any]) -> None:
    p["proof"] = p["proof"][:-1]


def _extend(p: dict[str, Any]) -> None:
    p["proof"] = [*p["proof"], p["proof"][0]]


def _edit_root(p: dict[str, Any]) -> None:
    p["checkpoint"]["root"] = _flip_hex(p["checkpoint"]["root"], 10)


def _resign_other_key(p: dict[str, Any]) -> None:
    p["checkpoint"] = _resign(p["checkpoint"], OTHER)


def _resign_other_key_new_root(p: dict[str, Any]) -> None:
    root = _flip_hex(p["checkpoint"]["root"], 3)
    p["checkpoint"] = _resign(p["checkpoint"], OTHER, root=root)


def _change_size(p: dict[str, Any]) -> None:
    p["checkpoint"]["size"] += 1


def _change_size_smaller(p: dict[str, Any]) -> None:
    p["checkpoint"]["size"] = p["index"] + 1


def _checkpoint_schema(p: dict[str, Any]) -> None:
    p["checkpoint"]["schema"] = "sparsecircuits.audit.checkpoint/2"


def _checkpoint_other_log(p: dict[str, Any]) -> None:
    p["checkpoint"]["log"] = "w1"


def _drop_checkpoint(p: dict[str, Any]) -> None:
    del p["checkpoint"]


def _bad_hex(p: dict[str, Any]) -> None:
    p["proof"][0] = p["proof"][0].upper()


TAMPERED = {
    "record line edited (one character)": (_edit_record, "record's signature"),
    "index changed": (_bad_index, "seq, log or request id"),
    "a proof element flipped": (_flip_element, "audit path"),
    "proof truncated": (_truncate, "audit path"),
    "proof extended": (_extend, "audit path"),
    "checkpoint root edited": (_edit_root, "checkpoint's signature"),
    "checkpoint re-signed with another key": (_resign_other_key, "checkpoint's signature"),
    "another key's checkpoint, other root": (_resign_other_key_new_root, "checkpoint's signature"),
    "checkpoint size changed": (_change_size, "checkpoint's signature"),
    "checkpoint size shrunk": (_change_size_smaller, "checkpoint's signature"),
    "checkpoint schema": (_checkpoint_schema, "checkpoint's signature"),
    "checkpoint of another log": (_checkpoint_other_log, "checkpoint's signature"),
    "no checkpoint": (_drop_checkpoint, "no checkpoint object"),
    "a proof element in capitals": (_bad_hex, "proof[0]"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_proof_is_named(proof, case):
    tamper, expected = TAMPERED[case]
    tamper(proof)
    problems = check_proof(proof, KEYRING)
    assert problems, case
    assert any(expected in p for p in problems), problems
    assert all(isinstance(p, str) and p and "\n" not in p for p in problems)


def test_root_edit_alone_also_breaks_the_path(proof):
    # the signature is what a forger would defeat first; the path must fail independently
    _edit_root(proof)
    assert any("audit path" in p for p in check_proof(proof, KEYRING))


def test_a_path_re_signed_by_a_trusted_key_still_has_to_lead_to_the_root(proof):
    # even a checkpoint signed by the trusted key fails when its root is not the path's
    proof["checkpoint"] = _resign(
        proof["checkpoint"], SIGNER, root=_flip_hex(proof["checkpoint"]["root"], 7)
    )
    assert check_proof(proof, KEYRING) == [
        "the audit path does not lead to the checkpoint's tree head"
    ]


def test_wrong_keyring(proof):
    problems = check_proof(proof, Keyring([OTHER.private.public_key()]))
    assert any("checkpoint's signature" in p for p in problems)
    assert any("record's signature" in p for p in problems)
    assert check_proof(proof, Keyring()) != []  # no key at all trusts nothing


def test_wrong_schema(proof):
    proof["schema"] = "sparsecircuits.audit.proof/0"
    problems = check_proof(proof, KEYRING)
    assert problems == [f'not a proof (expected "schema": "{PROOF_SCHEMA}")']
    del proof["schema"]
    assert check_proof(proof, KEYRING) == problems


@pytest.mark.parametrize("value", [None, "seven", 6.5, -1, 10**6])
def test_index_of_the_wrong_type_or_range(proof, value):
    proof["index"] = value
    assert check_proof(proof, KEYRING)


@pytest.mark.parametrize("value", [None, 5, {"a": 1}, ""])
def test_record_of_the_wrong_type(proof, value):
    proof["record"] = value
    assert any("record's signature" in p for p in check_proof(proof, KEYRING))


@pytest.mark.parametrize("value", [None, "ab", [1], ["zz" * 32]])
def test_path_of_the_wrong_type(proof, value):
    proof["proof"] = value
    assert check_proof(proof, KEYRING)


@pytest.mark.parametrize("value", ["cp", [1, 2], 7])
def test_checkpoint_that_is_not_an_object(proof, value):
    proof["checkpoint"] = value
    assert any("checkpoint" in p for p in check_proof(proof, KEYRING))


def test_a_proof_survives_a_json_round_trip(proof, tmp_path):
    path = tmp_path / "proof.json"
    path.write_text(json.dumps(proof, indent=2))
    assert check_proof(json.loads(path.read_text()), KEYRING) == []


def test_a_proof_relabelled_for_another_request_fails(tmp_path: Path) -> None:
    """The proof's own request_id and log must be the record's (else a proof of one request
    would read as a proof of another)."""
    signer = Signer.generate()
    log = AuditLog(tmp_path, signer, options=LogOptions(checkpoint_records=2))
    for rid in ("cmpl-innocent", "cmpl-other"):
        log.sync(log.append("start", {"request_id": rid}))
        log.sync(log.append("complete", {"request_id": rid, "outcome": "completed"}))
    log.close()
    keyring = Keyring([signer.private.public_key()])
    proof = prove(tmp_path, "cmpl-innocent")
    assert check_proof(proof, keyring) == []
    for field, value in (("request_id", "cmpl-other"), ("log", "w9")):
        problems = check_proof({**proof, field: value}, keyring)
        assert any("request id does not match" in p for p in problems), (field, problems)
