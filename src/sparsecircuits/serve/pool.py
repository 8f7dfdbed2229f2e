"""A bounded pool of model worker threads fed by a bounded queue.

Torch releases the GIL inside its kernels, so threads sharing one model run their passes side
by side (each request has its own KV cache and hooks; the model itself is read-only). A full
queue refuses a request at once (:class:`QueueFull`) instead of letting latency grow without
bound. Results travel back to the event loop of the HTTP handler through
``loop.call_soon_threadsafe``, so the loop never blocks on a worker.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every worker is busy and the queue holds ``queue_size`` requests already."""


@dataclass(eq=False)
class Job:
    """One request on its way through the pool. ``payload`` is what the worker function
    needs; the worker reports with :meth:`emit` (any objects, in order), the handler reads
    them from ``events``."""

    request_id: str
    payload: Any
    deadline: float  # time.monotonic() seconds
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        """Hand ``item`` to the handler's loop (from a worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()


class WorkerPool:
    """``workers`` daemon threads running ``handle(job)`` for each submitted job; at most
    ``queue_size`` jobs wait. ``handle`` must report through ``job.emit`` and not raise (an
    exception is logged and emitted as is, so the handler is never left waiting)."""

    def __init__(
        self, handle: Callable[[Job], None], *, workers: int = 1, queue_size: int = 16
    ) -> None:
        if workers < 1 or queue_size < 0:
            raise ValueError(
                f"workers must be >= 1 and queue_size >= 0, got {workers}, {queue_size}"
            )
        self._handle = handle
        # The semaphore is the bound (running + waiting <= workers + queue_size), so the queue
        # itself need not be: queue_size 0 then means "idle workers only".
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(workers + queue_size)
        self._busy = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"sc-serve-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def busy(self) -> int:
        """Workers running a job now."""
        return self._busy

    @property
    def waiting(self) -> int:
        """Jobs queued, not yet started."""
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise :class:`QueueFull` at once."""
        if not self._slots.acquire(blocking=False):
            raise QueueFull("the server is busy: every worker is running and the queue is full")
        self._queue.put_nowait(job)

    def close(self, *, timeout: float = 5.0) -> None:
        """Stop the workers after the jobs already queued."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._busy += 1
            try:
                self._handle(job)
            except Exception as exc:  # the handler must still hear about it
                log.exception("request %s: worker failed", job.request_id)
                job.emit(exc)
            finally:
                with self._lock:
                    self._busy -= 1
                self._slots.release()
