"""The generation loop of one request: KV cache, per-pass telemetry hooks, the policy's
decision, sampling.

Order of work, so that the monitor sees every token before the client does: prefill the prompt
(with the monitor's hooks) and observe it; then, per token, sample it, run its pass (which also
gives the next token's logits) and observe it; only a token whose pass did not end in ``block``
is sent. A blocked completion therefore stops before the token that tripped the policy. This
costs one pass more than ``GPT.generate`` per request (the last token's pass), not per token.

Once the context is full, each pass re-reads the last ``block_size`` tokens with a fresh cache,
exactly as ``GPT.generate`` does; the monitor is then handed the newest position only, so that
``observe`` always receives the positions it has not seen.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.model.cache import KVCache
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.sampling import sample_next
from sparsecircuits.monitor.runtime import Action, Decision, RequestMonitor


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens: ``temperature`` 0 is greedy; ``seed`` None draws a fresh seed."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of the completion: ``text`` is new text (possibly empty: a token that ends
    inside a UTF-8 character waits for the next one), ``decision`` the decision so far. The
    last chunk has a ``finish_reason``. Token counts are running totals."""

    text: str
    decision: Decision
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


class DeadlineExceeded(Exception):
    """The request ran past its deadline (the completion so far is discarded)."""


class Cancelled(Exception):
    """The request was abandoned (the client went away)."""


class _TextStream:
    """Token ids in, text deltas out, never splitting a UTF-8 character across deltas."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._sent = 0  # characters already handed out

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # maybe an incomplete byte sequence: wait for the rest
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._tok.decode(self._ids)) if self._ids else ""

    def _take(self, text: str) -> str:
        delta, self._sent = text[self._sent :], len(text)
        return delta


class _Passes:
    """Forward passes of one request over its growing token list, with the KV cache."""

    def __init__(self, model: GPT, monitor: RequestMonitor) -> None:
        self.model, self.monitor = model, monitor
        self.device = model.transformer.wte.weight.device
        self.block = model.config.block_size
        self.ids: list[int] = []
        self.cache = KVCache.for_model(model, batch=1)
        self.count = 0  # passes run

    def run(self, new: list[int]) -> tuple[torch.Tensor, Decision]:
        """Append ``new`` tokens, run their pass with the monitor's hooks, observe it.
        Returns the next token's logits (vocab,) and the decision."""
        self.ids.extend(new)
        hooks = self.monitor.hooks()  # asked per pass: a dampen changes the later passes
        trim = None
        if self.cache.length + len(new) <= self.block:
            window = new
        else:  # the window slides: positions shift, so the cached keys are stale
            self.cache = KVCache.for_model(self.model, batch=1)
            window, trim = self.ids[-self.block :], len(new)
        idx = torch.tensor([window], dtype=torch.long, device=self.device)
        logits, _ = self.model(idx, hooks=hooks, cache=self.cache)
        acts = hooks.cache
        if trim is not None:  # hand the monitor the positions it has not seen yet
            acts = {k: v[:, -trim:] for k, v in acts.items()}
        self.count += 1
        return logits[0, -1], self.monitor.observe(acts, list(new))


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    monitor: RequestMonitor,
    *,
    options: SamplingOptions,
    deadline: float | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Iterator[Chunk]:
    """Generate one completion, yielding a :class:`Chunk` per sent token and a last chunk
    with the finish reason: ``stop`` (``<|endoftext|>``, not part of the text), ``length``
    (``max_tokens`` sent) or ``content_filter`` (the decision became ``block``).

    ``prompt_ids`` must fit the context (1 .. block_size tokens; the caller checks).
    ``deadline`` (``time.monotonic()`` seconds) raises :class:`DeadlineExceeded` and
    ``cancelled()`` returning True raises :class:`Cancelled`, both checked before each pass.
    """
    if not 1 <= len(prompt_ids) <= model.config.block_size:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context")
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    passes = _Passes(model, monitor)
    gen = torch.Generator(device=passes.device).manual_seed(seed)
    text = _TextStream(tokenizer)
    n_prompt, sent = len(prompt_ids), 0

    def check() -> None:
        if cancelled is not None and cancelled():
            raise Cancelled("the request was cancelled")
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("the request ran past its deadline")

    def last(reason: str, decision: Decision) -> Chunk:
        return Chunk(text.flush(), decision, n_prompt, sent, finish_reason=reason)

    with torch.no_grad():
        check()
        logits, decision = passes.run(prompt_ids)
        if decision.action is Action.BLOCK:
            yield last("content_filter", decision)
            return
        while sent < options.max_tokens:
            nxt = sample_next(
                logits[None],
                temperature=options.temperature,
                top_p=options.top_p,
                generator=gen,
            )
            token = int(nxt)
            if token == tokenizer.eot_id:
                yield last("stop", decision)
                return
            check()
            logits, decision = passes.run([token])
            if decision.action is Action.BLOCK:
                yield last("content_filter", decision)
                return
            sent += 1
            delta = text.push(token)
            if sent < options.max_tokens:
                yield Chunk(delta, decision, n_prompt, sent)
            else:  # the last token travels with the finish reason
                yield Chunk(delta + text.flush(), decision, n_prompt, sent, finish_reason="length")
