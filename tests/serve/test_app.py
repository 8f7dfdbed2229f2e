"""The HTTP server through FastAPI's TestClient (no sockets): completions whole and streamed,
decisions, errors, telemetry, metrics, health, a full queue."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sparsecircuits.monitor.runtime import Action
from sparsecircuits.serve.app import create_app
from tests.serve.conftest import BLOCK, ScriptedFactory

URL = "/v1/completions"


@pytest.fixture()
def client(model, tokenizer):
    with TestClient(create_app(model, tokenizer, model_name="tiny")) as c:
        yield c


def _sse(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON chunks of a streamed completion (checks the framing and the final [DONE])."""
    r = client.post(URL, json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def _streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks)


@pytest.mark.parametrize(
    "opts", [{"seed": 3, "temperature": 0.9, "top_p": 0.95}, {"temperature": 0}]
)
def test_stream_and_whole_give_the_same_text(client, opts):
    body = {"prompt": "def add(a, b):\n", "max_tokens": 8, **opts}
    whole = client.post(URL, json=body).json()
    chunks = _sse(client, body)
    assert _streamed_text(chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert chunks[0]["choices"][0]["decision"]["action"] == "allow"  # sent in the first chunk
    assert all(c["choices"][0]["decision"] is None for c in chunks[1:])  # and not repeated
    assert whole["object"] == "text_completion" and whole["model"] == "tiny"


def test_finish_reason_length_and_usage(client):
    r = client.post(URL, json={"prompt": "x", "max_tokens": 3, "seed": 0}).json()
    assert r["choices"][0]["finish_reason"] in ("length", "stop")
    u = r["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if r["choices"][0]["finish_reason"] == "length":
        assert u["completion_tokens"] == 3


def test_finish_reason_stop_at_end_of_text(model, tokenizer):
    """A model whose bigram table sends every token to <|endoftext|>: the first sampled token
    ends the completion, and the end-of-text token is not part of the text."""
    stop = type(model)(model.config).eval()
    stop.load_state_dict(model.state_dict())
    with torch.no_grad():
        stop.bigram_table[:, tokenizer.eot_id] = 1e4
    with TestClient(create_app(stop, tokenizer)) as c:
        r = c.post(URL, json={"prompt": "x", "max_tokens": 5}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 0


_ALLOWED_KEYS = {
    "id", "object", "created", "model", "choices", "index", "text", "finish_reason",
    "decision", "action", "family", "rule", "at_token", "reason", "policy_sha256", "usage",
    "prompt_tokens", "completion_tokens", "total_tokens",
}  # fmt: skip


def _scan(obj: Any) -> None:
    """No key outside the response schema and no float anywhere (activations and logits are
    floats; nothing the end user gets is)."""
    if isinstance(obj, dict):
        assert set(obj) <= _ALLOWED_KEYS, set(obj) - _ALLOWED_KEYS
        for v in obj.values():
            _scan(v)
    elif isinstance(obj, list):
        for v in obj:
            _scan(v)
    else:
        assert not isinstance(obj, float), obj


def test_end_user_responses_carry_no_activations_or_logits(model, tokenizer):
    factory = ScriptedFactory(at=3, action=Action.DAMPEN)  # telemetry holds activations' scores
    with TestClient(create_app(model, tokenizer, factory=factory)) as c:
        body = {"prompt": "s = 'abc", "max_tokens": 5, "seed": 1}
        whole = c.post(URL, json=body).json()
        _scan(whole)
        for chunk in _sse(c, body):
            _scan(chunk)
        assert whole["choices"][0]["decision"]["action"] == "dampen"


def test_block_mid_stream(model, tokenizer):
    """Block after the 3rd token: three tokens are sent, then the chunk that carries the
    block decision with finish_reason content_filter."""
    factory = ScriptedFactory(at=5, action=Action.BLOCK)  # the prompt, tokens 1..3, then 4
    with TestClient(create_app(model, tokenizer, factory=factory)) as c:
        chunks = _sse(c, {"prompt": 'q = "', "max_tokens": 10, "temperature": 0})
        whole = c.post(URL, json={"prompt": 'q = "', "max_tokens": 10, "temperature": 0}).json()
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "content_filter"
    assert last["decision"]["action"] == "block" and last["decision"]["rule"] == "test-rule"
    assert [c["choices"][0]["decision"] is not None for c in chunks] == [True, False, False, True]
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert whole["choices"][0]["finish_reason"] == "content_filter"
    assert whole["choices"][0]["text"] == _streamed_text(chunks)


def test_dampen_applies_the_intervention_on_later_passes(model, tokenizer):
    factory = ScriptedFactory(at=2, action=Action.DAMPEN)
    with TestClient(create_app(model, tokenizer, factory=factory)) as c:
        r = c.post(URL, json={"prompt": "f(", "max_tokens": 6, "temperature": 0}).json()
    (mon,) = factory.started
    passes = len(mon.observed)
    assert r["choices"][0]["decision"]["action"] == "dampen"
    assert mon.hooks_calls == passes and mon.intervention_runs == passes - 2


def test_telemetry_route(model, tokenizer):
    factory = ScriptedFactory()
    with TestClient(create_app(model, tokenizer, factory=factory)) as c:
        r = c.post(URL, json={"prompt": "y = [", "max_tokens": 2}).json()
        rec = c.get(f"/v1/telemetry/{r['id']}")
        missing = c.get("/v1/telemetry/cmpl-nope")
    assert rec.status_code == 200
    rec = rec.json()
    assert rec["request_id"] == r["id"] and rec["telemetry"]["request_id"] == r["id"]
    assert rec["outcome"] == "completed" and rec["decision"]["action"] == "allow"
    assert rec["completion_tokens"] == r["usage"]["completion_tokens"]
    assert rec["telemetry"]["families"]["string-literal"]["passes"] == len(
        factory.started[0].observed
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["x"]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "x", "temperature": -0.5}, "temperature"),
        ({"prompt": "x", "temperature": 1e-45}, "temperature"),  # would overflow the logits
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),  # would hold a worker
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": "x " * (4 * BLOCK)}, "prompt"),
        ({"prompt": "x" * 1_000_000}, "prompt"),  # refused before tokenizing
        ({"prompt": "x", "model": "gpt-4"}, "model"),
    ],
)
def test_bad_requests_get_one_line_json_and_the_server_keeps_serving(client, body, param):
    r = client.post(URL, json=body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert param in err["message"] and "\n" not in err["message"]
    assert "Traceback" not in r.text
    ok = client.post(URL, json={"prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


def test_body_that_is_not_json_or_not_an_object(client):
    nan = b'{"prompt": "x", "temperature": NaN}'
    r = client.post(URL, content=nan, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    for content in (b"{not json", b"[1, 2]"):
        r = client.post(URL, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_models_healthz_and_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert health["monitor"]["catalog"] is None and health["block_size"] == BLOCK
    client.post(URL, json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    client.post(URL, json={"prompt": "x", "max_tokens": -2})
    text = client.get("/metrics").text
    assert 'sparsecircuits_requests_total{action="allow",finish_reason=' in text
    assert 'sparsecircuits_rejected_requests_total{reason="bad_request"} 1.0' in text
    assert "sparsecircuits_token_seconds_bucket" in text
    assert "sparsecircuits_prompt_tokens_total 1.0" in text


def test_a_span_per_request_with_ids_counts_and_decision(model, tokenizer):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with TestClient(create_app(model, tokenizer, tracer_provider=provider)) as c:
        r = c.post(URL, json={"prompt": "secret prompt", "max_tokens": 2}).json()
    (span,) = exporter.get_finished_spans()
    attrs = dict(span.attributes)
    assert span.name == "text_completion sparsecircuits"
    assert attrs["gen_ai.response.id"] == r["id"] and attrs["circuit.decision.action"] == "allow"
    assert attrs["gen_ai.usage.output_tokens"] == r["usage"]["completion_tokens"]
    assert attrs["gen_ai.usage.input_tokens"] == r["usage"]["prompt_tokens"]
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert not any("secret" in str(v) for v in attrs.values())  # content is off by default


def test_span_content_only_when_asked(model, tokenizer):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(model, tokenizer, tracer_provider=provider, capture_content=True)
    with TestClient(app) as c:
        c.post(URL, json={"prompt": "secret prompt", "max_tokens": 2}).json()
    (span,) = exporter.get_finished_spans()
    assert "secret prompt" in span.attributes["gen_ai.input.messages"]


def test_full_queue_is_refused_at_once_with_429_json(model, tokenizer):
    """One worker held busy, one request queued: the third is refused; the first two finish."""
    gate = threading.Event()
    factory = ScriptedFactory(gate=gate)
    app = create_app(model, tokenizer, factory=factory, workers=1, queue_size=1)
    server = app.state.server

    async def main() -> tuple[list[httpx.Response], httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"prompt": "x", "max_tokens": 1}
            held = [asyncio.create_task(c.post(URL, json=body)) for _ in range(2)]
            t0 = time.monotonic()
            while (server.pool.busy, server.pool.waiting) != (1, 1):
                assert time.monotonic() - t0 < 10
                await asyncio.sleep(0.01)
            refused = await c.post(URL, json=body)
            gate.set()
            return list(await asyncio.gather(*held)), refused

    try:
        done, refused = asyncio.run(main())
    finally:
        gate.set()
        server.pool.close()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "server_busy"
    assert [r.status_code for r in done] == [200, 200]


def test_two_workers_give_each_request_its_own_cache_and_generator(model, tokenizer):
    """Concurrent requests on two workers get exactly the texts they get one at a time."""
    app = create_app(model, tokenizer, workers=2, queue_size=8)
    bodies = [{"prompt": p, "max_tokens": 12, "seed": i} for i, p in enumerate(["a", "b(", "c ="])]
    bodies = bodies * 2

    async def main() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*(c.post(URL, json=b) for b in bodies))
        return [r.json()["choices"][0]["text"] for r in rs]

    try:
        together = asyncio.run(main())
    finally:
        app.state.server.pool.close()
    with TestClient(create_app(model, tokenizer)) as c:
        alone = [c.post(URL, json=b).json()["choices"][0]["text"] for b in bodies]
    assert together == alone
    assert together[:3] == together[3:]


def test_past_its_deadline_a_request_gets_504_json(model, tokenizer):
    with TestClient(create_app(model, tokenizer, timeout_s=1e-9)) as c:
        r = c.post(URL, json={"prompt": "x", "max_tokens": 2})
        s = c.post(URL, json={"prompt": "x", "max_tokens": 2, "stream": True})
        metrics = c.get("/metrics").text
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    events = [e for e in s.text.split("\n\n") if e]
    assert json.loads(events[0][len("data: ") :])["error"]["type"] == "timeout"
    assert events[-1] == "data: [DONE]"
    assert 'sparsecircuits_rejected_requests_total{reason="timeout"} 2.0' in metrics


def test_an_oversized_body_is_refused_before_it_is_read(client):
    big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    r = client.post(URL, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert client.post(URL, json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_operator_routes_need_the_operator_key_when_one_is_set(model, tokenizer):
    import hashlib

    key = "k" * 32
    app = create_app(model, tokenizer, model_name="tiny",
                     operator_key_sha256=hashlib.sha256(key.encode()).hexdigest())  # fmt: skip
    with TestClient(app) as c:
        rid = c.post(URL, json={"prompt": "x", "max_tokens": 2}).json()["id"]  # users: open
        for route in (f"/v1/telemetry/{rid}", "/metrics", "/healthz"):
            for headers in ({}, {"authorization": "Bearer wrong"}):
                r = c.get(route, headers=headers)
                assert r.status_code == 401, route
                assert r.json()["error"]["type"] == "authentication_error", route
            assert c.get(route, headers={"authorization": f"Bearer {key}"}).status_code == 200
