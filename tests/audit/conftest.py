"""Shared fixtures for the audit-log tests (writer and tamper detection): keys, a record
filler, a verifier shortcut, a log opener that always closes, and a stand-in for the ``os``
module that :mod:`sparsecircuits.audit.log` sees (to count or fail its fsyncs and writes)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sparsecircuits.audit import log as audit_log
from sparsecircuits.audit.log import AuditLog, LogOptions
from sparsecircuits.audit.signing import Keyring, Signer
from sparsecircuits.audit.verify import LogReport, verify_trail


@pytest.fixture(scope="session")
def signer() -> Signer:
    """The log's key: the one verify trusts."""
    return Signer.generate()


@pytest.fixture(scope="session")
def stranger() -> Signer:
    """An attacker's key: verify does not trust it."""
    return Signer.generate()


@pytest.fixture(scope="session")
def keyring(signer: Signer) -> Keyring:
    return Keyring([signer.private.public_key()])


def request_fields(i: int) -> tuple[str, dict[str, Any]]:
    """The i-th record of a request stream: start/complete pairs sharing a request id, with a
    few floats (one infinite, which the canonical form spells as a string)."""
    rid = f"req-{i // 2:04d}"
    if i % 2 == 0:
        return "start", {"request_id": rid, "temperature": 0.25 * (i % 5), "top_p": 0.9}
    z = float("inf") if i == 5 else (i - 30) / 7.0
    return "complete", {"request_id": rid, "latency_s": 0.001 * i, "zscore": z}


@pytest.fixture(scope="session")
def fill() -> Callable[..., list[int]]:
    """``fill(log, n, start=0, sync=True)``: append ``n`` request records (numbered from
    ``start`` for their contents), syncing each; returns their seqs."""

    def run(log: AuditLog, n: int, *, start: int = 0, sync: bool = True) -> list[int]:
        seqs = []
        for i in range(start, start + n):
            kind, fields = request_fields(i)
            seq = log.append(kind, fields)
            if sync:
                log.sync(seq)
            seqs.append(seq)
        return seqs

    return run


@pytest.fixture(scope="session")
def verify(keyring: Keyring) -> Callable[..., dict[str, LogReport]]:
    """``verify(trail, trusted=None)``: the trail's reports by log id."""

    def run(trail: Path, trusted: list[dict[str, Any]] | None = None) -> dict[str, LogReport]:
        reports = verify_trail(trail, keyring, trusted=trusted)
        by_log = {r.log: r for r in reports}
        assert len(by_log) == len(reports), "two reports for one log"
        return by_log

    return run


@pytest.fixture
def open_log(signer: Signer) -> Iterator[Callable[..., AuditLog]]:
    """``open_log(trail, log_id=None, **options)``: an AuditLog closed at teardown (so no
    commit thread or flock outlives its test, even a failing one)."""
    opened: list[AuditLog] = []

    def run(trail: Path, *, log_id: str | None = None, **options: Any) -> AuditLog:
        log = AuditLog(trail, signer, log_id=log_id, options=LogOptions(**options))
        opened.append(log)
        return log

    yield run
    for log in reversed(opened):
        # A test may have broken the log on purpose: closing is best effort.
        with contextlib.suppress(Exception):
            log.close()


class OsStandIn:
    """What ``sparsecircuits.audit.log`` sees as ``os``: the real module, except for the
    functions given. Patching the module's name (not ``os.fsync`` itself) keeps the change to
    the audit writer: pytest, fileio's atomic writes and every other thread still get the
    real ``os``."""

    def __init__(self, **overrides: Callable[..., Any]) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def log_os(monkeypatch: pytest.MonkeyPatch) -> Callable[..., OsStandIn]:
    """``log_os(fsync=..., write=...)``: install an :class:`OsStandIn` as the audit writer's
    ``os`` for this test. Request it before ``open_log`` so logs close before it is undone."""

    def run(**overrides: Callable[..., Any]) -> OsStandIn:
        stand_in = OsStandIn(**overrides)
        monkeypatch.setattr(audit_log, "os", stand_in)
        return stand_in

    return run
