"""The generation loop (KV cache, per-pass hooks, decisions, sliding window), nucleus
sampling and the worker pool, without HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from sparsecircuits.model.sampling import sample_next
from sparsecircuits.monitor.runtime import Action, NullMonitor
from sparsecircuits.serve.engine import (
    Cancelled,
    DeadlineExceeded,
    SamplingOptions,
    generate,
)
from sparsecircuits.serve.pool import Job, QueueFull, WorkerPool
from tests.serve.conftest import BLOCK, ScriptedMonitor


def _run(model, tok, prompt_ids, monitor=None, **opts):
    chunks = list(
        generate(model, tok, prompt_ids, monitor or NullMonitor(), options=SamplingOptions(**opts))
    )
    return "".join(c.text for c in chunks), chunks


def test_greedy_matches_generate_with_the_cache_and_across_the_sliding_window(model, tokenizer):
    """Greedy text equals GPT.generate's, past the context (the window slides)."""
    prompt = tokenizer.encode("def f(x):\n    return x")
    n = BLOCK + 6 - len(prompt)  # ends past the context
    want = model.generate(torch.tensor([prompt]), max_new_tokens=n, temperature=0)[0]
    new = want[len(prompt) :].tolist()
    if tokenizer.eot_id in new:  # a random model may end early; compare up to there
        new = new[: new.index(tokenizer.eot_id)]
    text, chunks = _run(model, tokenizer, prompt, max_tokens=n, temperature=0)
    assert text == tokenizer.decode(new)
    assert chunks[-1].completion_tokens == len(new)


def test_same_seed_same_text_and_top_p(model, tokenizer):
    prompt = tokenizer.encode("import os\n")
    a, _ = _run(model, tokenizer, prompt, max_tokens=10, seed=7, top_p=0.9)
    b, _ = _run(model, tokenizer, prompt, max_tokens=10, seed=7, top_p=0.9)
    assert a == b


def test_monitor_sees_every_pass_and_each_token_once(model, tokenizer):
    """One hooks() and one observe() per pass; observe gets the new positions only (one per
    token, also after the window slides), and the prompt first."""
    prompt = tokenizer.encode("x = 1\n")
    mon = ScriptedMonitor("r")
    _, chunks = _run(model, tokenizer, prompt, mon, max_tokens=BLOCK, temperature=0)
    sent = chunks[-1].completion_tokens
    assert mon.observed[0] == prompt
    assert mon.hooks_calls == len(mon.observed) == 1 + sent
    assert all(len(t) == 1 for t in mon.observed[1:])
    assert mon.observed_widths == [len(t) for t in mon.observed]


def test_block_stops_before_the_blocked_token(model, tokenizer):
    mon = ScriptedMonitor("r", at=4, action=Action.BLOCK)  # the prompt, then tokens 1..3
    _, chunks = _run(model, tokenizer, tokenizer.encode("a = '"), mon, max_tokens=10, seed=0)
    assert chunks[-1].finish_reason == "content_filter"
    assert chunks[-1].decision.action is Action.BLOCK
    assert chunks[-1].completion_tokens == 2  # the third token's pass tripped the block


def test_block_on_the_prompt_sends_nothing(model, tokenizer):
    mon = ScriptedMonitor("r", at=1)
    text, chunks = _run(model, tokenizer, tokenizer.encode("a"), mon, max_tokens=5)
    assert (text, len(chunks), chunks[0].finish_reason) == ("", 1, "content_filter")


def test_dampen_changes_the_hooks_of_every_later_pass(model, tokenizer):
    mon = ScriptedMonitor("r", at=2, action=Action.DAMPEN)
    _, chunks = _run(model, tokenizer, tokenizer.encode("b = ("), mon, max_tokens=6, seed=1)
    passes = len(mon.observed)
    assert chunks[-1].decision.action is Action.DAMPEN
    assert mon.hooks_calls == passes
    assert mon.intervention_runs == passes - 2  # every pass after the one that dampened


def test_deadline_stops_generation(model, tokenizer):
    opts = SamplingOptions(max_tokens=5)
    it = generate(model, tokenizer, [1, 2], NullMonitor(), options=opts, deadline=0.0)
    with pytest.raises(DeadlineExceeded):
        next(it)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1, top_p=0.7, generator=gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    tiny = {int(sample_next(logits, temperature=1, top_p=1e-6, generator=gen)) for _ in range(50)}
    assert tiny == {0}  # the likeliest token always stays


def test_pool_refuses_past_workers_plus_queue():
    gate = threading.Event()
    done: list[str] = []

    def handle(job: Job) -> None:
        gate.wait(10)
        done.append(job.request_id)

    async def main() -> None:
        pool = WorkerPool(handle, workers=1, queue_size=1)
        loop = asyncio.get_running_loop()
        jobs = [Job(f"j{i}", None, time.monotonic() + 10, loop) for i in range(3)]
        pool.submit(jobs[0])
        pool.submit(jobs[1])
        with pytest.raises(QueueFull):
            pool.submit(jobs[2])
        gate.set()
        pool.close()

    asyncio.run(main())
    assert done == ["j0", "j1"]


def test_cancelled_stops_generation(model, tokenizer):
    opts = SamplingOptions(max_tokens=5)
    it = generate(model, tokenizer, [1, 2], NullMonitor(), options=opts, cancelled=lambda: True)
    with pytest.raises(Cancelled):
        next(it)
