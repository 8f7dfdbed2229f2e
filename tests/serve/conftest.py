"""Fixtures of the server tests: a small BPE tokenizer, a tiny random GPT of its vocabulary,
and test doubles of the monitor contract (``monitor/runtime.py``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from sparsecircuits.data import Tokenizer, stdlib_dir, train_tokenizer
from sparsecircuits.model import GPT
from sparsecircuits.model.hooks import Hooks
from sparsecircuits.monitor.runtime import NULL_POLICY_SHA256, Action, Decision
from tests.model.helpers import tiny_model

_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py"]
VOCAB = 384
BLOCK = 24


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    texts = [(stdlib_dir() / n).read_text(encoding="utf-8") for n in _FILES]
    return train_tokenizer(texts, vocab_size=VOCAB)


@pytest.fixture(scope="session")
def model() -> GPT:
    """Random weights: the text is gibberish, but deterministic given the seed."""
    return tiny_model(vocab_size=VOCAB, block_size=BLOCK)


@dataclass
class ScriptedMonitor:
    """Allows until its ``observe`` call number ``at`` (1 = the prompt's pass), then returns
    ``action`` from there on. Once dampened, ``hooks()`` carries an intervention on
    ``DAMPEN_SITE`` that halves it and counts its runs. Records what the engine did."""

    request_id: str
    at: int | None = None
    action: Action = Action.BLOCK
    gate: threading.Event | None = None  # when set: hooks() waits for it (a busy worker)
    hooks_calls: int = 0
    observed: list[list[int]] = field(default_factory=list)
    observed_widths: list[int] = field(default_factory=list)
    intervention_runs: int = 0
    decision: Decision = field(
        default_factory=lambda: Decision(Action.ALLOW, policy_sha256=NULL_POLICY_SHA256)
    )

    DAMPEN_SITE = "0.mlp.post_act"

    def hooks(self) -> Hooks:
        if self.gate is not None:
            self.gate.wait(10)
        self.hooks_calls += 1
        if self.decision.action is Action.DAMPEN:
            return Hooks(
                cache_names=[self.DAMPEN_SITE], interventions={self.DAMPEN_SITE: self._halve}
            )
        return Hooks(cache_names=[self.DAMPEN_SITE])

    def _halve(self, x: torch.Tensor) -> torch.Tensor:
        self.intervention_runs += 1
        return x * 0.5

    def observe(self, cache: dict[str, torch.Tensor], token_ids: list[int]) -> Decision:
        self.observed.append(list(token_ids))
        self.observed_widths.append(cache[self.DAMPEN_SITE].shape[1])
        if (
            self.at is not None
            and len(self.observed) >= self.at
            and self.decision.action is Action.ALLOW
        ):
            self.decision = Decision(
                self.action,
                policy_sha256="a" * 64,
                family="string-literal",
                rule="test-rule",
                at_token=len(self.observed) - 2,
                reason="scripted",
            )
        return self.decision

    def telemetry(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "families": {"string-literal": {"passes": len(self.observed)}},
            "decision": self.decision.to_json(),
        }


@dataclass
class ScriptedFactory:
    """Starts a :class:`ScriptedMonitor` per request and keeps them for inspection."""

    at: int | None = None
    action: Action = Action.BLOCK
    gate: threading.Event | None = None
    started: list[ScriptedMonitor] = field(default_factory=list)

    def start(self, request_id: str) -> ScriptedMonitor:
        m = ScriptedMonitor(request_id, at=self.at, action=self.action, gate=self.gate)
        self.started.append(m)
        return m

    def describe(self) -> dict[str, Any]:
        return {"catalog": "scripted", "families": ["string-literal"], "policy_sha256": "a" * 64}
