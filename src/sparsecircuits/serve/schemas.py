"""Request and response bodies of the server, in OpenAI's completions schema.

Fields are strict (a string is not coerced to a number, ``16.0`` is not an integer) and unknown
fields are refused: a client that sends ``n`` or ``logprobs`` learns at once that this server
ignores nothing silently. The response carries the policy's decision, never activations or
logits (the operator reads those on ``/v1/telemetry/{id}``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

FinishReason = Literal["stop", "length", "content_filter"]
MAX_TOKENS = 1024  # per request
MIN_TEMPERATURE = 1e-2


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. ``temperature`` 0 is greedy; ``seed`` makes sampling
    repeatable (same seed, same prompt, same options: same text)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str = Field(min_length=1)
    # Bounded: a request holds a worker for as many passes as it asks for (and its telemetry
    # grows with them), so one client must not be able to hold a worker until the deadline.
    max_tokens: int = Field(default=16, ge=1, le=MAX_TOKENS)
    # OpenAI's range; 0 is greedy. A tiny positive temperature overflows logits / temperature
    # (inf, then NaN probabilities), so (0, MIN_TEMPERATURE) is refused rather than failing.
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, lt=2**64)  # torch.Generator's seed range
    stream: bool = False

    @field_validator("temperature")
    @classmethod
    def _not_tiny(cls, v: float) -> float:
        if 0.0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None
    decision: dict[str, Any] | None = None  # Decision.to_json(); in a chunk: only on a change


class CompletionResponse(BaseModel):
    """The whole completion (non-streaming), or one server-sent chunk of it (streaming, where
    ``usage`` comes with the last chunk only)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sparsecircuits"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server sends (for the OpenAPI document)."""

    error: ErrorDetail


_STATUS = {400: "invalid request", 401: "missing or wrong API key",
           403: "the key's scope does not allow this route", 404: "not found",
           413: "request body too large", 429: "rate limit or full queue (Retry-After)",
           503: "no audit record can be written (Retry-After)",
           504: "the request ran past its deadline"}  # fmt: skip


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the error statuses a route may answer."""
    return {c: {"model": ErrorResponse, "description": _STATUS[c]} for c in codes}


def error_body(message: str, *, type: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``, the message
    on one line."""
    return {
        "error": {"message": " ".join(message.split()), "type": type, "param": param, "code": None}
    }


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line and the offending field from pydantic's error list (the first error)."""
    if not errors:
        return "invalid request body", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown field '{field}' (this server accepts: {_FIELDS})", field
    if kind == "missing":
        if field is None:  # the body itself
            return "a JSON request body is required", None
        return f"field '{field}' is required", field
    if kind in ("json_invalid", "model_attributes_type", "dict_type"):
        return "the body must be a JSON object", None
    msg = err.get("msg", "invalid value")
    return (f"field '{field}': {msg}" if field else msg), field


_FIELDS = ", ".join(CompletionRequest.model_fields)
