"""Compare an exported transformers model with ours, AbsTopK decisions accounted for.

Two float32 implementations of the same model differ by rounding (~1e-7 relative per op:
other summation orders in matmuls, norms and attention). Where AbsTopK's k-th and (k+1)-th
largest |x| are closer than that, the two keep different entries, and the logits of that
position (and, through attention, later ones) move by O(0.1). On trained models this happens
at a few positions per thousand tokens, so "logits equal to 1e-5 everywhere" cannot hold for
any second implementation; it says nothing about the export's correctness either way.

So the check is split in two, each strict:

- *given the same selections*, the outputs agree: the transformers model is run with each of
  its AbsTopK sites (the ``sparsify`` objects of the template's modules) replaced by
  :class:`_Forced`, which keeps the entries our model kept at that token;
- *the selections themselves* agree up to near-ties: at every forced site the transformers
  model's own choice is computed too, and wherever it differs from ours, every entry concerned
  must lie within ``tie_rtol`` (relative) of the k-th largest |x| (:class:`TieStats`).

This module relies on the template's attributes (``transformer.h[i].attn.sparsify``,
``.mlp.sparsify`` and ``h[i].sparsify``), which the export ships itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sparsecircuits.circuits.nodes import SITE
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.layers import abstopk_k

# Our hook site holding each location's output (after AbsTopK), for block i.
_SITE = {loc.value: "{i}." + site for loc, site in SITE.items()} | {
    "resid_post_attn": "{i}.resid_mid",
    "resid_post_mlp": "{next}",  # the next block's resid_in, or final_resid
}

Selections = dict[tuple[int, str], torch.Tensor]  # (layer, loc) -> kept (B, T, width) bool
# Outputs agree when |diff| <= ATOL + RTOL * scale, with torch.testing's float32 defaults and
# scale = the largest |value| of that position (its row of logits): two float32 implementations
# with other summation orders differ by a few ulps of the magnitudes summed, not of the result
# (a logit of 2 = 14 from the unembedding - 12 from the bigram table carries the rounding of
# 14). On the shipped models, logits of 15-30 differ by up to ~2e-5 from rounding alone.
ATOL = 1e-5
RTOL = 1.3e-6


def sparse_sites(model: GPT) -> list[tuple[int, str, str]]:
    """(layer, location, our hook site) of every AbsTopK site of ``model``."""
    cfg = model.config
    locs = [] if cfg.afrac is None else [loc for loc in _SITE if loc in cfg.afrac_loctypes]
    out = []
    for i in range(cfg.n_layer):
        nxt = f"{i + 1}.resid_in" if i + 1 < cfg.n_layer else "final_resid"
        out += [(i, loc, _SITE[loc].format(i=i, next=nxt)) for loc in locs]
    return out


@torch.no_grad()
def our_selections(model: GPT, ids: torch.Tensor) -> tuple[torch.Tensor, Selections]:
    """Our logits (B, T, vocab) of ``ids`` (B, T) and the entries each AbsTopK site kept.
    (A kept entry that is exactly 0 counts as dropped: either way its value is 0.)"""
    sites = sparse_sites(model)
    logits, cache = model.run_with_cache(ids, names=[s for _, _, s in sites])
    return logits, {(i, loc): cache[s] != 0 for i, loc, s in sites}


@dataclass
class TieStats:
    """Where the transformers model's own AbsTopK choice differs from ours."""

    rows: int = 0  # (token, site) decisions compared
    flips: int = 0  # of those, where the kept sets differ
    worst_gap: float = 0.0  # largest | |x| - threshold | / threshold over differing entries
    # Where the kept sets agree, the export's AbsTopK output must be x at the kept entries and
    # 0 elsewhere, exactly (it only selects): rows where it is not (a wrong value path that
    # the forced run, which rebuilds the output from x, would hide).
    wrong_values: int = 0

    def add(self, x: torch.Tensor, own_out: torch.Tensor, ours: torch.Tensor, k: int) -> None:
        """x (N, width) the site's input, own_out (N, width) what the export's AbsTopK
        returned, ours (N, width) the entries our model kept."""
        self.rows += x.shape[0]
        own = own_out != 0
        same_set = ((own != ours) & (x != 0)).any(-1).logical_not()
        want = torch.where(ours, x, torch.zeros_like(x))
        self.wrong_values += int(((own_out != want).any(-1) & same_set).sum())
        differ = (own != ours) & (x != 0)
        bad = differ.any(-1)
        if not bool(bad.any()) or not 0 < k < x.shape[-1]:  # no choice made: nothing to judge
            return
        mag = x[bad].abs()
        thr = mag.topk(k, dim=-1).values[:, -1:]  # the k-th largest |x| of each row
        gap = ((mag - thr).abs() / thr.clamp_min(1e-30))[differ[bad]]
        self.flips += int(bad.sum())
        self.worst_gap = max(self.worst_gap, float(gap.max()))


class _Forced:
    """Stands in for one module's ``sparsify``: at forced tokens keeps what we kept, elsewhere
    what the model itself keeps; records how its own choice compares (``stats``). Positions
    advance per call, so a cached generation walks through the masks token by token."""

    def __init__(self, own, layer: int, masks: Selections, forced: torch.Tensor, stats: TieStats):
        self.own, self.layer, self.masks, self.forced, self.stats = own, layer, masks, forced, stats
        self.locs = own.locs
        self.cursor: dict[str, int] = {}

    def __call__(self, x: torch.Tensor, loc: str) -> torch.Tensor:
        own = self.own(x, loc)
        mask = self.masks.get((self.layer, loc))
        if mask is None:  # not a sparse site
            return own
        start = self.cursor.get(loc, 0)
        end = start + x.shape[1]
        self.cursor[loc] = end
        mask, forced = mask[:, start:end], self.forced[:, start:end]  # (B, T, w), (B, T)
        k = abstopk_k(self.own.afrac, x.shape[-1])
        self.stats.add(x[forced], own[forced], mask[forced], k)
        return torch.where(forced[..., None], torch.where(mask, x, 0.0), own)


@contextmanager
def forced_selections(
    hf: torch.nn.Module, masks: Selections, stats: TieStats, *, forced: torch.Tensor | None = None
) -> Iterator[None]:
    """Within the block, ``hf`` (the exported model) keeps our selections ``masks`` at the
    positions ``forced`` (B, T) marks (default all) and records its own in ``stats``."""
    if forced is None:
        some = next(iter(masks.values()), None)
        forced = torch.ones(some.shape[:2] if some is not None else (0, 0), dtype=torch.bool)
    swaps = []
    for i, block in enumerate(hf.transformer.h):
        for module in (block.attn, block.mlp, block):
            swaps.append((module, module.sparsify))
            module.sparsify = _Forced(module.sparsify, i, masks, forced, stats)
    try:
        yield
    finally:
        for module, original in swaps:
            module.sparsify = original


@dataclass
class Diff:
    """How far logits (or any outputs) are from a reference, accumulated over calls."""

    max_abs: float = 0.0  # max |difference| (NaN counts as inf)
    n_over: int = 0  # entries differing by more than ATOL
    n_beyond: int = 0  # entries beyond ATOL + RTOL * scale (what fails a check)
    n: int = 0  # entries compared

    def add(self, ref: torch.Tensor, other: torch.Tensor) -> Diff:
        """Compare ``other`` to ``ref`` (same shape) and accumulate; returns self."""
        d = torch.nan_to_num((other.float() - ref.float()).abs(), nan=torch.inf)
        if d.numel():
            self.max_abs = max(self.max_abs, float(d.max()))
        self.n_over += int((d > ATOL).sum())
        scale = ref.float().abs().amax(dim=-1, keepdim=True) if ref.dim() else ref.abs()
        self.n_beyond += int((d > ATOL + RTOL * scale).sum())
        self.n += d.numel()
        return self

    def merge(self, other: Diff) -> Diff:
        """Accumulate another Diff; returns self."""
        self.max_abs = max(self.max_abs, other.max_abs)
        self.n_over += other.n_over
        self.n_beyond += other.n_beyond
        self.n += other.n
        return self


@torch.no_grad()
def compare_logits(
    model: GPT, hf: torch.nn.Module, ids: torch.Tensor, stats: TieStats
) -> dict[str, Diff]:
    """Logits of ``ids`` (B, T), the export's against ours: ``free`` (each model on its own)
    and ``forced`` (the export keeping our selections)."""
    ours, masks = our_selections(model, ids)
    free = Diff().add(ours, hf(input_ids=ids).logits)
    with forced_selections(hf, masks, stats):
        forced = Diff().add(ours, hf(input_ids=ids).logits)
    return {"free": free, "forced": forced}


@torch.no_grad()
def compare_generate(
    model: GPT, hf: torch.nn.Module, prompts: torch.Tensor, *, max_new_tokens: int, stats: TieStats
) -> dict[str, list[bool]]:
    """Greedy generation of ``prompts`` (B, P): ours (``temperature=0``, cache) against
    transformers' ``generate`` (cache, no stop at EOS), ``free`` and ``forced`` (our
    selections along our continuation), per prompt."""
    ours = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    free = greedy_hf(hf, prompts, max_new_tokens=max_new_tokens)
    _, masks = our_selections(model, ours[:, :-1])  # per token, so valid for the cached steps
    with forced_selections(hf, masks, stats):
        forced = greedy_hf(hf, prompts, max_new_tokens=max_new_tokens)
    same = lambda a, b: [bool(torch.equal(x, y)) for x, y in zip(a, b, strict=True)]  # noqa: E731
    return {"free": same(ours, free), "forced": same(ours, forced)}


@torch.no_grad()
def greedy_hf(hf: torch.nn.Module, prompts: torch.Tensor, *, max_new_tokens: int) -> torch.Tensor:
    """transformers' greedy ``generate`` with the cache, for exactly ``max_new_tokens``."""
    from transformers import GenerationConfig

    # eos_token_id=[] (None would mean "the model's default"): ours never stops early either.
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        eos_token_id=[],
        pad_token_id=hf.config.pad_token_id,
    )
    return hf.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=config)


@torch.no_grad()
def compare_padded(
    model: GPT, hf: torch.nn.Module, rows: list[list[int]], *, pad_id: int, stats: TieStats
) -> dict[str, Diff]:
    """A left-padded batch of ``rows`` through the export against each row alone, at real
    positions: ``free`` (against the export on the row alone, each with its own selections)
    and ``forced`` (our selections of each row alone, against our logits)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    masks: Selections = {}
    ours, alone = [], []
    for b, r in enumerate(rows):
        logits, row_masks = our_selections(model, torch.tensor([r]))
        ours.append(logits[0])
        alone.append(hf(input_ids=torch.tensor([r])).logits[0])
        for key, m in row_masks.items():  # right-aligned; pads keep the export's own choice
            full = masks.setdefault(key, torch.zeros(len(rows), width, m.shape[-1], dtype=bool))
            full[b, width - len(r) :] = m[0]
    free = hf(input_ids=ids, attention_mask=real.long()).logits
    with forced_selections(hf, masks, stats, forced=real):
        forced = hf(input_ids=ids, attention_mask=real.long()).logits
    out = {"free": Diff(), "forced": Diff()}
    for b, r in enumerate(rows):
        out["free"].add(alone[b], free[b, width - len(r) :])
        out["forced"].add(ours[b], forced[b, width - len(r) :])
    return out
