"""API keys, scopes, rate limits and caps through HTTP (``serve/app.py`` with
``serve/access.py``): who gets 401, 403 and 429, what a 429 says, how the token bucket is
charged and refunded, and that a key's secret reaches neither the logs nor the audit trail.

The keys file: ``limited`` (user, 3 requests per minute), ``tokens`` (user, 50 tokens per
minute), ``ops`` (operator, no limits). Each test builds its own app, so buckets start full.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from sparsecircuits.audit.signing import Keyring, Signer
from sparsecircuits.audit.verify import verify_trail
from sparsecircuits.serve.access import ApiKey, KeyStore, RateLimiter, create_key, hash_secret
from sparsecircuits.serve.app import create_app
from sparsecircuits.serve.auditing import Auditor, AuditSettings
from sparsecircuits.serve.server import Limits

URL = "/v1/completions"
RPM = 3
TPM = 50
ROUTES = [  # every route, with a request it accepts
    ("POST", URL),
    ("GET", "/v1/models"),
    ("GET", "/v1/telemetry/cmpl-0123"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
]
OPERATOR_ROUTES = [r for r in ROUTES if r[1] not in (URL, "/v1/models")]
BODY = {"prompt": "def f(x):", "max_tokens": 2, "seed": 0}


@dataclass(frozen=True)
class Keys:
    path: Path
    limited: str
    tokens: str
    ops: str

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.limited, self.tokens, self.ops)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    limited = create_key(path, key_id="limited", scope="user", requests_per_minute=RPM)
    tokens = create_key(path, key_id="tokens", scope="user", tokens_per_minute=TPM)
    ops = create_key(path, key_id="ops", scope="operator")
    return Keys(path, limited, tokens, ops)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture()
def client_for(model, tokenizer, keys) -> Iterator[Any]:
    """``client_for(**create_app options)``: a TestClient of a fresh app with the keys file
    (5xx come back as responses, so a test can say they must not happen)."""
    with ExitStack() as stack:

        def make(model_: Any = None, **options: Any) -> TestClient:
            options.setdefault("keys", KeyStore.load(keys.path))
            app = create_app(model_ or model, tokenizer, model_name="tiny", **options)
            return stack.enter_context(TestClient(app, raise_server_exceptions=False))

        yield make


def call(client: TestClient, method: str, path: str, **kw: Any) -> Any:
    if method == "POST":
        kw.setdefault("json", BODY)
    return client.request(method, path, **kw)


def error_of(r: Any, status: int, type_: str) -> dict[str, Any]:
    """``r`` is the JSON error ``status`` of type ``type_`` with a one-line message."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == type_, error
    assert error["message"] and "\n" not in error["message"]
    assert "Traceback" not in r.text
    return error


def retry_after(r: Any) -> int:
    value = r.headers.get("retry-after")
    assert value is not None and value.isdigit(), value
    assert int(value) >= 1
    return int(value)


# ---------------------------------------------------------------------------- 401 / 403
@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_a_missing_or_wrong_key_is_401_on_every_route(client_for, keys, method, path):
    c = client_for()
    wrong = [
        {},
        {"Authorization": ""},
        bearer("sck-" + "A" * 43),
        bearer(keys.ops[:-1] + ("A" if keys.ops[-1] != "A" else "B")),
        {"Authorization": keys.ops},  # no scheme
        {"Authorization": f"Basic {keys.ops}"},
        {"Authorization": f"Bearer {keys.ops} {keys.ops}"},
        bearer(hash_secret(keys.ops)),  # the stored hash is not the key
    ]
    for headers in wrong:
        error = error_of(call(c, method, path, headers=headers), 401, "authentication_error")
        assert "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize(("method", "path"), OPERATOR_ROUTES)
def test_a_user_key_on_an_operator_route_is_403(client_for, keys, method, path):
    c = client_for()
    for secret in (keys.limited, keys.tokens):
        error_of(call(c, method, path, headers=bearer(secret)), 403, "permission_error")


def test_a_user_key_cannot_probe_which_requests_exist(client_for, keys):
    """A real request id and a made-up one get the same 403: scores are no evasion oracle."""
    c = client_for()
    rid = c.post(URL, json=BODY, headers=bearer(keys.tokens)).json()["id"]
    for probe in (rid, "cmpl-made-up"):
        r = c.get(f"/v1/telemetry/{probe}", headers=bearer(keys.tokens))
        error_of(r, 403, "permission_error")
    assert c.get(f"/v1/telemetry/{rid}", headers=bearer(keys.ops)).status_code == 200


def test_the_operator_key_works_on_every_route(client_for, keys):
    c = client_for()
    h = bearer(keys.ops)
    r = c.post(URL, json=BODY, headers=h)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    rid = r.json()["id"]
    assert c.get("/v1/models", headers=h).json()["data"][0]["id"] == "tiny"
    tel = c.get(f"/v1/telemetry/{rid}", headers=h)
    assert tel.status_code == 200 and tel.json()["request_id"] == rid
    assert tel.json()["outcome"] == "completed"
    error_of(c.get("/v1/telemetry/cmpl-unknown", headers=h), 404, "not_found_error")
    m = c.get("/metrics", headers=h)
    assert m.status_code == 200 and "sparsecircuits_requests" in m.text
    assert c.get("/healthz", headers=h).json()["status"] == "ok"
    # the operator key has no limits: many more requests than the user keys may send
    for _ in range(RPM + 2):
        assert c.post(URL, json={**BODY, "max_tokens": 1}, headers=h).status_code == 200


def test_user_keys_work_on_the_user_routes(client_for, keys):
    c = client_for()
    for secret in (keys.limited, keys.tokens):
        assert c.get("/v1/models", headers=bearer(secret)).status_code == 200
    r = c.post(URL, json=BODY, headers=bearer(keys.tokens))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


# ---------------------------------------------------------------------------- requests per minute
def test_the_fourth_request_in_a_minute_is_429_with_retry_after(client_for, keys):
    c = client_for()
    h = bearer(keys.limited)
    t0 = time.monotonic()
    for i in range(RPM):
        assert c.post(URL, json=BODY, headers=h).status_code == 200, i
    r = c.post(URL, json=BODY, headers=h)
    error = error_of(r, 429, "rate_limit_error")
    wait = retry_after(r)
    # a bucket of 3 refills one request per 20 s, less what it refilled since the first
    assert math.floor(60 / RPM - (time.monotonic() - t0)) <= wait <= 60 // RPM
    assert f"retry in {wait} s" in error["message"] and "'limited'" in error["message"]
    # refused again at once, and the other keys are not affected
    error_of(c.post(URL, json=BODY, headers=h), 429, "rate_limit_error")
    assert c.post(URL, json=BODY, headers=bearer(keys.ops)).status_code == 200
    assert c.post(URL, json=BODY, headers=bearer(keys.tokens)).status_code == 200
    metrics = c.get("/metrics", headers=bearer(keys.ops)).text
    assert 'sparsecircuits_rejected_requests_total{reason="rate_limited"} 2.0' in metrics


def test_refused_requests_are_not_charged(client_for, keys):
    """A request refused before admission (bad body, unknown model, over the caps) costs no
    request of the key's allowance."""
    c = client_for()
    h = bearer(keys.limited)
    for bad in ({"prompt": ""}, {"prompt": "x", "model": "other"}, {"prompt": "x", "top_p": 0},
                {"prompt": "x", "max_tokens": 5000}, {"prompt": "x " * 500}):  # fmt: skip
        assert 400 <= c.post(URL, json=bad, headers=h).status_code < 500
    for i in range(RPM):
        assert c.post(URL, json=BODY, headers=h).status_code == 200, i


# ---------------------------------------------------------------------------- tokens per minute
def _probe_level(limiter: RateLimiter, key: ApiKey) -> float:
    """The key's token level now, read through the public API without charging anything:
    asking for the whole capacity from a bucket that is not full returns the wait, and
    ``wait = (capacity - level) * 60 / capacity``."""
    wait = limiter.acquire(key, tokens=TPM)
    assert wait is not None, "the bucket is full (nothing was charged)"
    return TPM - wait * TPM / 60


def test_a_request_over_the_whole_token_budget_is_400(client_for, keys, tokenizer):
    c = client_for()
    h = bearer(keys.tokens)
    prompt = "def f(x):"
    n = len(tokenizer.encode(prompt))
    error = error_of(c.post(URL, json={"prompt": prompt, "max_tokens": TPM - n + 1}, headers=h),
                     400, "invalid_request_error")  # fmt: skip
    assert error["param"] == "max_tokens"
    assert f"{TPM - n + 1 + n} tokens" in error["message"] and f"at most {TPM}" in error["message"]
    # never charged: exactly the whole budget still passes
    r = c.post(URL, json={"prompt": prompt, "max_tokens": TPM - n, "seed": 0}, headers=h)
    assert r.status_code == 200


def test_requests_are_admitted_until_the_token_bucket_is_drained(client_for, keys, tokenizer):
    """Each request charges prompt + max_tokens and gets back what it did not use; once the
    bucket holds less than a request needs, 429 with Retry-After."""
    c = client_for()
    h = bearer(keys.tokens)
    body = {"prompt": "def f(x):", "max_tokens": 12, "temperature": 0}
    need = len(tokenizer.encode(body["prompt"])) + body["max_tokens"]
    used, t0 = 0, time.monotonic()
    for _ in range(TPM):  # far more than can pass
        r = c.post(URL, json=body, headers=h)
        refill = (time.monotonic() - t0) * TPM / 60 + 1e-6
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        used += u["prompt_tokens"] + u["completion_tokens"]
    else:
        pytest.fail("the token bucket never ran dry")
    error_of(r, 429, "rate_limit_error")
    short = need - (TPM - used)  # tokens missing, refill aside
    assert short - refill > 0, (used, need)  # it really had no room (every earlier one had)
    # the wait is what the missing tokens take to refill at TPM/60 per second
    assert math.ceil((short - refill) * 60 / TPM) <= retry_after(r) <= math.ceil(short * 60 / TPM)


def test_unused_tokens_are_refunded_after_the_completion(client_for, keys):
    """After a completed request, the bucket holds capacity - prompt - completion tokens
    (the reservation of max_tokens was settled), read through the server's limiter."""
    c = client_for()
    limiter = c.app.state.server.limiter
    key = KeyStore.load(keys.path).get("tokens")
    t0 = time.monotonic()
    body = {"prompt": "def f(x):", "max_tokens": 20, "seed": 3}
    r = c.post(URL, json=body, headers=bearer(keys.tokens))
    assert r.status_code == 200
    u = r.json()["usage"]
    level = _probe_level(limiter, key)
    expected = TPM - u["prompt_tokens"] - u["completion_tokens"]
    assert expected - 1e-6 <= level <= expected + (time.monotonic() - t0) * TPM / 60 + 1e-6


def test_an_empty_completion_refunds_all_of_max_tokens(client_for, keys, model, tokenizer):
    """A model that always emits end-of-text: the completion has 0 tokens, so all of
    max_tokens comes back and the same request can be repeated right away."""
    stop = type(model)(model.config).eval()
    stop.load_state_dict(model.state_dict())
    with torch.no_grad():
        stop.bigram_table[:, tokenizer.eot_id] = 1e4
    c = client_for(stop)
    limiter = c.app.state.server.limiter
    key = KeyStore.load(keys.path).get("tokens")
    prompt = "def f(x):"
    n = len(tokenizer.encode(prompt))
    body = {"prompt": prompt, "max_tokens": TPM - 2 * n}  # the second fits only after a refund
    t0 = time.monotonic()
    assert 2 * (n + body["max_tokens"]) > TPM  # without the refund the second one is 429
    for _ in range(2):
        r = c.post(URL, json=body, headers=bearer(keys.tokens))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        assert r.json()["usage"]["completion_tokens"] == 0
    level = _probe_level(limiter, key)
    expected = TPM - 2 * n  # the prompts are charged, nothing of max_tokens
    assert expected - 1e-6 <= level <= expected + (time.monotonic() - t0) * TPM / 60 + 1e-6


# ---------------------------------------------------------------------------- caps
def test_caps_on_prompt_and_max_tokens(client_for, keys, tokenizer):
    c = client_for(limits=Limits(max_prompt_tokens=5, max_tokens=4))
    h = bearer(keys.ops)
    short = "def f"
    long = "def f(x): return x + 1"
    assert len(tokenizer.encode(short)) <= 5 < len(tokenizer.encode(long))
    error = error_of(c.post(URL, json={"prompt": long, "max_tokens": 1}, headers=h),
                     400, "invalid_request_error")  # fmt: skip
    assert error["param"] == "prompt" and "at most 5 prompt tokens" in error["message"]
    error = error_of(c.post(URL, json={"prompt": short, "max_tokens": 5}, headers=h),
                     400, "invalid_request_error")  # fmt: skip
    assert error["param"] == "max_tokens" and "at most 4" in error["message"]
    r = c.post(URL, json={"prompt": short, "max_tokens": 4}, headers=h)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    # a prompt far too long is refused by its length before it is tokenized
    error = error_of(c.post(URL, json={"prompt": "x" * 100_000, "max_tokens": 1}, headers=h),
                     400, "invalid_request_error")  # fmt: skip
    assert error["param"] == "prompt" and "characters" in error["message"]


# ---------------------------------------------------------------------------- secrets
def test_secrets_reach_neither_logs_nor_the_audit_trail(client_for, keys, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    signer = Signer.generate()
    trail = tmp_path / "trail"
    auditor = Auditor(AuditSettings(trail, signer, store_inputs=True), manifest={})
    c = client_for(auditor=auditor)
    ids: dict[str, str] = {}
    for name, secret in (("limited", keys.limited), ("tokens", keys.tokens), ("ops", keys.ops)):
        r = c.post(URL, json=BODY, headers=bearer(secret))
        assert r.status_code == 200
        ids[r.json()["id"]] = name
        streamed = c.post(URL, json={**BODY, "stream": True}, headers=bearer(secret))
        assert streamed.status_code == 200
        first = json.loads(streamed.text.split("\n\n")[0].removeprefix("data: "))
        ids[first["id"]] = name
    for _ in range(RPM):  # the limited key's last request, then 429s
        r = c.post(URL, json=BODY, headers=bearer(keys.limited))
        if r.status_code == 200:
            ids[r.json()["id"]] = "limited"
        else:
            assert r.status_code == 429
    assert list(ids.values()).count("limited") == RPM
    assert c.post(URL, json=BODY, headers=bearer(keys.ops[:-1])).status_code == 401
    assert c.get("/metrics", headers=bearer(keys.tokens)).status_code == 403
    assert c.get("/healthz", headers=bearer(keys.ops)).status_code == 200
    auditor.close()

    for secret in keys.secrets:
        for probe in (secret, secret[4:], secret[:-1]):  # the secret, and pieces of it
            assert probe not in caplog.text
            for rec in caplog.records:
                assert probe not in rec.getMessage()
                assert probe not in repr(rec.args)
        for path in trail.rglob("*"):
            if path.is_file():
                assert secret not in path.read_text(encoding="utf-8", errors="replace"), path
                assert hash_secret(secret) not in path.read_text(encoding="utf-8", errors="replace")

    reports = verify_trail(trail, Keyring([signer.private.public_key()]))
    assert reports and all(r.ok for r in reports), [str(d) for r in reports for d in r.damages]
    records = [json.loads(line) for seg in sorted(trail.rglob("seg-*.jsonl"))
               for line in seg.read_text(encoding="utf-8").splitlines()]  # fmt: skip
    for kind in ("start", "complete"):
        # every request admitted, and only those, has one record naming the key that sent it
        of_kind = [r for r in records if r["kind"] == kind]
        assert {r["request_id"]: r["api_key_id"] for r in of_kind} == ids
        assert len(of_kind) == len(ids)


# ---------------------------------------------------------------------------- operator key only
def test_a_lone_operator_key_guards_the_operator_routes_only(client_for, keys, tmp_path):
    secret = "sck-" + "o" * 43
    signer = Signer.generate()
    auditor = Auditor(AuditSettings(tmp_path / "trail", signer), manifest={})
    c = client_for(keys=None, operator_key_sha256=hash_secret(secret), auditor=auditor)
    # user routes are open: no key, a wrong key or a user key of some other server all pass
    for headers in ({}, bearer("sck-wrong"), bearer(keys.limited), bearer(secret)):
        r = c.post(URL, json=BODY, headers=headers)
        assert r.status_code == 200, r.text
        assert c.get("/v1/models", headers=headers).status_code == 200
    rid = r.json()["id"]
    # and unlimited: the limiter has no key to charge
    for _ in range(RPM + 2):
        assert c.post(URL, json=BODY).status_code == 200
    for method, path in OPERATOR_ROUTES:
        for headers in ({}, bearer("sck-wrong"), bearer(keys.ops)):  # the keys file is not used
            error_of(call(c, method, path, headers=headers), 401, "authentication_error")
        r = call(c, method, path.replace("cmpl-0123", rid), headers=bearer(secret))
        assert r.status_code == 200, (path, r.text)
    auditor.close()
    records = [json.loads(line) for seg in sorted((tmp_path / "trail").rglob("seg-*.jsonl"))
               for line in seg.read_text(encoding="utf-8").splitlines()]  # fmt: skip
    starts = [r for r in records if r["kind"] == "start"]
    assert starts and all(r["api_key_id"] is None for r in starts)  # open routes: no key
