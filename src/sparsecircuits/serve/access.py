"""API keys with scopes, and per-key rate limits in requests and tokens per minute.

The keys file (JSON, written by :func:`create_key` / :func:`revoke_key`, mode 0600)::

    {"schema": "sparsecircuits.keys/1", "version": 1, "keys": [
      {"id": "alice", "sha256": "<64 lowercase hex>", "scope": "user",
       "requests_per_minute": 60, "tokens_per_minute": 20000,
       "created": "2025-01-01T00:00:00+00:00"}]}

Only the SHA-256 of each secret is stored: the secret (``sck-`` and 43 URL-safe characters,
256 random bits) is shown once by whoever called :func:`create_key`. A limit of ``null`` means
no limit. Scopes: ``user`` (completions, models) and ``operator`` (also telemetry, metrics,
health); an operator key may use the user routes, not the other way round.

How the server is meant to use this module (one request):

1. ``key = store.authenticate(request.headers.get("authorization"))``: None answers 401.
2. ``key.allows("operator")`` (or ``"user"``) for the route: False answers 403.
3. ``wait = limiter.acquire(key, tokens=prompt_tokens + max_tokens)``: a float answers 429 with
   ``Retry-After: ceil(wait)``; :class:`RequestTooLarge` answers 400 (no wait would help).
4. When the completion ends: ``limiter.refund(key, tokens=max_tokens - completion_tokens)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sparsecircuits.errors import CheckpointError, InputError
from sparsecircuits.fileio import atomic_write_json, read_schema_json
from sparsecircuits.model.config import format_validation_error

log = logging.getLogger("sparsecircuits.serve")

SCHEMA = "sparsecircuits.keys/1"
VERSION = 1
SECRET_PREFIX = "sck-"
MAX_SECRET_CHARS = 512  # far above a generated secret (47); longer headers are not hashed
Scope = Literal["user", "operator"]
_SCOPE_RANK = {"user": 0, "operator": 1}  # a key allows its own scope and every lower one
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ID_RULE = "1 to 64 characters from A-Z a-z 0-9 _ . -"


def hash_secret(secret: str) -> str:
    """The hex SHA-256 of ``secret`` (UTF-8), as the keys file stores it."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class ApiKey(BaseModel):
    """One key of the keys file. Limits are per minute; None means no limit."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str
    sha256: str  # hex SHA-256 of the secret; the secret itself is never stored
    scope: Scope
    requests_per_minute: int | None = Field(ge=1)
    tokens_per_minute: int | None = Field(ge=1)  # prompt + completion tokens
    created: str  # ISO 8601 time

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.fullmatch(v):
            raise ValueError(f"expected {_ID_RULE}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, v: str) -> str:
        if not _HEX64.fullmatch(v):
            raise ValueError("expected 64 lowercase hex digits (the SHA-256 of the secret)")
        return v

    @field_validator("created")
    @classmethod
    def _created(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(
                "expected an ISO 8601 time such as 2025-01-01T00:00:00+00:00"
            ) from None
        return v

    def allows(self, scope: str) -> bool:
        """Whether this key may use a route that needs ``scope`` (operator keys may also use
        user routes). An unknown ``scope`` is a programming error: ValueError."""
        if scope not in _SCOPE_RANK:
            raise ValueError(f"unknown scope '{scope}' (expected one of {list(_SCOPE_RANK)})")
        return _SCOPE_RANK[self.scope] >= _SCOPE_RANK[scope]


def _duplicate(keys: Iterable[ApiKey]) -> str | None:
    """A one-line description of the first id or hash used twice, naming the field."""
    ids: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key.id in ids:
            return f"field 'keys.{i}.id': '{key.id}' is already the id of keys.{ids[key.id]}"
        if key.sha256 in hashes:  # two ids for one secret: authenticate could not tell them apart
            return f"field 'keys.{i}.sha256': the same hash as keys.{hashes[key.sha256]}"
        ids[key.id], hashes[key.sha256] = i, i
    return None


class KeysDoc(BaseModel):
    """The whole keys file (``schema_`` is the file's ``"schema"``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_: Literal["sparsecircuits.keys/1"] = SCHEMA
    version: Literal[1] = VERSION
    keys: list[ApiKey]

    @model_validator(mode="after")
    def _unique(self) -> KeysDoc:
        problem = _duplicate(self.keys)
        if problem:
            raise ValueError(problem)
        return self


def read_keys(path: str | os.PathLike) -> KeysDoc:
    """Read and validate a keys file: anything wrong is a one-line CheckpointError naming the
    file and the field."""
    path = Path(path)
    data = read_schema_json(path, schema=SCHEMA, what="keys file")
    try:
        doc = KeysDoc.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        if first["loc"][-1:] == ("sha256",) and first["type"] != "missing":
            # Not echoed: a bad hash may be a secret pasted in its place, bound for the logs.
            field = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise CheckpointError(f"{path}: field '{field}': {msg}") from None
        message = format_validation_error(err, source=str(path))
        raise CheckpointError(message.replace("Value error, ", "")) from None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # only hashes, but a secret's hash is still the operator's business
        log.warning("keys file %s is readable by others (mode %o; expected 600)", path, mode)
    return doc


def write_keys(path: str | os.PathLike, keys: Iterable[ApiKey]) -> None:
    """Write ``keys`` to ``path`` atomically and make it readable by its owner only (0600).

    The file is replaced by a rename, so readers see the old or the new file; the mode is set
    just after the rename (fileio's atomic writes give the umask's permissions), and the file
    holds only hashes of 256-bit secrets, so that instant shows nothing a secret follows from.
    """
    path = Path(path)
    doc = KeysDoc(keys=list(keys))
    data = doc.model_dump(mode="json")
    atomic_write_json(path, {"schema": data.pop("schema_"), **data})
    os.chmod(path, 0o600)


def create_key(
    path: str | os.PathLike,
    *,
    key_id: str,
    scope: str,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
) -> str:
    """Add a key to the keys file at ``path`` (created if missing) and return its secret,
    which is stored nowhere: show it to the operator once.

    A bad argument, or an id the file already has, is a one-line InputError; a keys file that
    does not validate is a CheckpointError and is left as it was. Two processes editing one file
    at the same moment are not serialised (the last write wins): keys are added by hand.
    """
    path = Path(path)
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    try:  # the file's own validation, so a key that could not be loaded is never written
        entry = ApiKey(
            id=key_id,
            sha256=hash_secret(secret),
            scope=scope,  # type: ignore[arg-type]  # validated here
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
    except ValidationError as err:
        message = format_validation_error(err, source=f"new key {key_id!r}")
        raise InputError(message.replace("Value error, ", "")) from None
    keys = list(read_keys(path).keys) if path.exists() else []
    if any(k.id == key_id for k in keys):
        raise InputError(f"{path}: key id '{key_id}' already exists (revoke it or pick another)")
    keys.append(entry)
    write_keys(path, keys)
    log.info("keys file %s: created key '%s' (scope %s)", path, key_id, scope)
    return secret


def revoke_key(path: str | os.PathLike, *, key_id: str) -> None:
    """Remove the key ``key_id`` from the keys file (a one-line InputError if it has none).
    A running server keeps accepting it until it reloads the file."""
    path = Path(path)
    keys = list(read_keys(path).keys)
    kept = [k for k in keys if k.id != key_id]
    if len(kept) == len(keys):
        raise InputError(f"{path}: no key with id '{key_id}'")
    write_keys(path, kept)
    log.info("keys file %s: revoked key '%s'", path, key_id)


class KeyStore:
    """The keys a server accepts, looked up by the SHA-256 of the presented secret."""

    def __init__(self, keys: Iterable[ApiKey], *, source: str = "keys") -> None:
        """``source``: names the keys in messages (e.g. the file). Duplicate ids or hashes are
        a one-line InputError."""
        keys = tuple(keys)
        problem = _duplicate(keys)
        if problem:
            raise InputError(f"{source}: {problem}")
        self.source = source
        self._by_id = {k.id: k for k in keys}
        # Keyed by the digest, so a lookup's timing depends on the hash, never on the secret.
        self._by_digest = {bytes.fromhex(k.sha256): k for k in keys}

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeyStore:
        """The keys of the keys file at ``path`` (see :func:`read_keys` for its errors)."""
        return cls(read_keys(path).keys, source=str(path))

    def authenticate(self, authorization_header: str | None) -> ApiKey | None:
        """The key whose secret is in ``Authorization: Bearer <secret>``; None when the header
        is missing, malformed, or names no key of this store."""
        if not authorization_header:
            return None
        parts = authorization_header.split()
        if len(parts) != 2 or parts[0].lower() != "bearer" or len(parts[1]) > MAX_SECRET_CHARS:
            return None
        return self._by_digest.get(hashlib.sha256(parts[1].encode("utf-8")).digest())

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self._by_id.values())


class RequestTooLarge(InputError):
    """A request needs more tokens than its key's bucket holds when full: it could never be
    admitted, so :meth:`RateLimiter.acquire` raises this instead of returning a wait."""

    def __init__(self, key_id: str, *, tokens: int, capacity: int) -> None:
        super().__init__(
            f"the request needs {tokens} tokens (prompt + max_tokens); key '{key_id}' allows "
            f"at most {capacity} tokens per minute"
        )
        self.key_id, self.tokens, self.capacity = key_id, tokens, capacity


class UnknownKey(KeyError):
    """The limiter's key store has no such key (revoked by a reload, or never there)."""


_EPS = 1e-9  # float slack: a bucket refilled to exactly what is needed admits the request


@dataclass
class _Bucket:
    """``level`` of ``capacity`` (the per-minute limit), refilling at capacity/60 per second;
    ``last``: the time (seconds) of the last refill."""

    capacity: int
    level: float
    last: float

    def refill(self, now: float) -> None:
        if now > self.last:  # a clock that went back refills nothing (and never drains)
            self.level = min(self.capacity, self.level + (now - self.last) * self.capacity / 60)
            self.last = now

    def wait(self, need: float) -> float:
        """Seconds until ``need`` units are there (0: now)."""
        short = need - self.level
        return 0.0 if short <= _EPS else short * 60 / self.capacity


@dataclass
class _State:
    key: ApiKey  # the store's entry the buckets were made for
    requests: _Bucket | None
    tokens: _Bucket | None


def _resized(old: _Bucket | None, limit: int | None, now: float) -> _Bucket | None:
    """The bucket for ``limit``: a new key's starts full; a changed limit keeps the level."""
    if limit is None:
        return None
    if old is None:
        return _Bucket(capacity=limit, level=float(limit), last=now)
    old.refill(now)  # what the old rate earned so far
    return _Bucket(capacity=limit, level=min(old.level, limit), last=old.last)


class RateLimiter:
    """Token buckets per key, one for requests and one for tokens (thread-safe).

    Each bucket holds up to its per-minute limit and refills at limit/60 per second, so a key
    may burst a whole minute's allowance and then sustain the limit. Buckets exist only for
    keys of ``store`` (memory is bounded by the keys file); times are ``time.monotonic()``
    seconds unless ``now`` is given.
    """

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()  # every operation is O(1): one lock is not contended

    def reload(self, store: KeyStore) -> None:
        """Use ``store`` from now on: buckets of keys it lacks are dropped; a key whose
        limits changed keeps its levels (capped at the new limits)."""
        with self._lock:
            self._store = store
            for key_id in [i for i in self._states if store.get(i) is None]:
                del self._states[key_id]

    def _state(self, key: ApiKey, now: float) -> _State:
        stored = self._store.get(key.id)
        if stored is None or stored.sha256 != key.sha256:
            raise UnknownKey(f"key '{key.id}' is not in the key store")
        state = self._states.get(key.id)
        if state is None or state.key != stored:  # first use, or its limits were changed
            old = state if state is not None and state.key.sha256 == stored.sha256 else None
            state = _State(
                key=stored,
                requests=_resized(old and old.requests, stored.requests_per_minute, now),
                tokens=_resized(old and old.tokens, stored.tokens_per_minute, now),
            )
            self._states[key.id] = state
        return state

    def acquire(self, key: ApiKey, *, tokens: int, now: float | None = None) -> float | None:
        """Admit one request of ``tokens`` tokens (e.g. prompt + max_tokens).

        Returns None when admitted (one request and ``tokens`` tokens charged), else the
        seconds until this request could be admitted, charging nothing. Raises
        :class:`RequestTooLarge` when ``tokens`` exceeds the key's tokens per minute (no wait
        would help), :class:`UnknownKey` for a key the store does not hold.
        """
        if type(tokens) is not int or tokens < 0:
            raise ValueError(f"tokens must be an integer >= 0, got {tokens!r}")
        now = time.monotonic() if now is None else now
        with self._lock:
            state = self._state(key, now)
            if state.tokens is not None and tokens > state.tokens.capacity:
                raise RequestTooLarge(key.id, tokens=tokens, capacity=state.tokens.capacity)
            wait = 0.0
            for bucket, need in ((state.requests, 1), (state.tokens, tokens)):
                if bucket is not None:
                    bucket.refill(now)
                    wait = max(wait, bucket.wait(need))
            if wait > 0:
                return wait
            for bucket, need in ((state.requests, 1), (state.tokens, tokens)):
                if bucket is not None:
                    bucket.level -= need
            return None

    def refund(
        self, key: ApiKey, *, tokens: int, requests: int = 0, now: float | None = None
    ) -> None:
        """Give back ``tokens`` (and ``requests``) charged by :meth:`acquire` but not used,
        e.g. a request refused after admission (never past a bucket's capacity). A key no
        longer in the store has nothing to give back to."""
        for name, n in (("tokens", tokens), ("requests", requests)):
            if type(n) is not int or n < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
        now = time.monotonic() if now is None else now
        with self._lock:
            try:
                state = self._state(key, now)
            except UnknownKey:
                return
            for bucket, n in ((state.tokens, tokens), (state.requests, requests)):
                if bucket is not None and n:
                    bucket.refill(now)
                    bucket.level = min(bucket.capacity, bucket.level + n)
