"""``audit prove``: an inclusion proof of one request's record that verifies against a signed
checkpoint alone, and ``audit check-proof``, which verifies one with nothing but public keys.

A proof file holds the record's line, its index, the audit path (RFC 9162 §2.1.3) and the
signed checkpoint whose tree head it leads to: anyone holding the public key can check that
the record is in the log the checkpoint commits to, without the log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsecircuits.audit import layout
from sparsecircuits.audit.merkle import (
    from_hex_list,
    hex_list,
    inclusion_proof,
    leaf_hash,
    verify_inclusion,
)
from sparsecircuits.audit.records import CHECKPOINT_SCHEMA, parse_line, record_hash, signature_ok
from sparsecircuits.audit.signing import Keyring
from sparsecircuits.errors import InputError

PROOF_SCHEMA = "sparsecircuits.audit.proof/1"


def find_records(trail: Path, request_id: str) -> list[tuple[Path, dict[str, Any], bytes]]:
    """Every record naming ``request_id``: (log dir, fields, line), in log order."""
    found = []
    needle = json.dumps(request_id)[1:-1].encode()  # as it appears in a canonical line
    for log_dir in layout.logs(trail):
        for _, seg in layout.segments(log_dir):
            for line in seg.read_bytes().split(b"\n"):
                if needle in line:
                    doc = parse_line(line)
                    if doc is not None and doc.get("request_id") == request_id:
                        found.append((log_dir, doc, line))
    return found


def prove(trail: Path, request_id: str) -> dict[str, Any]:
    """The proof of ``request_id``'s completion record (else its start record) against the
    latest checkpoint that covers it."""
    found = find_records(trail, request_id)
    if not found:
        raise InputError(f"{trail}: no record of request {request_id!r}")
    done = [f for f in found if f[1].get("kind") == "complete"]
    log_dir, doc, line = (done or found)[-1]
    seq = doc["seq"]
    cps = [(size, p) for size, p in layout.checkpoints(log_dir) if size > seq]
    if not cps:
        raise InputError(
            f"record {seq} of log {log_dir.name} is not covered by a checkpoint yet (the server "
            "writes one every few seconds; try again)"
        )
    size, cp_path = cps[-1]
    checkpoint = json.loads(cp_path.read_bytes())
    leaves = _leaves(log_dir, size)
    return {
        "schema": PROOF_SCHEMA,
        "log": log_dir.name,
        "request_id": request_id,
        "index": seq,
        "record": line.decode("ascii"),
        "proof": hex_list(inclusion_proof(leaves, seq, size=size)),
        "checkpoint": checkpoint,
    }


def _leaves(log_dir: Path, size: int) -> list[bytes]:
    if (log_dir / layout.RETENTION_FILE).exists():
        raise InputError(
            f"log {log_dir.name}: retention deleted its oldest records, and a proof needs every "
            "record from the first (its kept checkpoints still verify the rest)"
        )
    leaves: list[bytes] = []
    for _, seg in layout.segments(log_dir):
        for line in seg.read_bytes().split(b"\n"):
            if line and len(leaves) < size:
                leaves.append(record_hash(line))
    if len(leaves) < size:
        raise InputError(f"log {log_dir.name} has {len(leaves)} records, its checkpoint {size}")
    return leaves


def check_proof(proof: dict[str, Any], keyring: Keyring) -> list[str]:
    """What is wrong with ``proof`` (empty: it holds): the checkpoint's signature, the
    record's signature, and the audit path from the record to the checkpoint's root."""
    problems = []
    if proof.get("schema") != PROOF_SCHEMA:
        return [f'not a proof (expected "schema": "{PROOF_SCHEMA}")']
    cp = proof.get("checkpoint")
    index = proof.get("index")
    if not isinstance(cp, dict):
        return ["the proof holds no checkpoint object"]
    if not isinstance(index, int) or isinstance(index, bool):
        return ["the proof's index is not an integer"]
    if cp.get("schema") != CHECKPOINT_SCHEMA or not signature_ok(cp, keyring):
        problems.append("the checkpoint's signature is not by a trusted key")
    line = str(proof.get("record", "")).encode("ascii", "replace")
    doc = parse_line(line)
    if doc is None or not signature_ok(doc, keyring):
        problems.append("the record's signature is not by a trusted key")
    elif (doc.get("seq"), doc.get("log"), doc.get("request_id")) != (
        index,
        cp.get("log"),
        proof.get("request_id"),
    ) or proof.get("log") != cp.get("log"):
        problems.append("the record's seq, log or request id does not match the proof's")
    try:
        path = from_hex_list(proof.get("proof"), field="proof")
        root = bytes.fromhex(str(cp.get("root", "")))
    except ValueError as err:
        return [*problems, str(err)]
    ok = verify_inclusion(leaf=leaf_hash(line), index=index, size=cp.get("size"),
                          proof=path, root=root)  # fmt: skip
    if not ok:
        problems.append("the audit path does not lead to the checkpoint's tree head")
    return problems
