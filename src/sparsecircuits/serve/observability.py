"""What operators read: Prometheus metrics and the bounded store of per-request telemetry.

Each app has its own metrics registry (two servers in one process, as in the tests, do not
share counters). Labels are bounded sets (finish reasons, policy actions), never request ids
or prompt text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Per-token latencies of small models on CPUs are milliseconds; requests take up to minutes.
_TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# 50 us .. 100 ms: an append is a signature and a write; a completion waits for an fsync
_AUDIT_BUCKETS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2,
                  2e-2, 5e-2, 1e-1)  # fmt: skip


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sparsecircuits_requests",
            "Completed completion requests, by finish reason and policy action",
            ["finish_reason", "action"],
            registry=r,
        )
        self.rejected = Counter(
            "sparsecircuits_rejected_requests",
            "Requests refused or failed: bad_request, busy, timeout, cancelled, error",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "sparsecircuits_prompt_tokens", "Prompt tokens of completed requests", registry=r
        )
        self.completion_tokens = Counter(
            "sparsecircuits_completion_tokens", "Tokens sent to clients", registry=r
        )
        self.first_token = Histogram(
            "sparsecircuits_first_token_seconds",
            "From the start of generation to the first chunk (prefill + one token)",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.token = Histogram(
            "sparsecircuits_token_seconds",
            "Time per generated token after the first (one pass, sampling, telemetry)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request = Histogram(
            "sparsecircuits_request_seconds",
            "Time from arrival to the last chunk, queueing included",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.audit_write = Histogram(
            "sparsecircuits_audit_write_seconds",
            "Writing a request's audit record: sign, hash, write; for a completion record also "
            "the wait until it is on disk",
            ["kind"],
            buckets=_AUDIT_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "sparsecircuits_queue_depth", "Requests waiting for a worker", registry=r
        )
        self.busy_workers = Gauge(
            "sparsecircuits_busy_workers", "Workers running a request", registry=r
        )


class TelemetryStore:
    """The telemetry records of the last ``capacity`` requests, by request id (thread-safe;
    the oldest record goes first)."""

    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, request_id: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._items[request_id] = record
            self._items.move_to_end(request_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._items.get(request_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
