"""API keys and rate limits (serve/access.py): the keys file, authentication, scopes, and the
token buckets (with explicit ``now``, so no test sleeps)."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sparsecircuits.errors import CheckpointError, InputError
from sparsecircuits.serve.access import (
    SCHEMA,
    ApiKey,
    KeyStore,
    RateLimiter,
    RequestTooLarge,
    UnknownKey,
    create_key,
    hash_secret,
    read_keys,
    revoke_key,
)

CREATED = "2025-01-01T00:00:00+00:00"


def _key(key_id: str = "alice", *, scope: str = "user", rpm: int | None = None,
         tpm: int | None = None, secret: str | None = None) -> ApiKey:  # fmt: skip
    return ApiKey(
        id=key_id,
        sha256=hash_secret(secret or f"secret-of-{key_id}"),
        scope=scope,  # type: ignore[arg-type]
        requests_per_minute=rpm,
        tokens_per_minute=tpm,
        created=CREATED,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture()
def umask022():
    old = os.umask(0o022)  # so 0600 comes from the code, not from a strict umask
    yield
    os.umask(old)


# ---------------------------------------------------------------------------- the keys file
def test_create_and_revoke_round_trip(tmp_path, umask022):
    path = tmp_path / "sub" / "keys.json"
    alice = create_key(path, key_id="alice", scope="user", requests_per_minute=60)
    bob = create_key(path, key_id="bob.ops-1", scope="operator", tokens_per_minute=1000)
    assert alice.startswith("sck-") and len(alice) == 47 and alice != bob

    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA == "sparsecircuits.keys/1" and doc["version"] == 1
    assert [k["id"] for k in doc["keys"]] == ["alice", "bob.ops-1"]
    store = KeyStore.load(path)
    assert len(store) == 2 and store.source == str(path)
    a = store.authenticate(f"Bearer {alice}")
    assert a is not None and a.id == "alice" and a.scope == "user"
    assert (a.requests_per_minute, a.tokens_per_minute) == (60, None)
    b = store.authenticate(f"Bearer {bob}")
    assert b is not None and (b.scope, b.requests_per_minute, b.tokens_per_minute) == (
        "operator", None, 1000,
    )  # fmt: skip

    revoke_key(path, key_id="alice")
    store = KeyStore.load(path)
    assert [k.id for k in store] == ["bob.ops-1"]
    assert store.authenticate(f"Bearer {alice}") is None
    assert store.authenticate(f"Bearer {bob}") is not None
    assert _mode(path) == 0o600


def test_keys_file_is_owner_only_and_never_holds_the_secret(tmp_path, umask022):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"schema": SCHEMA, "version": 1, "keys": []}))
    os.chmod(path, 0o644)  # an existing readable file is tightened by the next write
    secret = create_key(path, key_id="alice", scope="user")
    assert _mode(path) == 0o600
    text = path.read_text()
    assert secret not in text and secret.removeprefix("sck-") not in text
    assert hash_secret(secret) in text
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temp file left behind


def test_create_refuses_an_existing_id_and_leaves_the_file(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, key_id="alice", scope="user")
    before = path.read_bytes()
    with pytest.raises(InputError, match="key id 'alice' already exists") as err:
        create_key(path, key_id="alice", scope="operator")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"key_id": "a b"}, "'id'"),
        ({"key_id": "x" * 65}, "'id'"),
        ({"key_id": ""}, "'id'"),
        ({"scope": "admin"}, "'scope'"),
        ({"requests_per_minute": 0}, "'requests_per_minute'"),
        ({"tokens_per_minute": 2.5}, "'tokens_per_minute'"),
        ({"tokens_per_minute": True}, "'tokens_per_minute'"),
    ],
)
def test_create_refuses_bad_arguments(tmp_path, kw, field):
    path = tmp_path / "keys.json"
    with pytest.raises(InputError, match=field) as err:
        create_key(path, **{"key_id": "alice", "scope": "user", **kw})
    assert "\n" not in str(err.value)
    assert not path.exists()


def test_create_and_revoke_leave_an_invalid_file_alone(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"schema": SCHEMA, "keys": [{"id": "x"}]}))
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=re.escape("missing required field 'keys.0.sha256'")):
        create_key(path, key_id="alice", scope="user")
    with pytest.raises(CheckpointError):
        revoke_key(path, key_id="x")
    assert path.read_bytes() == before


def test_revoke_an_unknown_id(tmp_path):
    path = tmp_path / "keys.json"
    create_key(path, key_id="alice", scope="user")
    with pytest.raises(InputError, match="no key with id 'bob'") as err:
        revoke_key(path, key_id="bob")
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="no such keys file"):
        revoke_key(tmp_path / "missing.json", key_id="alice")


def _entry(**kw: Any) -> dict[str, Any]:
    return {**_key().model_dump(), **kw}


def _doc(*keys: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "version": 1, "keys": list(keys), **top}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_doc(_entry(scope="admin")), "field 'keys.0.scope': Input should be 'user' or 'operator'"),
        (_doc(_entry(), _entry(sha256="a" * 64)), "field 'keys.1.id': 'alice' is already"),
        (_doc(_entry(), _entry(id="bob")), "field 'keys.1.sha256': the same hash as keys.0"),
        (_doc(_entry(sha256="xyz")), "field 'keys.0.sha256': expected 64 lowercase hex"),
        (_doc(_entry(sha256="A" * 64)), "field 'keys.0.sha256': expected 64 lowercase hex"),
        (_doc(_entry(sha256="a" * 63)), "field 'keys.0.sha256': expected 64 lowercase hex"),
        (_doc(_entry(secret="s")), "unknown field 'keys.0.secret'"),
        (_doc(_entry(), owner="me"), "unknown field 'owner'"),
        (_doc(_entry(id="a/b")), "field 'keys.0.id': expected 1 to 64 characters"),
        (_doc(_entry(requests_per_minute=0)), "field 'keys.0.requests_per_minute'"),
        (_doc(_entry(requests_per_minute="5")), "field 'keys.0.requests_per_minute'"),
        (_doc(_entry(tokens_per_minute=True)), "field 'keys.0.tokens_per_minute'"),
        (_doc(_entry(tokens_per_minute=1.0)), "field 'keys.0.tokens_per_minute'"),
        (_doc(_entry(created="yesterday")), "field 'keys.0.created': expected an ISO 8601"),
        (_doc({k: v for k, v in _entry().items() if k != "scope"}), "missing required field"),
        (_doc(_entry(), version=2), "field 'version'"),
        ({**_doc(_entry()), "keys": {}}, "field 'keys'"),
        ({**_doc(_entry()), "schema": "sparsecircuits.keys/2"}, 'expected "schema": "sparse'),
        ({"version": 1, "keys": []}, 'not a keys file (expected "schema"'),
        ("{", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"schema": "sparsecircuits.keys/1", "keys": [], "keys": []}', "'keys' appears twice"),
    ],
)
def test_load_errors_are_one_line_naming_file_and_field(tmp_path, content, expected):
    path = tmp_path / "keys.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CheckpointError) as err:
        KeyStore.load(path)
    message = str(err.value)
    assert expected in message and message.startswith(f"{path}: ") and "\n" not in message


def test_load_of_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such keys file"):
        KeyStore.load(tmp_path / "keys.json")


def test_a_secret_pasted_as_the_hash_is_not_echoed(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(_doc(_entry(sha256="sck-supersecretvalue"))))
    with pytest.raises(CheckpointError, match=re.escape("keys.0.sha256")) as err:
        read_keys(path)
    assert "supersecret" not in str(err.value)


def test_a_readable_keys_file_is_warned_about(tmp_path, caplog):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(_doc(_entry())))
    os.chmod(path, 0o644)
    with caplog.at_level("WARNING", logger="sparsecircuits.serve"):
        read_keys(path)
    assert "readable by others" in caplog.text


def test_store_from_entries_refuses_duplicates():
    with pytest.raises(InputError, match=re.escape("test keys: field 'keys.1.id'")):
        KeyStore([_key("a"), _key("a", secret="other")], source="test keys")
    with pytest.raises(InputError, match=re.escape("field 'keys.1.sha256'")):
        KeyStore([_key("a", secret="s"), _key("b", secret="s")])


# ---------------------------------------------------------------------------- authentication
def test_authenticate_accepts_the_right_secret_only():
    alice, bob = _key("alice", secret="sck-alice"), _key("bob", secret="sck-bob")
    store = KeyStore([alice, bob])
    assert store.authenticate("Bearer sck-alice") == alice
    assert store.authenticate("Bearer sck-bob") == bob
    assert store.authenticate("bearer  sck-bob ") == bob  # the scheme is case-insensitive
    for header in [
        None, "", "   ", "Bearer", "Bearer ", "sck-alice", "Basic sck-alice",
        "Bearer sck-alice extra", "Bearer sck-alicE", "Bearer sck-alic", "Bearer sck-alice\x00",
        f"Bearer {hash_secret('sck-alice')}",  # the stored hash is not a credential
        "Bearer " + "x" * 100_000,
    ]:  # fmt: skip
        assert store.authenticate(header) is None, header


def test_scopes():
    user, operator = _key("u", scope="user"), _key("o", scope="operator")
    assert user.allows("user") and not user.allows("operator")
    assert operator.allows("user") and operator.allows("operator")
    with pytest.raises(ValueError, match="unknown scope 'admin'"):
        user.allows("admin")


# ---------------------------------------------------------------------------- rate limits
def _limiter(*keys: ApiKey) -> RateLimiter:
    return RateLimiter(KeyStore(keys))


def test_requests_admitted_up_to_the_limit_then_a_correct_retry_after():
    key = _key(rpm=60)  # refills 1 request per second
    lim = _limiter(key)
    assert all(lim.acquire(key, tokens=0, now=100.0) is None for _ in range(60))
    assert lim.acquire(key, tokens=0, now=100.0) == pytest.approx(1.0, abs=1e-6)
    assert lim.acquire(key, tokens=0, now=100.25) == pytest.approx(0.75, abs=1e-6)
    assert lim.acquire(key, tokens=0, now=101.0) is None  # exactly the retry-after later
    assert lim.acquire(key, tokens=0, now=101.0) == pytest.approx(1.0, abs=1e-6)


def test_buckets_refill_over_time_up_to_capacity():
    key = _key(rpm=6)  # one request per 10 s
    lim = _limiter(key)
    for _ in range(6):
        assert lim.acquire(key, tokens=0, now=0.0) is None
    assert lim.acquire(key, tokens=0, now=30.0) is None  # 3 refilled by t=30
    assert lim.acquire(key, tokens=0, now=30.0) is None
    assert lim.acquire(key, tokens=0, now=30.0) is None
    assert lim.acquire(key, tokens=0, now=30.0) == pytest.approx(10.0)
    admitted = sum(lim.acquire(key, tokens=0, now=1e6) is None for _ in range(10))
    assert admitted == 6  # an idle hour refills to capacity, no further


def test_tokens_limit_and_a_refusal_charges_nothing():
    key = _key(rpm=2, tpm=600)  # 10 tokens per second
    lim = _limiter(key)
    assert lim.acquire(key, tokens=500, now=0.0) is None
    assert lim.acquire(key, tokens=300, now=0.0) == pytest.approx(20.0)  # 200 short at 10/s
    assert lim.acquire(key, tokens=300, now=5.0) == pytest.approx(15.0)
    # Neither refusal charged the request bucket: one request is left of two.
    assert lim.acquire(key, tokens=100, now=5.0) is None
    assert lim.acquire(key, tokens=0, now=5.0) == pytest.approx(30.0 - 5.0)  # requests: 2/min
    # Both buckets short: the longer wait is the answer.
    assert lim.acquire(key, tokens=600, now=5.0) == pytest.approx(55.0)


def test_a_request_over_the_tokens_capacity_is_refused_outright():
    key = _key(rpm=10, tpm=100)
    lim = _limiter(key)
    with pytest.raises(RequestTooLarge, match=r"needs 101 tokens.*at most 100 tokens") as err:
        lim.acquire(key, tokens=101, now=0.0)
    assert (err.value.tokens, err.value.capacity, err.value.key_id) == (101, 100, "alice")
    assert isinstance(err.value, InputError)
    assert lim.acquire(key, tokens=100, now=0.0) is None  # nothing was charged


def test_refund_gives_back_unused_tokens_but_never_past_capacity():
    key = _key(tpm=600)
    lim = _limiter(key)
    assert lim.acquire(key, tokens=600, now=0.0) is None
    lim.refund(key, tokens=200, now=0.0)
    assert lim.acquire(key, tokens=200, now=0.0) is None
    assert lim.acquire(key, tokens=1, now=0.0) is not None
    lim.refund(key, tokens=10_000, now=0.0)
    assert lim.acquire(key, tokens=600, now=0.0) is None  # refilled to capacity, not 10,000
    assert lim.acquire(key, tokens=1, now=0.0) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lim.refund(key, tokens=-1)


def test_unlimited_keys_unknown_keys_and_bad_token_counts():
    free = _key("free")
    lim = _limiter(free)
    assert all(lim.acquire(free, tokens=10**9) is None for _ in range(1000))
    lim.refund(free, tokens=5)  # no bucket: nothing to do
    with pytest.raises(UnknownKey):
        lim.acquire(_key("stranger"), tokens=1)
    with pytest.raises(UnknownKey):  # same id, another secret: not the store's key
        lim.acquire(_key("free", secret="other"), tokens=1)
    lim.refund(_key("stranger"), tokens=1)  # a key revoked mid-request: nothing to give back
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            lim.acquire(free, tokens=bad)  # type: ignore[arg-type]


def test_reload_drops_revoked_keys_and_keeps_levels_of_changed_limits():
    alice, bob = _key("alice", rpm=10), _key("bob", rpm=10)
    lim = _limiter(alice, bob)
    for _ in range(10):
        assert lim.acquire(alice, tokens=0, now=0.0) is None
    assert lim.acquire(bob, tokens=0, now=0.0) is None
    faster = alice.model_copy(update={"requests_per_minute": 60})
    lim.reload(KeyStore([faster]))
    assert set(lim._states) == {"alice"}  # bob's buckets are gone with bob
    with pytest.raises(UnknownKey):
        lim.acquire(bob, tokens=0, now=0.0)
    # The drained bucket stays drained, but refills at the new rate (1 per second).
    assert lim.acquire(faster, tokens=0, now=0.0) == pytest.approx(1.0)
    assert lim.acquire(faster, tokens=0, now=1.0) is None


def test_a_clock_going_back_refills_nothing():
    key = _key(rpm=60)
    lim = _limiter(key)
    for _ in range(60):
        lim.acquire(key, tokens=0, now=10.0)
    assert lim.acquire(key, tokens=0, now=5.0) == pytest.approx(1.0)
    assert lim.acquire(key, tokens=0, now=11.0) is None


@pytest.mark.parametrize("clock", ["fixed", "monotonic"])
def test_concurrent_acquires_never_admit_more_than_the_limit(clock):
    key = _key(rpm=200, tpm=1000)
    lim = _limiter(key)
    threads, per_thread = 16, 50
    start = threading.Barrier(threads)
    admitted: list[int] = []

    def run() -> None:
        start.wait()
        n = 0
        for _ in range(per_thread):
            now = 0.0 if clock == "fixed" else None
            n += lim.acquire(key, tokens=7, now=now) is None
        admitted.append(n)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    elapsed = time.monotonic() - t0
    total = sum(admitted)
    assert len(admitted) == threads
    if clock == "fixed":
        assert total == 1000 // 7  # the tokens bucket runs out first: 142 of 800 tries
    else:  # at most what the bucket held plus what it refilled while the threads ran
        assert 1000 // 7 <= total <= (1000 + elapsed * 1000 / 60) / 7
