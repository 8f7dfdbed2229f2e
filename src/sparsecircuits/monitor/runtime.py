"""The contract between the generation loop (``serve/``) and per-request telemetry.

The server generates with the KV cache. For every forward pass of a request (the prompt's
prefill, then one token at a time) it asks the request's :class:`RequestMonitor` for the hooks
of that pass (which sites to record, and a dampening intervention once the policy asked for
one), runs the pass, and hands the recorded activations back with :meth:`observe`, which
returns the decision so far. A ``block`` stops the request (``finish_reason:
"content_filter"``); ``dampen`` changes the hooks of the following passes.

:class:`NullMonitor` is the server without a catalogue: it records nothing and allows
everything (plain serving, and the baseline the overhead benchmark times).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import torch

from sparsecircuits.model.hooks import Hooks


class Action(StrEnum):
    """What a policy does, from mildest to strictest (the order is the severity)."""

    ALLOW = "allow"
    LOG = "log"
    REVIEW = "review"
    DAMPEN = "dampen"
    BLOCK = "block"

    @property
    def severity(self) -> int:
        return list(Action).index(self)


@dataclass(frozen=True)
class Decision:
    """The policy's verdict so far for one request.

    ``action``: the strictest action any rule has fired; ``family`` / ``rule``: what fired it
    (None for allow); ``at_token``: index of the generated token at which it fired (prompt
    tokens count as -1); ``policy_sha256``: the policy file's hash (every decision names it).
    ``bridge``: set when the family was scored through a bridge from a dense model (the site
    and that site's measured fidelity, ``monitor/bridged.py``); absent from the JSON otherwise.
    """

    action: Action
    policy_sha256: str
    family: str | None = None
    rule: str | None = None
    at_token: int | None = None
    reason: str = ""
    bridge: dict[str, Any] | None = field(default=None, hash=False)  # a dict: not hashable

    def to_json(self) -> dict[str, Any]:
        out = {
            "action": self.action.value,
            "family": self.family,
            "rule": self.rule,
            "at_token": self.at_token,
            "reason": self.reason,
            "policy_sha256": self.policy_sha256,
        }
        if self.bridge is not None:  # a bridge-derived decision never travels without it
            out["bridge"] = dict(self.bridge)
        return out


class RequestMonitor(Protocol):
    """Telemetry state of one request, fed by its generation loop."""

    def hooks(self) -> Hooks:
        """The hooks of the next forward pass: sites to record and, after a ``dampen``
        decision, the intervention on exactly the dampened family's nodes."""
        ...

    def observe(self, cache: dict[str, torch.Tensor], token_ids: list[int]) -> Decision:
        """Take the activations the last pass recorded (each (1, T_new, width): the new
        positions only) and the ids of those positions' tokens; return the decision so far."""
        ...

    def telemetry(self) -> dict[str, Any]:
        """The operator's record of the request (JSON-able): per family and token scores,
        flags, the decision. Never the raw activations."""
        ...


class MonitorFactory(Protocol):
    """Starts the telemetry of each request."""

    def start(self, request_id: str) -> RequestMonitor: ...

    def describe(self) -> dict[str, Any]:
        """What is loaded (catalogue, families, baseline, policy hash), for ``/healthz``."""
        ...


NULL_POLICY_SHA256 = "0" * 64  # no policy loaded


@dataclass
class NullMonitor:
    """No catalogue: records nothing, allows everything."""

    request_id: str = ""
    decision: Decision = field(
        default_factory=lambda: Decision(Action.ALLOW, policy_sha256=NULL_POLICY_SHA256)
    )

    def hooks(self) -> Hooks:
        return Hooks()

    def observe(self, cache: dict[str, torch.Tensor], token_ids: list[int]) -> Decision:
        return self.decision

    def telemetry(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "families": {}, "decision": self.decision.to_json()}


class NullMonitorFactory:
    """The factory of :class:`NullMonitor` (a server started without ``--catalog``)."""

    def start(self, request_id: str) -> RequestMonitor:
        return NullMonitor(request_id)

    def describe(self) -> dict[str, Any]:
        return {"catalog": None, "families": [], "policy_sha256": NULL_POLICY_SHA256}
