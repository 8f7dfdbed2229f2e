"""The state the routes share and the two halves of a request: the handler side (check,
queue, wait for chunks, shape them as OpenAI's responses or server-sent events) and the worker
side (run the generation loop, time it, store its telemetry, count it, trace it).

Logs and spans carry ids, lengths and the decision, never the prompt or completion text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.model.gpt import GPT
from sparsecircuits.monitor.runtime import MonitorFactory
from sparsecircuits.serve.engine import (
    Cancelled,
    Chunk,
    DeadlineExceeded,
    SamplingOptions,
    generate,
)
from sparsecircuits.serve.observability import Metrics, TelemetryStore
from sparsecircuits.serve.pool import Job, QueueFull, WorkerPool
from sparsecircuits.serve.schemas import (
    Choice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    error_body,
)

log = logging.getLogger("sparsecircuits.serve")

_GRACE_S = 5.0  # how long a handler waits past the deadline for a worker that does not answer


@dataclass(frozen=True)
class _Work:
    """What a worker needs of a request."""

    prompt_ids: list[int]
    options: SamplingOptions
    arrival: float  # time.monotonic() at arrival, for the request latency


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with ``status``."""

    def __init__(self, status: int, message: str, *, type: str, param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type, param


class Server:
    """Everything the routes share: the model, the pool, the telemetry store, the metrics."""

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
    ) -> None:
        self.model, self.tokenizer, self.factory = model, tokenizer, factory
        self.model_name, self.timeout_s = model_name, timeout_s
        self.workers, self.queue_size = workers, queue_size
        self.created = int(time.time())
        self.metrics = Metrics()
        self.store = TelemetryStore(telemetry_capacity)
        provider = tracer_provider or trace.get_tracer_provider()  # no-op unless configured
        self.tracer = provider.get_tracer("sparsecircuits.serve")
        # No token spans more characters than its bytes, so a prompt longer than this many
        # characters cannot fit the context: refused before tokenizing (which would block
        # the event loop on a huge body).
        longest = max(len(tokenizer.id_to_bytes(i)) for i in range(tokenizer.vocab_size))
        self.max_prompt_chars = model.config.block_size * longest
        self.pool = WorkerPool(self._handle, workers=workers, queue_size=queue_size)

    # ------------------------------------------------------------------ worker side
    def _handle(self, job: Job) -> None:
        """Run one request on a worker thread, reporting chunks (or an exception) to the
        handler through ``job.emit``."""
        work: _Work = job.payload
        prompt_ids, options = work.prompt_ids, work.options
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:  # it waited in the queue too long
            self.metrics.rejected.labels("timeout").inc()
            job.emit(DeadlineExceeded("the request waited past its deadline for a worker"))
            return
        with self.tracer.start_as_current_span("sparsecircuits.completion") as span:
            span.set_attribute("request.id", job.request_id)
            span.set_attribute("request.prompt_tokens", len(prompt_ids))
            span.set_attribute("request.max_tokens", options.max_tokens)
            monitor = self.factory.start(job.request_id)
            t0 = prev = time.monotonic()
            n_sent = 0
            try:
                for chunk in generate(
                    self.model, self.tokenizer, prompt_ids, monitor, options=options,
                    deadline=job.deadline, cancelled=job.cancelled.is_set,
                ):  # fmt: skip
                    now = time.monotonic()
                    if chunk.completion_tokens > n_sent:  # a token was sent: time it
                        hist = self.metrics.first_token if n_sent == 0 else self.metrics.token
                        hist.observe(now - (t0 if n_sent == 0 else prev))
                        n_sent, prev = chunk.completion_tokens, now
                    if chunk.finish_reason is not None:  # stored before the client hears
                        self._finish(job, chunk, monitor.telemetry(), span)
                    job.emit(chunk)
            except (DeadlineExceeded, Cancelled) as exc:
                reason = "timeout" if isinstance(exc, DeadlineExceeded) else "cancelled"
                self.metrics.rejected.labels(reason).inc()
                span.set_attribute("request.outcome", reason)
                # The operator still gets what the monitor saw of an unfinished request.
                record = self._record(job, outcome=reason, prompt_tokens=len(prompt_ids))
                self.store.put(job.request_id, {**record, "completion_tokens": n_sent,
                                                "telemetry": monitor.telemetry()})  # fmt: skip
                log.info("request %s: %s after %d tokens", job.request_id, reason, n_sent)
                job.emit(exc)
            except Exception as exc:
                self.metrics.rejected.labels("error").inc()
                span.record_exception(exc)
                log.exception("request %s: generation failed", job.request_id)
                job.emit(exc)

    def _record(self, job: Job, *, outcome: str, prompt_tokens: int) -> dict[str, Any]:
        """The fields every telemetry record has (``outcome``: completed, timeout,
        cancelled)."""
        return {
            "request_id": job.request_id,
            "model": self.model_name,
            "outcome": outcome,
            "finish_reason": None,
            "prompt_tokens": prompt_tokens,
        }

    def _finish(self, job: Job, chunk: Chunk, telemetry: dict[str, Any], span: Any) -> None:
        d = chunk.decision
        record = self._record(job, outcome="completed", prompt_tokens=chunk.prompt_tokens)
        self.store.put(
            job.request_id,
            {
                **record,
                "finish_reason": chunk.finish_reason,
                "completion_tokens": chunk.completion_tokens,
                "decision": d.to_json(),
                "telemetry": telemetry,
            },
        )
        m = self.metrics
        m.requests.labels(chunk.finish_reason, d.action.value).inc()
        m.prompt_tokens.inc(chunk.prompt_tokens)
        m.completion_tokens.inc(chunk.completion_tokens)
        m.request.observe(time.monotonic() - job.payload.arrival)
        for key, value in {
            "request.completion_tokens": chunk.completion_tokens,
            "request.finish_reason": chunk.finish_reason,
            "decision.action": d.action.value,
            "decision.family": d.family or "",
            "decision.rule": d.rule or "",
            "decision.policy_sha256": d.policy_sha256,
        }.items():
            span.set_attribute(key, value)
        log.info(
            "request %s: prompt_tokens=%d completion_tokens=%d finish=%s action=%s family=%s",
            job.request_id, chunk.prompt_tokens, chunk.completion_tokens, chunk.finish_reason,
            d.action.value, d.family,
        )  # fmt: skip

    # ------------------------------------------------------------------ handler side
    def submit(self, body: CompletionRequest) -> Job:
        """Check the request against the model and queue it (ApiError when it cannot be)."""
        if body.model is not None and body.model != self.model_name:
            raise ApiError(
                404,
                f"model '{body.model}' is not served here (this server serves '{self.model_name}')",
                type="not_found_error",
                param="model",
            )
        block = self.model.config.block_size
        ids = [] if len(body.prompt) > self.max_prompt_chars else self.tokenizer.encode(body.prompt)
        if len(ids) > block or not ids:
            size = f"{len(ids)} tokens" if ids else f"{len(body.prompt)} characters"
            raise ApiError(
                400,
                f"the prompt is {size}; the model's context is {block} tokens",
                type="invalid_request_error",
                param="prompt",
            )
        options = SamplingOptions(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
        )
        now = time.monotonic()
        job = Job(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            payload=_Work(ids, options, now),
            deadline=now + self.timeout_s,
            loop=asyncio.get_running_loop(),
        )
        try:
            self.pool.submit(job)
        except QueueFull as exc:
            self.metrics.rejected.labels("busy").inc()
            raise ApiError(503, str(exc), type="server_busy") from None
        return job

    async def next_chunk(self, job: Job) -> Chunk:
        """The worker's next chunk; its exceptions are re-raised as :class:`ApiError`."""
        wait = max(job.deadline - time.monotonic(), 0.0) + _GRACE_S
        try:
            item = await asyncio.wait_for(job.events.get(), wait)
        except TimeoutError:
            job.cancelled.set()
            self.metrics.rejected.labels("timeout").inc()
            raise ApiError(504, "the request ran past its deadline", type="timeout") from None
        if isinstance(item, DeadlineExceeded):
            raise ApiError(504, str(item), type="timeout")
        if isinstance(item, BaseException):
            raise ApiError(
                500, f"generation failed (request {job.request_id})", type="server_error"
            )
        return item

    def response(self, job: Job, *, choice: Choice, usage: Usage | None) -> dict[str, Any]:
        return CompletionResponse(
            id=job.request_id,
            created=int(time.time()),
            model=self.model_name,
            choices=[choice],
            usage=usage,
        ).model_dump(mode="json", exclude_none=False)

    async def sse(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events: one chunk per token, the decision in the first chunk and in
        every chunk where it changes, usage with the last one, then ``[DONE]``."""
        sent = None
        try:
            while True:
                try:
                    chunk = await self.next_chunk(job)
                except ApiError as err:
                    body = error_body(str(err), type=err.type, param=err.param)
                    yield f"data: {json.dumps(body)}\n\n"
                    break
                changed = chunk.decision != sent
                sent = chunk.decision
                choice = Choice(
                    text=chunk.text,
                    finish_reason=chunk.finish_reason,
                    decision=chunk.decision.to_json() if changed else None,
                )
                usage = _usage(chunk) if chunk.finish_reason else None
                yield f"data: {json.dumps(self.response(job, choice=choice, usage=usage))}\n\n"
                if chunk.finish_reason:
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client left or the stream ended: a running worker stops at its next pass
            job.cancelled.set()

    async def complete(self, job: Job) -> dict[str, Any]:
        """The whole completion (non-streaming): the chunks joined."""
        parts: list[str] = []
        try:
            while True:
                chunk = await self.next_chunk(job)
                parts.append(chunk.text)
                if chunk.finish_reason:
                    break
        finally:
            job.cancelled.set()
        choice = Choice(
            text="".join(parts),
            finish_reason=chunk.finish_reason,
            decision=chunk.decision.to_json(),
        )
        return self.response(job, choice=choice, usage=_usage(chunk))

    def health(self) -> dict[str, Any]:
        c = self.model.config
        return {
            "status": "ok",
            "model": self.model_name,
            "block_size": c.block_size,
            "vocab_size": c.vocab_size,
            "workers": self.workers,
            "queue_size": self.queue_size,
            "busy_workers": self.pool.busy,
            "waiting": self.pool.waiting,
            "monitor": self.factory.describe(),
        }


def _usage(chunk: Chunk) -> Usage:
    n, m = chunk.prompt_tokens, chunk.completion_tokens
    return Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)
