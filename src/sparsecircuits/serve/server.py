"""The state the routes share and the two halves of a request: the handler side (check,
queue, wait for chunks, shape them as OpenAI's responses or server-sent events) and the worker
side (run the generation loop, time it, store its telemetry, count it, trace it).

Logs and spans carry ids, lengths and the decision, never the prompt or completion text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from sparsecircuits.audit.log import AuditUnavailable
from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.model.gpt import GPT
from sparsecircuits.monitor.runtime import MonitorFactory
from sparsecircuits.serve import tracing
from sparsecircuits.serve.access import ApiKey, RateLimiter, RequestTooLarge
from sparsecircuits.serve.auditing import Auditor, replay_conditions
from sparsecircuits.serve.engine import (
    Cancelled,
    Chunk,
    DeadlineExceeded,
    SamplingOptions,
    generate,
)
from sparsecircuits.serve.errors import ApiError, audit_error
from sparsecircuits.serve.observability import Metrics, TelemetryStore
from sparsecircuits.serve.pool import Job, QueueFull, WorkerPool
from sparsecircuits.serve.responses import Responding
from sparsecircuits.serve.schemas import (
    CompletionRequest,
)

log = logging.getLogger("sparsecircuits.serve")
__all__ = ["ApiError", "Limits", "Server"]


@dataclass(frozen=True)
class _Work:
    """What a worker needs of a request."""

    prompt_ids: list[int]
    options: SamplingOptions  # its seed is the one used (the client's, or one drawn)
    arrival: float  # time.monotonic() at arrival, for the request latency
    key: ApiKey | None  # who asked (None: an open server)
    stream: bool
    client_seed: int | None
    prompt: str  # raw text: for the audit record's hash (the text itself only if asked)


@dataclass(frozen=True)
class Limits:
    """Per-request caps: ``max_prompt_tokens`` (None: the context), ``max_tokens`` (the
    largest ``max_tokens`` a request may ask)."""

    max_prompt_tokens: int | None = None
    max_tokens: int = 1024


class Server(Responding):
    """Everything the routes share: the model, the pool, the telemetry store, the metrics,
    the audit log, the rate limiter."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        *,
        factory: MonitorFactory,
        model_name: str,
        workers: int,
        queue_size: int,
        timeout_s: float,
        telemetry_capacity: int,
        tracer_provider: trace.TracerProvider | None,
        auditor: Auditor | None = None,
        limiter: RateLimiter | None = None,
        limits: Limits | None = None,
        capture_content: bool = False,
        record_info: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.factory = model, tokenizer, factory
        self.model_name, self.timeout_s = model_name, timeout_s
        self.workers, self.queue_size = workers, queue_size
        self.auditor, self.limiter = auditor, limiter
        self.limits = limits or Limits()
        self.capture_content = capture_content
        self.device = next(model.parameters()).device
        self.record_info = record_info or {}  # hashes every completion record repeats
        self.created = int(time.time())
        self.metrics = Metrics()
        self.store = TelemetryStore(telemetry_capacity)
        provider = tracer_provider or trace.get_tracer_provider()  # no-op unless configured
        self.tracer = provider.get_tracer("sparsecircuits.serve")
        # No token spans more characters than its bytes, so a prompt longer than this many
        # characters cannot fit the context: refused before tokenizing (which would block
        # the event loop on a huge body).
        longest = max(len(tokenizer.id_to_bytes(i)) for i in range(tokenizer.vocab_size))
        self.max_prompt_tokens = min(
            self.limits.max_prompt_tokens or model.config.block_size, model.config.block_size
        )
        self.max_prompt_chars = self.max_prompt_tokens * longest
        self.pool = WorkerPool(self._handle, workers=workers, queue_size=queue_size)

    # ------------------------------------------------------------------ worker side
    def _handle(self, job: Job) -> None:
        """Run one request on a worker thread, reporting chunks (or an exception) to the
        handler through ``job.emit``."""
        work: _Work = job.payload
        prompt_ids, options = work.prompt_ids, work.options
        if job.cancelled.is_set():
            self._close(job, outcome="cancelled", prompt_tokens=len(prompt_ids), n_sent=0,
                        text="", telemetry=None)  # fmt: skip
            return
        if time.monotonic() > job.deadline:  # it waited in the queue too long
            self.metrics.rejected.labels("timeout").inc()
            self._close(job, outcome="timeout", prompt_tokens=len(prompt_ids), n_sent=0,
                        text="", telemetry=None)  # fmt: skip
            job.emit(DeadlineExceeded("the request waited past its deadline for a worker"))
            return
        name = tracing.span_name(self.model_name)
        with self.tracer.start_as_current_span(name, kind=tracing.SPAN_KIND) as span:
            client = dataclasses.replace(options, seed=work.client_seed)
            span.set_attributes(
                tracing.request_attributes(
                    model=self.model_name, options=client, stream=work.stream
                )
            )
            monitor = self.factory.start(job.request_id)
            t0 = prev = time.monotonic()
            n_sent, parts = 0, []
            try:
                for chunk in generate(
                    self.model, self.tokenizer, prompt_ids, monitor, options=options,
                    deadline=job.deadline, cancelled=job.cancelled.is_set,
                ):  # fmt: skip
                    now = time.monotonic()
                    parts.append(chunk.text)
                    if chunk.completion_tokens > n_sent:  # a token was sent: time it
                        hist = self.metrics.first_token if n_sent == 0 else self.metrics.token
                        hist.observe(now - (t0 if n_sent == 0 else prev))
                        n_sent, prev = chunk.completion_tokens, now
                    if chunk.finish_reason is not None:  # recorded before the client hears
                        self._finish(job, chunk, monitor.telemetry(), span, "".join(parts))
                    job.emit(chunk)
            except AuditUnavailable as exc:  # the completion record could not be made durable
                self.metrics.rejected.labels("audit").inc()
                span.set_attributes(tracing.error_attributes("audit_unavailable"))
                span.set_status(Status(StatusCode.ERROR))
                log.error("request %s: %s", job.request_id, exc)
                job.emit(audit_error(exc))
            except (DeadlineExceeded, Cancelled) as exc:
                reason = "timeout" if isinstance(exc, DeadlineExceeded) else "cancelled"
                self.metrics.rejected.labels(reason).inc()
                span.set_attributes(tracing.error_attributes(reason))
                span.set_status(Status(StatusCode.ERROR))
                # The operator still gets what the monitor saw of an unfinished request.
                self._close(job, outcome=reason, prompt_tokens=len(prompt_ids), n_sent=n_sent,
                            text="".join(parts), telemetry=monitor.telemetry())  # fmt: skip
                log.info("request %s: %s after %d tokens", job.request_id, reason, n_sent)
                job.emit(exc)
            except Exception as exc:
                self.metrics.rejected.labels("error").inc()
                span.record_exception(exc)
                span.set_attributes(tracing.error_attributes(exc))
                span.set_status(Status(StatusCode.ERROR))
                log.exception("request %s: generation failed", job.request_id)
                self._close(job, outcome="error", prompt_tokens=len(prompt_ids), n_sent=n_sent,
                            text="".join(parts), telemetry=None)  # fmt: skip
                job.emit(exc)

    def _record(self, job: Job, *, outcome: str, prompt_tokens: int) -> dict[str, Any]:
        """The fields every telemetry record has (``outcome``: completed, timeout,
        cancelled, error)."""
        return {
            "request_id": job.request_id,
            "model": self.model_name,
            "outcome": outcome,
            "finish_reason": None,
            "prompt_tokens": prompt_tokens,
        }

    def _audit_fields(
        self, job: Job, record: dict[str, Any], telemetry: dict[str, Any] | None
    ) -> dict[str, Any]:
        """A completion record's fields (the auditor adds the output's hash)."""
        work: _Work = job.payload
        tel = telemetry or {}
        families = tel.get("families") or {}
        dampened = sorted(n for n, f in families.items() if f.get("dampened"))
        return {
            **record,
            **self.record_info,
            "api_key_id": None if work.key is None else work.key.id,
            "scores": {"families": families, "causal_share": tel.get("causal_share")},
            "mitigation": {"dampened_families": dampened,
                           "stopped": record.get("finish_reason") == "content_filter"},
            "replay": {"seed": work.options.seed, **replay_conditions(self.device)},
        }  # fmt: skip

    def _close(
        self,
        job: Job,
        *,
        outcome: str,
        prompt_tokens: int,
        n_sent: int,
        text: str,
        telemetry: dict[str, Any] | None,
        refused: bool = False,
    ) -> None:
        """Store and record a request that ended without a completion. The record is on
        disk before the client hears the error (a stream's last event: it may have sent
        tokens); ``refused``: it never ran (its whole rate-limit charge is given back, and
        no fsync is waited for: nothing was answered)."""
        record = {**self._record(job, outcome=outcome, prompt_tokens=prompt_tokens),
                  "completion_tokens": n_sent}  # fmt: skip
        self.store.put(job.request_id, {**record, "telemetry": telemetry or {}})
        self._refund(job, n_sent, refused=refused)
        if self.auditor is not None:
            fields = self._audit_fields(job, record, telemetry)
            try:
                self.auditor.complete(fields, output=text, durable=not refused)
            except AuditUnavailable as err:
                log.error("request %s: no completion record: %s", job.request_id, err)

    def _refund(self, job: Job, n_sent: int, *, refused: bool = False) -> None:
        """Give back what the key was charged and did not use: the tokens not generated, and
        for a request refused after admission the whole charge."""
        work: _Work = job.payload
        if self.limiter is None or work.key is None:
            return
        if refused:
            tokens = len(work.prompt_ids) + work.options.max_tokens
            self.limiter.refund(work.key, tokens=tokens, requests=1)
        else:
            self.limiter.refund(work.key, tokens=max(work.options.max_tokens - n_sent, 0))

    def _finish(
        self, job: Job, chunk: Chunk, telemetry: dict[str, Any], span: Any, text: str
    ) -> None:
        d = chunk.decision
        record = {
            **self._record(job, outcome="completed", prompt_tokens=chunk.prompt_tokens),
            "finish_reason": chunk.finish_reason,
            "completion_tokens": chunk.completion_tokens,
            "decision": d.to_json(),
        }
        self._refund(job, chunk.completion_tokens)
        if self.auditor is not None:  # durable before the client hears: raises if it cannot be
            t0 = time.perf_counter()
            fields = self._audit_fields(job, record, telemetry)
            self.auditor.complete(fields, output=text, durable=True)
            self.metrics.audit_write.labels("complete").observe(time.perf_counter() - t0)
        self.store.put(job.request_id, {**record, "telemetry": telemetry})
        m = self.metrics
        m.requests.labels(chunk.finish_reason, d.action.value).inc()
        m.prompt_tokens.inc(chunk.prompt_tokens)
        m.completion_tokens.inc(chunk.completion_tokens)
        m.request.observe(time.monotonic() - job.payload.arrival)
        span.set_attributes(
            tracing.response_attributes(
                response_id=job.request_id, model=self.model_name,
                finish_reason=chunk.finish_reason, input_tokens=chunk.prompt_tokens,
                output_tokens=chunk.completion_tokens,
            )
        )  # fmt: skip
        span.set_attributes(
            tracing.circuit_attributes(
                decision=d, telemetry=telemetry,
                policy_version=self.record_info.get("policy_version"),
                catalog_sha256=self.record_info.get("catalog_sha256"),
            )
        )  # fmt: skip
        span.set_attributes(
            tracing.content_attributes(
                prompt=job.payload.prompt, completion=text, capture=self.capture_content
            )
        )
        log.info(
            "request %s: prompt_tokens=%d completion_tokens=%d finish=%s action=%s family=%s",
            job.request_id, chunk.prompt_tokens, chunk.completion_tokens, chunk.finish_reason,
            d.action.value, d.family,
        )  # fmt: skip

    # ------------------------------------------------------------------ handler side
    def submit(self, body: CompletionRequest, *, key: ApiKey | None = None) -> Job:
        """Check the request against the model, the caps and ``key``'s rate limits, write its
        start record, and queue it (ApiError when any of these refuses it)."""
        if body.model is not None and body.model != self.model_name:
            raise ApiError(
                404,
                f"model '{body.model}' is not served here (this server serves '{self.model_name}')",
                type="not_found_error",
                param="model",
            )
        if body.max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens is {body.max_tokens}; this server allows at most "
                           f"{self.limits.max_tokens}", type="invalid_request_error",
                           param="max_tokens")  # fmt: skip
        cap = self.max_prompt_tokens
        ids = [] if len(body.prompt) > self.max_prompt_chars else self.tokenizer.encode(body.prompt)
        if len(ids) > cap or not ids:
            size = f"{len(ids)} tokens" if ids else f"{len(body.prompt)} characters"
            raise ApiError(
                400,
                f"the prompt is {size}; this server takes at most {cap} prompt tokens",
                type="invalid_request_error",
                param="prompt",
            )
        self._admit(key, tokens=len(ids) + body.max_tokens)
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        options = SamplingOptions(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=seed,
        )
        now = time.monotonic()
        work = _Work(ids, options, now, key, body.stream, body.seed, body.prompt)
        job = Job(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            payload=work,
            deadline=now + self.timeout_s,
            loop=asyncio.get_running_loop(),
        )
        if self.auditor is not None:
            params = {**dataclasses.asdict(options), "stream": body.stream,
                      "prompt_tokens": len(ids)}  # fmt: skip
            t0 = time.perf_counter()
            try:
                self.auditor.start(request_id=job.request_id, prompt=body.prompt, params=params,
                                   api_key_id=None if key is None else key.id)  # fmt: skip
            except AuditUnavailable as err:
                self.metrics.rejected.labels("audit").inc()
                self._refund(job, 0, refused=True)
                raise audit_error(err) from None
            self.metrics.audit_write.labels("start").observe(time.perf_counter() - t0)
        try:
            self.pool.submit(job)
        except QueueFull as exc:
            self.metrics.rejected.labels("busy").inc()
            self._close(job, outcome="rejected_busy", prompt_tokens=len(ids), n_sent=0,
                        text="", telemetry=None, refused=True)  # fmt: skip
            raise ApiError(429, str(exc), type="server_busy", retry_after=1.0) from None
        return job

    def _admit(self, key: ApiKey | None, *, tokens: int) -> None:
        """Charge ``key``'s rate limits (429 with the wait when they refuse)."""
        if self.limiter is None or key is None:
            return
        try:
            wait = self.limiter.acquire(key, tokens=tokens)
        except RequestTooLarge as err:
            raise ApiError(
                400, str(err), type="invalid_request_error", param="max_tokens"
            ) from None
        if wait is not None:
            self.metrics.rejected.labels("rate_limited").inc()
            message = f"rate limit of key '{key.id}' reached; retry in {math.ceil(wait)} s"
            raise ApiError(429, message, type="rate_limit_error", retry_after=wait)

    def health(self) -> dict[str, Any]:
        c = self.model.config
        audit = None if self.auditor is None else self.auditor.state()
        return {
            "status": "degraded" if audit and audit.get("error") else "ok",
            "model": self.model_name,
            "block_size": c.block_size,
            "vocab_size": c.vocab_size,
            "workers": self.workers,
            "queue_size": self.queue_size,
            "busy_workers": self.pool.busy,
            "waiting": self.pool.waiting,
            "monitor": self.factory.describe(),
            "audit": audit,
        }
