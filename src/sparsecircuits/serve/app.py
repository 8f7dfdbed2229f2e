"""The FastAPI app: OpenAI-compatible completions with the policy's decision, and the
operator's routes.

End users: ``POST /v1/completions`` (whole or as server-sent events) and ``GET /v1/models``.
Operators: ``GET /v1/telemetry/{request_id}``, ``GET /metrics`` (Prometheus), ``GET /healthz``.

Access: with a keys file (:mod:`sparsecircuits.serve.access`; only SHA-256s of keys are kept)
every route needs ``Authorization: Bearer KEY`` (missing or wrong: 401), and the operator
routes need a key of scope ``operator`` (a user key: 403), so that end users cannot read scores
(an evasion oracle); each key's request and token rates are limited (429 with
``Retry-After``). A lone operator key protects the operator routes only. With no keys at all
every route is open, which ``sparsecircuits serve`` allows only on loopback. Request bodies over
``MAX_BODY_BYTES`` are refused (413) before they are read; a full queue answers 429.

Every error is JSON in OpenAI's shape with a one-line message, never a stack trace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.model.gpt import GPT
from sparsecircuits.monitor.runtime import MonitorFactory, NullMonitorFactory
from sparsecircuits.serve.access import ApiKey, KeyStore, RateLimiter
from sparsecircuits.serve.auditing import Auditor
from sparsecircuits.serve.schemas import (
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    describe_validation_error,
    error_body,
    error_responses,
)
from sparsecircuits.serve.server import ApiError, Limits, Server

log = logging.getLogger("sparsecircuits.serve")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt that fits a context is far smaller


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 JSON, by its declared
    length before anything is read, or as soon as the received bytes pass it."""

    def __init__(self, app: Any, *, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(self.limit)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = error_response(
            413, f"request body over {self.limit} bytes", type="invalid_request_error"
        )
        await body({"type": "http"}, None, send)


class _TooLarge(StarletteHTTPException):
    """A streamed request body passed the limit. An HTTPException, because FastAPI's body
    reader re-raises only those (anything else would become 400 'error parsing the body')."""

    def __init__(self, limit: int = MAX_BODY_BYTES) -> None:
        super().__init__(413, f"request body over {limit} bytes")


def error_response(
    status: int, message: str, *, type: str, param: str | None = None, **kw: Any
) -> JSONResponse:
    """An OpenAI-shaped error (``kw``: JSONResponse options such as headers)."""
    return JSONResponse(error_body(message, type=type, param=param), status_code=status, **kw)


def create_app(
    model: GPT,
    tokenizer: Tokenizer,
    *,
    factory: MonitorFactory | None = None,
    model_name: str = "sparsecircuits",
    workers: int = 1,
    queue_size: int = 16,
    timeout_s: float = 120.0,
    telemetry_capacity: int = 1000,
    tracer_provider: trace.TracerProvider | None = None,
    operator_key_sha256: str | None = None,
    keys: KeyStore | None = None,
    auditor: Auditor | None = None,
    limits: Limits | None = None,
    capture_content: bool = False,
    record_info: dict[str, Any] | None = None,
    on_close: Callable[[], None] | None = None,
) -> FastAPI:
    """The server's app. ``factory``: per-request telemetry (None: :class:`NullMonitorFactory`,
    no catalogue). ``workers`` threads run requests; ``queue_size`` more may wait, the next is
    refused with 429. ``timeout_s``: each request's deadline from its arrival.
    ``telemetry_capacity``: how many requests' telemetry ``/v1/telemetry`` keeps.
    ``tracer_provider``: where request spans go (default: OpenTelemetry's global provider,
    which exports nothing unless the host process configures it). ``operator_key_sha256``: hex
    SHA-256 of a key of scope operator (no rate limits). ``keys``: API keys (every route then
    needs one). ``auditor``: where audit records go (None: none are written). ``limits``:
    caps on prompt tokens and max_tokens. ``capture_content``: prompt and completion text on
    spans. ``record_info``: hashes every completion record repeats (weights, catalogue,
    policy). ``on_close``: called last when the app shuts down (e.g. flush spans)."""
    entries = list(keys or [])
    if operator_key_sha256 is not None:
        entries.append(ApiKey(id="operator", sha256=operator_key_sha256, scope="operator",
                              requests_per_minute=None, tokens_per_minute=None,
                              created="1970-01-01T00:00:00+00:00"))  # fmt: skip
    store = KeyStore(entries, source="keys") if entries else None
    users_need_keys = keys is not None
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids, the model only "
            f"{model.config.vocab_size}"
        )
    server = Server(
        model.eval(), tokenizer, factory=factory or NullMonitorFactory(), model_name=model_name,
        workers=workers, queue_size=queue_size, timeout_s=timeout_s,
        telemetry_capacity=telemetry_capacity, tracer_provider=tracer_provider,
        auditor=auditor, limiter=None if store is None else RateLimiter(store),
        limits=limits, capture_content=capture_content, record_info=record_info,
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.pool.close(timeout=1.0)
        if auditor is not None:
            auditor.close()  # a final checkpoint over every record
        if on_close is not None:
            on_close()

    app = FastAPI(title="sparsecircuits", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    def _key(request: Request) -> ApiKey:
        assert store is not None
        key = store.authenticate(request.headers.get("authorization"))
        if key is None:
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           type="authentication_error")  # fmt: skip
        return key

    def user(request: Request) -> ApiKey | None:
        """The caller's key on a user route (None: this server's user routes are open)."""
        return _key(request) if users_need_keys else None

    def operator(request: Request) -> None:
        """Refuse an operator route without a key of scope operator (when keys are set)."""
        if store is None:
            return
        if not _key(request).allows("operator"):
            raise ApiError(403, "this route needs a key of scope operator",
                           type="permission_error")  # fmt: skip

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = None
        if err.status in (429, 503):
            headers = {"Retry-After": str(max(1, math.ceil(err.retry_after or 1)))}
        return error_response(err.status, str(err), type=err.type, param=err.param, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        server.metrics.rejected.labels("bad_request").inc()
        message, param = describe_validation_error(list(err.errors()))
        return error_response(400, message, type="invalid_request_error", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        # Its headers too: a 405 must name the allowed methods (Allow, RFC 9110).
        return error_response(err.status_code, str(err.detail), type=kind, headers=err.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        log.error("unhandled %s on %s", type(err).__name__, request.url.path)
        return error_response(500, "internal server error", type="server_error")

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={
            200: {"model": CompletionResponse,
                  "description": "a completion (JSON), or server-sent events with stream",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **error_responses(400, 401, 404, 413, 429, 503, 504),
        },
    )  # fmt: skip
    async def completions(
        body: CompletionRequest,
        key: ApiKey | None = Depends(user),  # noqa: B008 (FastAPI's idiom; a closure here)
    ) -> Any:
        job = server.submit(body, key=key)
        if body.stream:
            return StreamingResponse(server.sse(job), media_type="text/event-stream")
        return await server.complete(job)

    @app.get("/v1/models", dependencies=[Depends(user)], responses=error_responses(401))
    async def models() -> dict[str, Any]:
        card = ModelCard(id=server.model_name, created=server.created)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/telemetry/{request_id}", dependencies=[Depends(operator)],
             responses=error_responses(401, 403, 404))  # fmt: skip
    async def telemetry(request_id: str) -> Any:
        record = server.store.get(request_id)
        if record is None:
            return error_response(
                404,
                f"no telemetry for request '{request_id}' (the server keeps the last "
                f"{server.store.capacity} requests)",
                type="not_found_error",
                param="request_id",
            )
        return record

    @app.get("/metrics", dependencies=[Depends(operator)], response_class=PlainTextResponse,
             responses=error_responses(401, 403))  # fmt: skip
    async def metrics() -> Response:
        server.metrics.queue_depth.set(server.pool.waiting)
        server.metrics.busy_workers.set(server.pool.busy)
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", dependencies=[Depends(operator)], responses=error_responses(401, 403))
    async def healthz() -> dict[str, Any]:
        return server.health()

    def openapi() -> dict[str, Any]:
        """FastAPI's document without the 422s it adds by default: this server answers
        invalid requests with 400 in OpenAI's shape."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for item in doc["paths"].values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
