"""Errors answered as OpenAI-shaped JSON."""

from __future__ import annotations

from sparsecircuits.audit.errors import AuditUnavailable


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with ``status`` (``retry_after``: seconds, for
    429 and 503)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.type, self.param = status, type, param
        self.retry_after = retry_after


def audit_error(err: AuditUnavailable) -> ApiError:
    return ApiError(503, f"no audit record can be written: {err}", type="audit_unavailable",
                    retry_after=1.0)  # fmt: skip
