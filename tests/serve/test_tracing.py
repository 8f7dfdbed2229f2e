"""Tests of serve/tracing.py: the tracer provider per exporter, and the completion span's
attributes (GenAI semantic conventions plus ``circuit.*``) on decisions and telemetry built from
the real monitor classes. Nothing is exported over the network."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sparsecircuits.errors import ConfigError
from sparsecircuits.monitor.runtime import NULL_POLICY_SHA256, Action, Decision, NullMonitor
from sparsecircuits.serve import tracing
from sparsecircuits.serve.engine import DeadlineExceeded, SamplingOptions
from sparsecircuits.serve.tracing import (
    SPAN_KIND,
    circuit_attributes,
    configure_tracing,
    content_attributes,
    error_attributes,
    request_attributes,
    response_attributes,
    span_name,
)

LOOPBACK = "http://127.0.0.1:1/v1/traces"  # nothing listens on port 1: never exported to
POLICY = "ab" * 32
PROMPT = "def secret_prompt_text(x):"
COMPLETION = " return hidden_completion_text"
BAD_ENDPOINTS = [
    "127.0.0.1:4318/v1/traces", "ftp://127.0.0.1/v1/traces", "http://", "http://h:abc/v1",
    "http://h:0/v1", "http://[::1/v1/traces", "grpc://collector:4317",
]  # fmt: skip
RESPONSE: dict[str, Any] = dict(
    response_id="cmpl-1", model="tiny-gpt", finish_reason="content_filter", input_tokens=4,
    output_tokens=3,
)  # fmt: skip


def _processors(provider: TracerProvider) -> tuple[Any, ...]:
    return provider._active_span_processor._span_processors


def _block() -> Decision:
    reason = "brackets: z > 4 on >= 3 of the last 8 tokens (z 5.10)"
    return Decision(Action.BLOCK, POLICY, "brackets", "brackets-block", 3, reason)


def _fam(z: list[float], flags: dict[str, list[int]]) -> dict[str, Any]:
    """One family's entry of ``CircuitMonitor.telemetry()`` (monitor/live.py)."""
    return {"engagement": [abs(v) / 10 for v in z], "z": z, "max_z": max(z, default=None),
            "flags": flags, "dampened": False}  # fmt: skip


def _telemetry(decision: Decision) -> dict[str, Any]:
    """The shape of ``CircuitMonitor.telemetry()``: one family that fired, one that did not,
    one not scored yet."""
    families = {
        "brackets": _fam([0.5, 5.1], {"brackets-block": [2], "brackets-log": []}),
        "string-literal": _fam([-0.3], {"quotes-review": []}),
        "indent": _fam([], {}),
    }
    return {"request_id": "cmpl-1", "n_prompt_tokens": 4, "n_generated_tokens": 3,
            "families": families, "causal_share": {}, "decision": decision.to_json()}  # fmt: skip


# ---------------------------------------------------------------------- configure_tracing
def test_none_has_no_processor_and_names_the_service() -> None:
    provider = configure_tracing(exporter="none")
    assert isinstance(provider, TracerProvider)
    assert _processors(provider) == ()
    assert provider.resource.attributes["service.name"] == "sparsecircuits"
    provider.shutdown()


def test_console_exports_synchronously() -> None:
    provider = configure_tracing(exporter="console", service_name="demo")
    (proc,) = _processors(provider)
    assert isinstance(proc, SimpleSpanProcessor)
    assert isinstance(proc.span_exporter, ConsoleSpanExporter)
    assert provider.resource.attributes["service.name"] == "demo"
    provider.shutdown()


def test_otlp_passes_endpoint_and_headers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[dict[str, Any]] = []

    class FakeExporter(InMemorySpanExporter):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__()
            made.append(kwargs)

    monkeypatch.setattr(tracing, "OTLPSpanExporter", FakeExporter)
    caplog.set_level(logging.DEBUG, logger="sparsecircuits")
    url = "https://user:pw-s3cret@127.0.0.1:1/v1/traces"
    provider = configure_tracing(exporter="otlp", endpoint=url, headers={"x-token": "tok-s3cret"})
    assert made == [{"endpoint": url, "headers": {"x-token": "tok-s3cret"}}]
    assert "127.0.0.1/v1/traces" in caplog.text and "s3cret" not in caplog.text
    (proc,) = _processors(provider)
    assert isinstance(proc, BatchSpanProcessor)
    provider.shutdown()


def test_otlp_builds_the_real_exporter_without_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    exports: list[Any] = []
    monkeypatch.setattr(OTLPSpanExporter, "export", lambda self, spans: exports.append(spans))
    provider = configure_tracing(exporter="otlp", endpoint=LOOPBACK)
    (proc,) = _processors(provider)
    exporter = proc._batch_processor._exporter
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == LOOPBACK
    t0 = time.monotonic()
    provider.shutdown()  # no span was made: nothing to flush
    assert time.monotonic() - t0 < 2.0
    assert exports == []


@pytest.mark.parametrize("endpoint", [None, ""])
def test_otlp_needs_an_endpoint(endpoint: str | None) -> None:
    with pytest.raises(ConfigError, match="needs an endpoint") as info:
        configure_tracing(exporter="otlp", endpoint=endpoint)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS)
def test_otlp_refuses_a_bad_endpoint(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="not an http\\(s\\) URL") as info:
        configure_tracing(exporter="otlp", endpoint=endpoint)
    assert "\n" not in str(info.value)


def test_unknown_exporter_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown trace exporter 'jaeger'"):
        configure_tracing(exporter="jaeger")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- attribute builders
def test_request_attributes() -> None:
    opts = SamplingOptions(max_tokens=8, temperature=0.7, top_p=0.9)
    assert request_attributes(model="tiny-gpt", options=opts) == {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.provider.name": "sparsecircuits",
        "gen_ai.request.model": "tiny-gpt",
        "gen_ai.request.max_tokens": 8,
        "gen_ai.request.temperature": 0.7,
        "gen_ai.request.top_p": 0.9,
    }
    seeded = request_attributes(model="m", options=SamplingOptions(seed=42), stream=True)
    assert seeded["gen_ai.request.seed"] == 42
    assert seeded["gen_ai.request.stream"] is True


def test_response_attributes() -> None:
    attrs = response_attributes(**RESPONSE)
    assert attrs == {
        "gen_ai.response.id": "cmpl-1",
        "gen_ai.response.model": "tiny-gpt",
        "gen_ai.response.finish_reasons": ["content_filter"],
        "gen_ai.usage.input_tokens": 4,
        "gen_ai.usage.output_tokens": 3,
    }
    ended = response_attributes(**{**RESPONSE, "finish_reason": None})
    assert ended["gen_ai.response.finish_reasons"] == ["error"]  # as the conventions ask


def test_circuit_attributes_of_a_block() -> None:
    d = _block()
    attrs = circuit_attributes(
        decision=d, telemetry=_telemetry(d), policy_version=1, catalog_sha256="cd" * 32
    )
    assert attrs == {
        "circuit.decision.action": "block",
        "circuit.decision.family": "brackets",
        "circuit.decision.rule": "brackets-block",
        "circuit.policy.sha256": POLICY,
        "circuit.policy.version": 1,
        "circuit.catalog.sha256": "cd" * 32,
        "circuit.family.brackets.score": 5.1,
        "circuit.family.brackets.flagged": True,
        "circuit.family.string-literal.score": -0.3,
        "circuit.family.string-literal.flagged": False,
        "circuit.family.indent.flagged": False,  # not scored yet: no score key
    }


def test_circuit_attributes_of_the_null_monitor() -> None:
    monitor = NullMonitor("cmpl-2")
    attrs = circuit_attributes(decision=monitor.decision, telemetry=monitor.telemetry())
    assert attrs == {
        "circuit.decision.action": "allow",
        "circuit.policy.sha256": NULL_POLICY_SHA256,
    }
    assert circuit_attributes(decision=monitor.decision) == attrs


def test_circuit_attributes_are_defensive() -> None:
    telemetry = {
        "families": {
            "nan": {"max_z": float("nan"), "flags": {"r": [1]}},
            "odd": {"max_z": "5", "flags": None},
            "flag": {"max_z": True},
            "junk": None,
        }
    }
    attrs = circuit_attributes(decision=_block(), telemetry=telemetry)
    fams = {k: v for k, v in attrs.items() if k.startswith("circuit.family.")}
    assert fams == {
        "circuit.family.nan.flagged": True,
        "circuit.family.odd.flagged": False,
        "circuit.family.flag.flagged": False,
    }
    assert "circuit.family.junk.flagged" not in attrs
    no_families = circuit_attributes(decision=_block(), telemetry={"families": []})
    assert not any(k.startswith("circuit.family.") for k in no_families)


def test_error_attributes() -> None:
    assert error_attributes("timeout") == {"error.type": "timeout"}
    assert error_attributes(RuntimeError("boom")) == {"error.type": "RuntimeError"}
    assert error_attributes(DeadlineExceeded("late")) == {
        "error.type": "sparsecircuits.serve.engine.DeadlineExceeded"
    }


def test_content_is_captured_only_when_asked() -> None:
    assert content_attributes(prompt=PROMPT, completion=COMPLETION) == {}
    assert content_attributes(prompt=PROMPT, completion=COMPLETION, capture=False) == {}
    attrs = content_attributes(prompt=PROMPT, completion=COMPLETION, capture=True)
    assert set(attrs) == {"gen_ai.input.messages", "gen_ai.output.messages"}
    assert json.loads(str(attrs["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}
    ]
    assert json.loads(str(attrs["gen_ai.output.messages"])) == [
        {"role": "assistant", "parts": [{"type": "text", "content": COMPLETION}]}
    ]


# ---------------------------------------------------------------------- recorded spans
def _record_span(*, capture: bool) -> tuple[Any, dict[str, Any]]:
    """One completion span through a provider from configure_tracing("none"), recorded in
    memory with every builder's attributes; and the attributes the builders gave."""
    provider = configure_tracing(exporter="none")
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    d = _block()
    given = {
        **request_attributes(model="tiny-gpt", options=SamplingOptions(seed=7)),
        **response_attributes(**RESPONSE),
        **circuit_attributes(decision=d, telemetry=_telemetry(d), policy_version=1),
        **content_attributes(prompt=PROMPT, completion=COMPLETION, capture=capture),
    }
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span(span_name("tiny-gpt"), kind=SPAN_KIND) as span:
        span.set_attributes(given)
    provider.shutdown()
    (finished,) = memory.get_finished_spans()
    return finished, given


def test_a_recorded_span_carries_the_attributes() -> None:
    span, given = _record_span(capture=False)
    assert span.name == span_name("tiny-gpt") == "text_completion tiny-gpt"
    assert span.kind is SPAN_KIND is SpanKind.INTERNAL
    assert span.resource.attributes["service.name"] == "sparsecircuits"
    # Every attribute kept as given (the SDK stores lists as tuples), none dropped.
    recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in span.attributes.items()}
    assert recorded == given
    assert recorded["gen_ai.response.finish_reasons"] == ["content_filter"]
    assert recorded["circuit.family.brackets.score"] == 5.1
    # Off by default: no text of the prompt or completion anywhere on the span.
    values = " ".join(str(v) for v in recorded.values())
    assert "secret_prompt_text" not in values and "hidden_completion_text" not in values


def test_a_recorded_span_carries_content_when_asked() -> None:
    a = _record_span(capture=True)[0].attributes
    assert json.loads(a["gen_ai.input.messages"])[0]["parts"][0]["content"] == PROMPT
    assert json.loads(a["gen_ai.output.messages"])[0]["parts"][0]["content"] == COMPLETION
