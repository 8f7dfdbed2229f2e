"""The search over span tokens: GCG-style gradient candidates, an evolutionary mode without
gradients, and random search (the baseline), all with the same budget of candidate
evaluations and the same constraints.

- ``gcg``: per step, the gradient of the objective with respect to the span's one-hot tokens
  gives each position's ``topk`` most promising replacements; ``batch`` candidates, each one
  swap drawn from those, are scored exactly; the best replaces the current span if it is
  better.
- ``evolve``: a population of spans; per generation each child is a parent with one or two
  random swaps; the best ``population`` of parents and children survive.
- ``random``: per step, ``batch`` random single swaps of the current span; the best is kept if
  better (greedy random search).

Every candidate holds the constraints by construction (no forbidden token is ever proposed);
Python validity and fluency are checked on each candidate and one failing them is not a hit.
Seeded: the same arguments give the same hits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.errors import InputError
from sparsecircuits.redteam.objective import CircuitObjective, Layout
from sparsecircuits.redteam.template import Template

log = logging.getLogger("sparsecircuits.redteam")
Mode = Literal["gcg", "evolve", "random"]


@dataclass(frozen=True)
class Found:
    """One scored candidate: its span ids and text and what the objective saw."""

    span_ids: tuple[int, ...]
    span: str
    loss: float
    value: float  # the measure's largest value from the span on (engagement or causal share)
    engagement: float
    max_z: float
    flagged: bool
    target_logprob: float
    fluency: float
    python_valid: bool | None  # None: the template does not ask
    fluent: bool
    forbidden_ok: bool  # no forbidden string in the text the span adds
    retokenizes: bool  # the reported text encodes back to exactly these tokens
    hit: bool
    evaluations: int  # evaluations spent when it was found


@dataclass
class SearchResult:
    best: Found
    hits: list[Found] = field(default_factory=list)  # distinct spans, in the order found
    trajectory: list[Found] = field(default_factory=list)  # the best after each step
    evaluations: int = 0
    seconds: float = 0.0
    # No candidate encoded back to its own tokens (the span's edges merged with the text
    # around it): no hit was possible on this search's path; another seed may fare better.
    none_retokenized: bool = False


def allowed_tokens(tok: Tokenizer, template: Template) -> torch.Tensor:
    """Token ids a span may use: not end-of-text, not a token whose text contains a
    forbidden string (or is not valid UTF-8 on its own). A constraint set that leaves none is
    an error."""
    ok = []
    for i in range(tok.vocab_size):
        if i == tok.eot_id:
            continue
        try:
            text = tok.id_to_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not any(f and f in text for f in template.forbidden):
            ok.append(i)
    if not ok:
        raise InputError("template: the forbidden strings leave no token a span could use")
    return torch.tensor(ok, dtype=torch.long)


class Searcher:
    """Runs searches of one objective over one template."""

    def __init__(
        self,
        objective: CircuitObjective,
        tok: Tokenizer,
        template: Template,
        *,
        batch: int = 64,
        topk: int = 64,
        population: int = 16,
    ) -> None:
        self.obj, self.tok, self.t = objective, tok, template
        self.batch, self.topk, self.population = batch, topk, population
        # Constraints some candidate met: one none met is an impossible set, said in one line
        self._valid_seen = self._fluent_seen = self._retok_seen = False
        self._best_fluency = float("inf")
        self.allowed = allowed_tokens(tok, template)
        self.mask = torch.zeros(tok.vocab_size, dtype=torch.bool)
        self.mask[self.allowed] = True
        self.prefix = tok.encode(template.prefix)
        self.suffix = tok.encode(template.suffix)
        self.target = tok.encode(template.target) if template.target else []
        self.after = tok.encode(template.after) if template.after else []
        if self.after and not self.target:
            raise InputError("template: 'after' follows the target, and there is no 'target'")
        if objective.objective == "evade" and not self.target:
            raise InputError("template: evade needs a 'target' (the behaviour to keep)")
        if objective.objective == "evade" and not self.prefix:
            raise InputError("template: evade needs a 'prefix' (the target is predicted)")
        if template.max_fluency_nats is not None and not self.prefix:
            raise InputError("template: max_fluency_nats needs a 'prefix' (the span's first "
                             "token is scored from the text before it)")  # fmt: skip
        n = (len(self.prefix) + template.span_tokens + len(self.suffix) + len(self.target)
             + len(self.after))  # fmt: skip
        block = objective.model.config.block_size
        if n > block:
            raise InputError(f"template: {n} tokens do not fit the model's context ({block})")
        lo = len(self.prefix)
        hi = lo + template.span_tokens
        tgt = hi + len(self.suffix)
        self.layout = Layout(lo, hi, tgt, tgt + len(self.target), n)

    def ids(self, spans: torch.Tensor) -> torch.Tensor:
        """Candidates' ids (B, T) from spans (B, span)."""
        b = len(spans)
        parts = [torch.tensor([p], dtype=torch.long).expand(b, -1)
                 for p in (self.prefix, self.suffix, self.target + self.after)]  # fmt: skip
        return torch.cat([parts[0], spans, parts[1], parts[2]], dim=1)

    def initial(self, gen: torch.Generator) -> torch.Tensor:
        """The starting span: ``init`` re-tokenised and cut or padded with allowed tokens."""
        want = self.t.span_tokens
        ids = [i for i in self.tok.encode(self.t.init or "") if self.mask[i]][:want]
        pad = self.allowed[torch.randint(len(self.allowed), (want - len(ids),), generator=gen)]
        return torch.tensor(ids + pad.tolist(), dtype=torch.long)

    def evaluate(self, spans: torch.Tensor, spent: int) -> list[Found]:
        ids = self.ids(spans)
        s = self.obj.score(ids, self.layout)
        out = []
        for j in range(len(spans)):
            span_ids = tuple(spans[j].tolist())
            text = self.tok.decode(span_ids)
            py = self.t.python_ok(text)
            fluent = (self.t.max_fluency_nats is None
                      or float(s.fluency[j]) <= self.t.max_fluency_nats)  # fmt: skip
            clean = self.t.forbidden_ok(text)
            # The server tokenises the text: a hit must be one for the text's own tokens.
            same = self.tok.encode(self.t.text(text)) == ids[j].tolist()
            ok = py is not False and fluent and clean and same
            self._valid_seen |= py is True
            self._fluent_seen |= fluent
            self._best_fluency = min(self._best_fluency, float(s.fluency[j]))
            self._retok_seen |= same
            out.append(Found(span_ids, text, float(s.loss[j]), float(s.value[j]),
                             float(s.engagement[j]),
                             float(s.max_z[j]), bool(s.flagged[j]), float(s.target_logprob[j]),
                             float(s.fluency[j]), py, fluent, clean, same,
                             ok and self._hit(s, j), spent + j + 1))  # fmt: skip
        return out

    def _hit(self, s, j: int) -> bool:
        o = self.obj
        if o.objective == "engage":
            return float(s.value[j]) > o.threshold()
        if o.objective == "suppress":
            return float(s.value[j]) < o.threshold()
        return not bool(s.flagged[j]) and float(s.target_logprob[j]) >= o.log_min_p

    def run(self, *, mode: Mode, budget: int, seed: int,
            stop: Callable[[SearchResult], bool] | None = None) -> SearchResult:  # fmt: skip
        """Search with at most ``budget`` candidate evaluations (the start included)."""
        if budget < 1:
            raise InputError("--budget must be >= 1")
        gen = torch.Generator().manual_seed(seed)
        self._valid_seen = self._fluent_seen = self._retok_seen = False
        self._best_fluency = float("inf")
        t0 = time.perf_counter()
        cur = self.initial(gen)
        (best,) = self.evaluate(cur[None], 0)
        res = SearchResult(best=best, evaluations=1)
        self._note(res, [best])
        pop, cur, seen = [best], best, {best.span_ids}
        dry = 0  # proposal rounds that brought nothing new (all seen before)
        while res.evaluations < budget and not (stop and stop(res)) and dry < 8:
            n = min(self.batch, budget - res.evaluations)
            if mode == "evolve":
                spans = self._children(pop, n, gen)
            else:
                base = torch.tensor(cur.span_ids)
                spans = self._swaps(base, n, gen, grad=mode == "gcg")
            spans = self._new(spans, seen)  # a repeat costs nothing and is not counted
            if not len(spans):
                dry += 1
                continue
            dry = 0
            found = self.evaluate(spans, res.evaluations)
            res.evaluations += len(spans)
            self._note(res, found)
            top = min(found, key=lambda f: f.loss)
            if mode == "evolve":
                pop = sorted(pop + found, key=lambda f: f.loss)[: self.population]
            elif (
                mode == "gcg" or top.loss < cur.loss
            ):  # as GCG's Algorithm 1: move to the batch's best
                cur = top
            if top.loss < res.best.loss:
                res.best = top
            res.trajectory.append(res.best)
        res.seconds = time.perf_counter() - t0
        self._check_possible(res.evaluations)
        res.none_retokenized = not self._retok_seen
        return res

    def _check_possible(self, n: int) -> None:
        """One line when no candidate of the search met a constraint the template sets: the
        set is impossible (or the bound out of reach), which an empty result would hide."""
        why = None
        if self.t.python_valid and not self._valid_seen:
            why = "makes the text parse as Python: prefix, suffix and target may allow no span"
        elif not self._fluent_seen:
            why = (f"meets max_fluency_nats {self.t.max_fluency_nats:g} (the most fluent: "
                   f"{self._best_fluency:.2f} nats/token)")  # fmt: skip
        if why:
            raise InputError(f"template: none of the {n} candidates scored {why}")

    @staticmethod
    def _new(spans: torch.Tensor, seen: set[tuple[int, ...]]) -> torch.Tensor:
        """The spans not scored before, each once (``seen`` is updated)."""
        keep = []
        for j, row in enumerate(spans.tolist()):
            key = tuple(row)
            if key not in seen:
                seen.add(key)
                keep.append(j)
        return spans[keep]

    def _note(self, res: SearchResult, found: list[Found]) -> None:
        seen = {h.span_ids for h in res.hits}
        for f in found:
            if f.hit and f.span_ids not in seen:
                res.hits.append(f)
                seen.add(f.span_ids)

    def _swaps(self, base: torch.Tensor, n: int, gen: torch.Generator, *, grad: bool):
        """``n`` copies of ``base``, each with one position replaced: by one of that
        position's ``topk`` gradient candidates (gcg), or by any allowed token (random)."""
        span = len(base)
        pos = torch.randint(span, (n,), generator=gen)
        if grad:
            cands = self.candidates(base)  # (span, topk): never the token already there
            pick = torch.randint(cands.shape[1], (n,), generator=gen)
            new = cands[pos, pick]
        else:
            new = self.allowed[torch.randint(len(self.allowed), (n,), generator=gen)]
        spans = base.expand(n, -1).clone()
        spans[torch.arange(n), pos] = new
        return spans

    def candidates(self, base: torch.Tensor) -> torch.Tensor:
        """Per span position, the ``topk`` allowed tokens whose swap the gradient says lowers
        the objective most: (span, topk)."""
        g = self.obj.gradient(self.ids(base[None]), self.layout).float()  # (span, vocab)
        g = g.masked_fill(~self.mask, float("inf"))
        g[torch.arange(len(base)), base] = float("inf")  # a swap to itself changes nothing
        k = min(self.topk, len(self.allowed) - 1)
        return (-g).topk(k, dim=-1).indices

    def _children(self, pop: list[Found], n: int, gen: torch.Generator) -> torch.Tensor:
        parents = torch.tensor([p.span_ids for p in pop])
        pick = parents[torch.randint(len(pop), (n,), generator=gen)].clone()
        rows = torch.arange(n)
        for second in (False, True):  # one swap each, a second for half of them
            pos = torch.randint(pick.shape[1], (n,), generator=gen)
            new = self.allowed[torch.randint(len(self.allowed), (n,), generator=gen)]
            keep = (torch.rand(n, generator=gen) < 0.5) & second
            pick[rows, pos] = torch.where(keep, pick[rows, pos], new)
        return pick
