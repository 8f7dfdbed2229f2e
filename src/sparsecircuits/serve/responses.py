"""The handler's half of a request: wait for the worker's chunks, shape them as OpenAI's
response or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from sparsecircuits.serve.engine import Chunk, DeadlineExceeded
from sparsecircuits.serve.errors import ApiError
from sparsecircuits.serve.observability import Metrics
from sparsecircuits.serve.pool import Job
from sparsecircuits.serve.schemas import Choice, CompletionResponse, Usage, error_body

_GRACE_S = 5.0  # how long a handler waits past the deadline for a worker that does not answer


class Responding:
    """Mixed into :class:`~sparsecircuits.serve.server.Server`."""

    metrics: Metrics
    model_name: str

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
        if isinstance(item, ApiError):
            raise item
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


def _usage(chunk: Chunk) -> Usage:
    n, m = chunk.prompt_tokens, chunk.completion_tokens
    return Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)
