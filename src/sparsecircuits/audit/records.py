"""The byte form of audit records and checkpoints: canonical JSON, signed, hash-chained.

A record is one line of canonical JSON (keys sorted, no spaces, ASCII, so every verifier
re-derives the same bytes). Besides its own fields it carries ``v`` (format version), ``log``
(the log's id), ``seq`` (its index in that log, from 0), ``prev`` (the hash of the record
before it; 64 zeros for the first), ``time``, ``kind``, ``key_id`` and ``sig``: the Ed25519
signature over the canonical JSON of every other field. The record's hash is the RFC 6962 leaf
hash of its line (without the newline): the chain and the Merkle tree use the same value.

Non-finite floats (a z-score against a zero spread) are written as the strings "NaN",
"Infinity" and "-Infinity", since JSON has no such numbers.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from sparsecircuits.audit.merkle import leaf_hash
from sparsecircuits.audit.signing import Keyring, Signer

RECORD_VERSION = 1
GENESIS = "0" * 64  # ``prev`` of a log's first record
CHECKPOINT_SCHEMA = "sparsecircuits.audit.checkpoint/1"
RETENTION_SCHEMA = "sparsecircuits.audit.retention/1"
SIGNATURE_FIELDS = ("sig",)  # what the signature does not cover

# Record kinds. ``start``: a request was accepted; ``complete``: it ended (any outcome);
# ``open``: a server process began writing (its configuration); ``recovery``: a torn tail
# was quarantined on start.
KINDS = ("open", "start", "complete", "recovery")


def now_iso() -> str:
    """UTC time with microseconds, e.g. 2026-12-07T19:54:19.123456Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def canonical(obj: Any) -> bytes:
    """The one byte form of ``obj`` that signatures and hashes cover."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError:  # a NaN or infinity somewhere: spell it (rare, so checked lazily)
        text = json.dumps(_finite(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii")


def seal(body: dict[str, Any], signer: Signer) -> bytes:
    """``body`` (without ``key_id``/``sig``) signed: the canonical line, no newline."""
    signed = {**body, "key_id": signer.key_id}
    return canonical({**signed, "sig": signer.sign(canonical(signed))})


def signature_ok(doc: dict[str, Any], keyring: Keyring) -> bool:
    """Whether ``doc``'s ``sig`` is a valid signature, by the key it names, over the rest."""
    sig, kid = doc.get("sig"), doc.get("key_id")
    if not isinstance(sig, str) or not isinstance(kid, str):
        return False
    body = {k: v for k, v in doc.items() if k not in SIGNATURE_FIELDS}
    return keyring.verify(key_id=kid, data=canonical(body), signature=sig)


def record_hash(line: bytes) -> bytes:
    """The hash that chains a record and is its Merkle leaf (``line`` without newline)."""
    return leaf_hash(line)


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A record line's fields, or None if it is not a JSON object with the chain fields."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # hostile nesting included
        return None
    if not isinstance(doc, dict):
        return None
    if not isinstance(doc.get("seq"), int) or not isinstance(doc.get("prev"), str):
        return None
    return doc


REQUIRED = ("v", "log", "seq", "prev", "time", "kind", "key_id", "sig")


def has_record_fields(doc: dict[str, Any]) -> bool:
    """Whether ``doc`` has every field a record must have."""
    return all(k in doc for k in REQUIRED)
