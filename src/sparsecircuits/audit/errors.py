"""What the audit log raises."""

from __future__ import annotations

from sparsecircuits.errors import InputError


class AuditUnavailable(Exception):
    """The log cannot take or keep a record now (the request must not be answered)."""


class AuditDamaged(InputError):
    """The log on disk is inconsistent beyond a torn tail; a person must look."""
