"""What circuit telemetry costs per generated token: p50/p99 ms per token of the server's
generation loop (``serve.engine.generate``: KV cache, the monitor's hooks and ``observe`` on
every pass) for three monitors on the same model, interleaved in one run.

- ``plain``: ``NullMonitor`` (records nothing): the server without a catalogue;
- ``telemetry``: ``CircuitMonitorFactory`` with a log-only policy (one ``log`` rule per
  monitored family: engagement, z and the k-of-n rules on every token, nothing changes the
  generation);
- ``+causal``: the same plus each family's causal share (``scores.causal_share``: two re-runs of
  the prefix without the KV cache, full and family-ablated) for every ``--causal-every``-th
  generated token (default 1: every token), measured on the prefix before that token.

Greedy decoding, batch 1, the first ``--prompt-tokens`` tokens of a stdlib file as the prompt.
A token's time is the wall time between two consecutive chunks of the generator (sampling, its
forward pass, ``observe``); the first chunk (prefill included) is left out. Per round every
variant generates once (order rotated each round, so no variant always runs first); per round
and variant the p50, p99 and mean over its tokens, then the median over rounds. The ratio to
``plain`` is the median over rounds of the per-round p50 ratio. The run also checks that every
variant produced the same text (a log-only policy must not change the generation).

    python benchmarks/monitor_overhead.py --catalog runs/monitor [--model stdlib-sparse]
        [--baseline CAT/baseline.json] [--prompt-tokens 56] [--new-tokens 64] [--rounds 7]
        [--causal-every 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _timing import machine

from sparsecircuits.circuits.pipeline import load_for_circuits
from sparsecircuits.data.corpus import stdlib_dir
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks
from sparsecircuits.monitor.calibrate import BASELINE_FILE, load_baseline
from sparsecircuits.monitor.catalog import load_catalog
from sparsecircuits.monitor.live import CircuitMonitorFactory
from sparsecircuits.monitor.policy import load_policy
from sparsecircuits.monitor.runtime import Decision, NullMonitor, RequestMonitor
from sparsecircuits.monitor.scores import FamilyNodes, causal_share
from sparsecircuits.serve.engine import SamplingOptions, generate


class CausalShareMonitor:
    """A ``RequestMonitor`` that adds each family's causal share to another monitor's telemetry
    for every ``every``-th generated token (on the prefix before the token: the change in that
    token's log-probability and in the family's task logit differences)."""

    def __init__(
        self,
        inner: RequestMonitor,
        model: GPT,
        families: dict[str, FamilyNodes],
        answers: dict[str, dict[str, tuple[int, int]]],
        every: int,
    ) -> None:
        self.inner, self.model, self.families, self.answers = inner, model, families, answers
        self.every = every
        self.ids: list[int] = []
        self.generated = 0
        self.shares: list[dict[str, object]] = []

    def hooks(self) -> Hooks:
        return self.inner.hooks()

    def observe(self, cache: dict[str, torch.Tensor], token_ids: list[int]) -> Decision:
        first = not self.ids  # the prompt's pass: no generated token to explain yet
        self.ids += token_ids
        decision = self.inner.observe(cache, token_ids)
        if not first:
            self.generated += 1
            if (self.generated - 1) % self.every == 0:
                block = self.model.config.block_size
                prefix = torch.tensor([self.ids[:-1][-block:]])
                for name, fam in self.families.items():
                    self.shares.append(causal_share(self.model, prefix, self.ids[-1], fam,
                                                    answers=self.answers[name]))  # fmt: skip
        return decision

    def telemetry(self) -> dict[str, Any]:
        return {**self.inner.telemetry(), "causal_share": self.shares}


def run_once(lm, prompt: list[int], monitor: RequestMonitor, n_new: int) -> tuple[list, str]:
    """Generate greedily; returns (seconds per token after the first chunk, text)."""
    opts = SamplingOptions(max_tokens=n_new, temperature=0.0, seed=0)
    stamps, text = [], []
    for chunk in generate(lm.model, lm.tokenizer, prompt, monitor, options=opts):
        stamps.append(time.perf_counter())
        text.append(chunk.text)
    return list(np.diff(stamps)), "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stdlib-sparse")
    ap.add_argument("--catalog", required=True, help="catalogue directory or catalog.json")
    ap.add_argument("--baseline", help="baseline.json (default: the catalogue directory's)")
    ap.add_argument("--prompt-tokens", type=int, default=56)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--causal-every", type=int, default=1,
                    help="causal share on every N-th generated token (1: each token)")  # fmt: skip
    args = ap.parse_args()
    if args.causal_every < 1 or args.new_tokens < 3 or args.rounds < 1:
        raise SystemExit("--causal-every >= 1, --new-tokens >= 3 and --rounds >= 1")
    torch.manual_seed(0)
    lm = load_for_circuits(args.model)
    cat = load_catalog(args.catalog, lm.model)
    cat_dir = Path(args.catalog) if Path(args.catalog).is_dir() else Path(args.catalog).parent
    baseline = load_baseline(Path(args.baseline) if args.baseline else cat_dir / BASELINE_FILE)
    fams = cat.monitored()
    policy_file = Path(tempfile.mkdtemp(prefix="sc-bench-mon-")) / "log-only.yaml"
    policy_file.write_text("version: 1\nrules:\n" + "".join(
        f"  - {{name: log-{n}, family: {n}, action: log}}\n" for n in fams))  # fmt: skip
    policy = load_policy(policy_file, families=fams)
    factory = CircuitMonitorFactory(lm.model, cat, baseline, policy)
    answers = {n: cat.answers(n) for n in fams}
    text = (stdlib_dir() / "textwrap.py").read_text(encoding="utf-8")
    prompt = lm.tokenizer.encode(text)[: args.prompt_tokens]
    if args.prompt_tokens + args.new_tokens > lm.model.config.block_size:
        print("note: prompt + new tokens exceed the context; later passes slide the window")

    starts = {
        "plain": lambda: NullMonitor("bench"),
        "telemetry": lambda: factory.start("bench"),
        "+causal": lambda: CausalShareMonitor(factory.start("bench"), lm.model,
                                              factory.families, answers, args.causal_every),
    }  # fmt: skip
    names = list(starts)
    texts: dict[str, str] = {}
    with torch.no_grad():
        for name in names:  # warm-up: first-touch allocations, kernel crossovers
            run_once(lm, prompt, starts[name](), args.new_tokens)
        p50: dict[str, list[float]] = {n: [] for n in names}
        p99: dict[str, list[float]] = {n: [] for n in names}
        mean: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                dt, texts[name] = run_once(lm, prompt, starts[name](), args.new_tokens)
                ms = 1000 * np.asarray(dt[1:])  # dt[0] is the first chunk after the prefill's
                p50[name].append(float(np.percentile(ms, 50)))
                p99[name].append(float(np.percentile(ms, 99)))
                mean[name].append(float(ms.mean()))
    same = len(set(texts.values())) == 1
    n_tok = len(dt) - 1
    print(machine())
    every = "every" if args.causal_every == 1 else f"1 in {args.causal_every}"
    print(f"model {args.model}; {len(prompt)}-token prompt, {args.new_tokens} new tokens "
          f"(greedy, batch 1; {n_tok} timed per request); {args.rounds} rounds; families "
          f"{', '.join(fams)}; +causal: causal share on {every} generated token(s)")  # fmt: skip
    # The mean shows what a sampled causal share costs on average (p50 can skip its tokens).
    head = ("variant", "p50 ms/token", "p99 ms/token", "mean ms/token", "p50 vs plain")
    print(f"{head[0]:<10} " + " ".join(f"{h:>13}" for h in head[1:]))
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(p50[name], p50["plain"], strict=True))
        print(f"{name:<10} {statistics.median(p50[name]):>13.3f} "
              f"{statistics.median(p99[name]):>13.3f} {statistics.median(mean[name]):>13.3f} "
              f"{ratio:>12.3f}x")  # fmt: skip
    ro = statistics.median(a / b for a, b in zip(p50["telemetry"], p50["plain"], strict=True))
    verdict = "meets" if ro <= 1.05 else "misses"
    print(f"read-only telemetry: {100 * (ro - 1):+.1f}% over plain at p50 ({verdict} the goal "
          f"of <= 5%)" + ("" if same else "   TEXTS DIFFER"))  # fmt: skip


if __name__ == "__main__":
    main()
