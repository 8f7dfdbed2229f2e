"""The server's audit records: a ``start`` record when a request is accepted, a ``complete``
record when it ends, an ``open`` record (the server's configuration) when a process starts.

What a record holds is listed in ``docs/audit.md``. Raw prompt and completion text only with
``store_inputs``; otherwise their SHA-256. A completion record carries what replaying it needs
(the seed actually used, torch's thread count, the kernel backend and build, no batching).

When the log cannot take a record, the request is refused (503) rather than answered without
one; a log that could not be opened is retried at most once a second, so a directory made
writable again brings the server back without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsecircuits.audit.log import AuditLog, AuditUnavailable, LogOptions
from sparsecircuits.audit.signing import Signer

log = logging.getLogger("sparsecircuits.serve")

RETRY_OPEN_S = 1.0


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def replay_conditions(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What must match for a replay to reproduce scores bit for bit (``device``: where the
    model runs; replay runs on the CPU)."""
    from sparsecircuits.kernels._lib import backend, build_id

    return {
        "device": torch.device(device).type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "kernel_backend": backend(),
        "kernel_build": build_id(),
        "batching": "none",  # one request per forward pass
    }


@dataclass
class AuditSettings:
    """``trail``: the audit directory; ``log_id`` None takes the first free slot."""

    trail: Path
    signer: Signer
    log_id: str | None = None
    options: LogOptions = field(default_factory=LogOptions)
    store_inputs: bool = False


class Auditor:
    """Writes a server process's records into its own log of the trail."""

    def __init__(self, settings: AuditSettings, *, manifest: dict[str, Any]) -> None:
        self.settings, self.manifest = settings, manifest
        self.store_inputs = settings.store_inputs
        self._log: AuditLog | None = None
        self._error = "not opened yet"
        self._tried = 0.0
        self._mu = threading.Lock()
        self.last_error: str | None = None  # the last failed write (None once one succeeds)
        with contextlib.suppress(AuditUnavailable):  # serve anyway: 503s until it opens
            self._open()

    def _open(self) -> AuditLog:
        """The log, opening it if needed (AuditUnavailable if it cannot be)."""
        with self._mu:
            if self._log is not None:
                return self._log
            if time.monotonic() - self._tried < RETRY_OPEN_S and self._tried:
                raise AuditUnavailable(f"audit log unavailable: {self._error}")
            self._tried = time.monotonic()
            s = self.settings
            try:
                opened = AuditLog(s.trail, s.signer, log_id=s.log_id, options=s.options)
            except AuditUnavailable as err:
                self._error = str(err)
                log.error("audit: %s", err)
                raise
            fields = {"server": {**self.manifest, "pid": os.getpid(), **replay_conditions()}}
            try:
                opened.sync(opened.append("open", fields))
            except AuditUnavailable as err:
                self._error = str(err)
                opened.close(checkpoint=False)
                raise
            self._log = opened
            return opened

    @property
    def log_id(self) -> str | None:
        return None if self._log is None else self._log.log_id

    def start(
        self, *, request_id: str, api_key_id: str | None, prompt: str, params: dict[str, Any]
    ) -> None:
        """The request was accepted (written, made durable with the next group commit)."""
        fields: dict[str, Any] = {
            "request_id": request_id,
            "api_key_id": api_key_id,
            "input_sha256": sha256_text(prompt),
            "params": params,
        }
        if self.store_inputs:
            fields["input"] = prompt
        self._noted(lambda: self._open().append("start", fields))

    def complete(self, fields: dict[str, Any], *, output: str, durable: bool) -> None:
        """The request ended; with ``durable`` return only once the record is on disk."""
        fields = {**fields, "output_sha256": sha256_text(output)}
        if self.store_inputs:
            fields["output"] = output

        def write() -> None:
            audit_log = self._open()
            seq = audit_log.append("complete", fields)
            if durable:
                audit_log.sync(seq)

        self._noted(write)

    def _noted(self, write: Callable[[], Any]) -> None:
        """Run ``write``, remembering whether the log took it (for /healthz)."""
        try:
            write()
        except AuditUnavailable as err:
            self.last_error = str(err)
            raise
        self.last_error = None

    def state(self) -> dict[str, Any]:
        """For /healthz: ``error`` is set while records cannot be written."""
        if self._log is None:
            return {"error": self._error, "trail": str(self.settings.trail)}
        state = {"trail": str(self.settings.trail), **self._log.state()}
        state["error"] = state["error"] or self.last_error
        return state

    def close(self) -> None:
        with self._mu:
            if self._log is not None:
                self._log.close()
                self._log = None
