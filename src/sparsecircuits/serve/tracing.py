"""OpenTelemetry for the model server: a tracer provider, and the attributes of one completion
span per the OpenTelemetry GenAI semantic conventions plus our own ``circuit.*`` attributes.

One span per request, named :func:`span_name` (``"text_completion {model}"``) and of kind
:data:`SPAN_KIND`. Its attributes come from pure functions, so the server sets them in one
call each (``span.set_attributes(...)``) and tests check them without a server:

- :func:`request_attributes`: operation, provider, model and sampling options (at the start);
- :func:`response_attributes`: response id and model, finish reasons, token usage (at the end);
- :func:`circuit_attributes`: the policy's decision and per-family scores and flags;
- :func:`error_attributes`: ``error.type`` when the request failed;
- :func:`content_attributes`: the prompt and completion text, only when the operator opted in.

Attribute names are the constants of ``opentelemetry-semantic-conventions`` (their docstrings
say the GenAI names moved to the semantic-conventions-genai repository; the names themselves
are unchanged). ``gen_ai.provider.name`` replaces the deprecated ``gen_ai.system``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME
from opentelemetry.trace import SpanKind

from sparsecircuits.errors import ConfigError

if TYPE_CHECKING:
    from sparsecircuits.monitor.runtime import Decision
    from sparsecircuits.serve.engine import SamplingOptions

log = logging.getLogger("sparsecircuits.serve.tracing")

AttributeValue = str | int | float | bool | list[str]
Attributes = dict[str, AttributeValue]

PROVIDER = "sparsecircuits"  # gen_ai.provider.name: no registered provider serves our models
OPERATION = gen_ai.GenAiOperationNameValues.TEXT_COMPLETION.value  # OpenAI's legacy completions
# The GenAI conventions define only a *client* inference span: CLIENT when the model runs in
# another process, INTERNAL "on spans representing call to models running in the same
# process". Our span wraps generation in this process (a worker thread), so INTERNAL. SERVER
# belongs to the span of the incoming HTTP request (ASGI instrumentation, one per remote call);
# a second SERVER span per request would double-count requests in trace backends.
SPAN_KIND = SpanKind.INTERNAL

Exporter = Literal["none", "console", "otlp"]


def configure_tracing(
    *,
    exporter: Exporter,
    endpoint: str | None = None,
    service_name: str = "sparsecircuits",
    headers: dict[str, str] | None = None,
) -> TracerProvider:
    """A tracer provider whose resource names ``service_name``, exporting spans by ``exporter``:

    - ``"none"``: no processor (spans are recorded by whatever processors the caller adds,
      e.g. the tests' in-memory exporter, else dropped);
    - ``"console"``: each span printed to stdout as it ends (synchronous; for demos);
    - ``"otlp"``: batched to an OTLP/HTTP collector at ``endpoint``, the full signal URL
      (e.g. ``http://127.0.0.1:4318/v1/traces``), with ``headers`` on every export (e.g. an
      auth token; never logged). Exports run on a background thread every 5 s or 512 spans.

    The global provider is left alone: pass the result to the app (``tracer_provider=``).
    Call ``provider.shutdown()`` once, when the server stops (after its workers): it exports
    the spans still queued and stops the export thread, waiting at most 30 s (each export
    request gives up after 10 s, e.g. with the collector down). Spans still queued at exit
    without it are lost; ``provider.force_flush()`` exports them without stopping.

    Raises ConfigError (a ValueError, one line) for an unknown exporter, or an ``otlp``
    exporter without an http(s) endpoint.
    """
    resource = Resource.create({SERVICE_NAME: service_name})
    if exporter == "otlp":
        url = _check_endpoint(endpoint)
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=url, headers=headers))
        )
        parts = urlsplit(url)  # host and path only: a userinfo part may hold credentials
        log.info("tracing: OTLP/HTTP to %s://%s%s", parts.scheme, parts.hostname, parts.path)
        return provider
    if exporter not in ("none", "console"):
        raise ConfigError(f"unknown trace exporter {exporter!r} (expected none, console or otlp)")
    if endpoint is not None or headers:
        log.warning("tracing: endpoint and headers are only used by the otlp exporter; ignored")
    provider = TracerProvider(resource=resource)
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    log.info("tracing: exporter %s", exporter)
    return provider


def _check_endpoint(endpoint: str | None) -> str:
    if not endpoint:
        raise ConfigError(
            "the otlp trace exporter needs an endpoint, e.g. http://127.0.0.1:4318/v1/traces"
        )
    try:
        parts = urlsplit(endpoint)
        # .port raises on a non-number or one out of range; port 0 cannot be dialled
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # e.g. an unclosed IPv6 bracket
        ok = False
    if not ok:
        raise ConfigError(
            f"trace endpoint {endpoint!r} is not an http(s) URL, "
            "e.g. http://127.0.0.1:4318/v1/traces"
        )
    return endpoint


def span_name(model: str) -> str:
    """The completion span's name: ``{gen_ai.operation.name} {gen_ai.request.model}``."""
    return f"{OPERATION} {model}"


def request_attributes(*, model: str, options: SamplingOptions, stream: bool = False) -> Attributes:
    """What was asked: operation, provider, model, ``max_tokens`` (tokens), temperature,
    ``top_p`` (probability mass), ``seed`` when the client gave one, and ``stream`` when true
    (the conventions set it only for streaming requests)."""
    attrs: Attributes = {
        gen_ai.GEN_AI_OPERATION_NAME: OPERATION,
        gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
        gen_ai.GEN_AI_REQUEST_MODEL: model,
        gen_ai.GEN_AI_REQUEST_MAX_TOKENS: int(options.max_tokens),
        gen_ai.GEN_AI_REQUEST_TEMPERATURE: float(options.temperature),
        gen_ai.GEN_AI_REQUEST_TOP_P: float(options.top_p),
    }
    if options.seed is not None:  # a drawn seed is not the client's: not recorded
        attrs[gen_ai.GEN_AI_REQUEST_SEED] = int(options.seed)
    if stream:
        attrs[gen_ai.GEN_AI_REQUEST_STREAM] = True
    return attrs


def response_attributes(
    *,
    response_id: str,
    model: str,
    finish_reason: str | None,
    input_tokens: int,
    output_tokens: int,
) -> Attributes:
    """What came back: the response id (``cmpl-...``), the model, the finish reason (``stop``,
    ``length``, ``content_filter``; None for a request that ended without one, recorded as
    ``error`` as the conventions ask), and usage: prompt tokens and tokens sent."""
    return {
        gen_ai.GEN_AI_RESPONSE_ID: response_id,
        gen_ai.GEN_AI_RESPONSE_MODEL: model,
        gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: [finish_reason or "error"],
        gen_ai.GEN_AI_USAGE_INPUT_TOKENS: int(input_tokens),
        gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: int(output_tokens),
    }


def circuit_attributes(
    *,
    decision: Decision,
    telemetry: Mapping[str, Any] | None = None,
    policy_version: int | str | None = None,
    catalog_sha256: str | None = None,
) -> Attributes:
    """The monitor's verdict: ``circuit.decision.action`` (allow .. block), ``.family`` and
    ``.rule`` (absent for allow), ``circuit.policy.sha256``, ``circuit.policy.version`` and
    ``circuit.catalog.sha256`` when known; and per monitored family of ``telemetry`` (the dict
    of ``monitor.telemetry()``) ``circuit.family.<name>.score``, its largest robust z over the
    request (unitless; absent while no token was scored), and ``circuit.family.<name>.flagged``,
    whether any of its rules fired. Family names are the catalogue's, a bounded set."""
    attrs: Attributes = {
        "circuit.decision.action": decision.action.value,
        "circuit.policy.sha256": decision.policy_sha256,
    }
    if decision.family is not None:
        attrs["circuit.decision.family"] = decision.family
    if decision.rule is not None:
        attrs["circuit.decision.rule"] = decision.rule
    attrs.update(_bridge_attributes("circuit.decision.bridge", getattr(decision, "bridge", None)))
    if policy_version is not None:
        attrs["circuit.policy.version"] = policy_version
    if catalog_sha256 is not None:
        attrs["circuit.catalog.sha256"] = catalog_sha256
    families = (telemetry or {}).get("families")
    if not isinstance(families, Mapping):  # a monitor without families (NullMonitor: {})
        return attrs
    for name, fam in families.items():
        if not isinstance(fam, Mapping):
            continue
        score = fam.get("max_z")
        # max_z is None before the first scored token; NaN/inf would only mislead dashboards.
        if isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score):
            attrs[f"circuit.family.{name}.score"] = float(score)
        flags = fam.get("flags")  # rule name -> tokens at which it fired
        fired = isinstance(flags, Mapping) and any(bool(at) for at in flags.values())
        attrs[f"circuit.family.{name}.flagged"] = fired
        attrs.update(_bridge_attributes(f"circuit.family.{name}.bridge", fam.get("bridge")))
    mode = (telemetry or {}).get("monitoring")
    if isinstance(mode, Mapping) and isinstance(mode.get("mode"), str):
        attrs["circuit.monitoring.mode"] = mode["mode"]
    return attrs


def _bridge_attributes(prefix: str, evidence: Any) -> Attributes:
    """A bridged score's site and fidelity (no bridge-derived score or flag leaves without
    them): ``{prefix}.site`` and ``{prefix}.{enc_nmse,dec_nmse,kl_d2s,agree_d2s}``."""
    if not isinstance(evidence, Mapping):
        return {}
    out: dict[str, Any] = {}
    for key, value in evidence.items():
        if isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool)
                                      and math.isfinite(value)):  # fmt: skip
            out[f"{prefix}.{key}"] = value
    return out


def error_attributes(error: BaseException | str) -> Attributes:
    """``error.type``: a low-cardinality name for how the request failed. The server reports
    ``"timeout"`` and ``"cancelled"`` as strings; an exception is named by its class (module
    included, except for builtins, e.g. ``RuntimeError``). Set the span's status to ERROR too."""
    if isinstance(error, str):
        return {ERROR_TYPE: error}
    cls = type(error)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return {ERROR_TYPE: name}


def content_attributes(*, prompt: str, completion: str, capture: bool = False) -> Attributes:
    """The prompt and completion text as ``gen_ai.input.messages`` and
    ``gen_ai.output.messages`` (JSON strings in the conventions' message schema: span
    attributes cannot hold structures), or {} unless ``capture``. Opt-in only: the text may
    hold users' personal data, and spans leave the operator's control once exported."""
    if not capture:
        return {}
    inputs = [{"role": "user", "parts": [{"type": "text", "content": prompt}]}]
    # No finish_reason in the message: the current schema deprecates it in favour of
    # gen_ai.response.finish_reasons (see response_attributes).
    outputs = [{"role": "assistant", "parts": [{"type": "text", "content": completion}]}]
    return {
        gen_ai.GEN_AI_INPUT_MESSAGES: json.dumps(inputs, ensure_ascii=False),
        gen_ai.GEN_AI_OUTPUT_MESSAGES: json.dumps(outputs, ensure_ascii=False),
    }
