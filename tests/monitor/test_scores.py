"""Engagement and benign scales against hand computations, the dampen intervention's writes,
and the causal share of the planted circuit vs decoy nodes."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.circuits import testing as T
from sparsecircuits.circuits.means import pretrain_windows
from sparsecircuits.monitor.scores import (
    SCALE_FLOOR_FRACTION,
    FamilyNodes,
    benign_scales,
    causal_share,
    dampen_interventions,
    engagement,
)

PROMPT = "x = 'abc"


def _ids(lm, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([lm.tokenizer.encode(text)])


def _record_all(model, idx, fns=None):
    _, cache = model.run_with_cache(idx, interventions=fns)
    return cache


def test_benign_scales_match_a_hand_computation(planted):
    model = planted.model
    windows = pretrain_windows(planted.tokenizer, n_windows=3, length=32)
    # 0.attn.q channel 1 is exactly 0 everywhere (queries are biases, its bias is 0): floored.
    nodes = {"0.attn.k": [0, 4], "1.mlp.post_act": [1, 0], "0.attn.q": [1]}
    got = benign_scales(model, windows, nodes, batch=2)
    cache = _record_all(model, windows)
    for site, idx in nodes.items():
        a = cache[site].abs().reshape(-1, cache[site].shape[-1])  # (positions, width)
        per_channel = [sum(float(a[p, c]) for p in range(a.shape[0])) / a.shape[0]
                       for c in range(a.shape[1])]  # fmt: skip
        floor = max(SCALE_FLOOR_FRACTION * sum(per_channel) / len(per_channel), 1e-6)
        want = [max(per_channel[c], floor) for c in idx]
        assert got[site].tolist() == pytest.approx(want, rel=1e-5), site
    assert float(got["0.attn.q"][0]) > 0  # the floor, not 0


def test_engagement_matches_a_hand_computation(planted, catalog):
    fam = catalog.family_nodes("quotes")
    f = catalog.families["quotes"]
    cache = _record_all(planted.model, _ids(planted))
    e = engagement(cache, fam)
    n_tok = _ids(planted).shape[1]
    assert e.shape == (1, n_tok)
    for t in range(n_tok):
        terms = [abs(float(cache[site][0, t, c])) / f.scale[site][j]
                 for site, idx in f.nodes.items() for j, c in enumerate(idx)]  # fmt: skip
        assert len(terms) == len(T.PLANTED)
        assert float(e[0, t]) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # A second hand check with made-up numbers: two sites, three nodes.
    toy = FamilyNodes("toy", {"a": torch.tensor([0, 2]), "b": torch.tensor([1])},
                      {"a": torch.tensor([2.0, 0.5]), "b": torch.tensor([4.0])},
                      {"a": torch.zeros(2), "b": torch.zeros(1)})  # fmt: skip
    acts = {"a": torch.tensor([[[1.0, 9.0, -1.0]]]), "b": torch.tensor([[[7.0, -8.0]]])}
    assert float(engagement(acts, toy)) == pytest.approx((1 / 2 + 1 / 0.5 + 8 / 4) / 3)


def _writes(fns, cache) -> dict[str, torch.Tensor]:
    """For each intervened site: the (channel) indices whose values the intervention changes
    at any position of ``cache``'s activations."""
    out = {}
    for site, fn in fns.items():
        x = cache[site]
        changed = (fn(x) != x).flatten(0, -2).any(0)
        out[site] = changed.nonzero().flatten()
    return out


@pytest.mark.parametrize(("mode", "factor"), [("scale", 0.5), ("scale", 0.0), ("mean_ablate", 0)])
def test_dampen_writes_only_the_familys_nodes(planted, catalog, mode, factor):
    fam = catalog.family_nodes("quotes")
    idx = _ids(planted, "f('hello world")
    fns = dampen_interventions(fam, mode=mode, factor=factor)
    assert set(fns) == set(fam.sites)  # no intervention anywhere else
    # Inspect every value each intervention writes, on the activations it sees in a pass.
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def spy(site, fn):
        def run(x):
            y = fn(x)
            seen[site] = (x.clone(), y.clone())
            return y

        return run

    dampened = _record_all(planted.model, idx, {s: spy(s, fn) for s, fn in fns.items()})
    plain = _record_all(planted.model, idx)
    for site in fam.sites:
        x, y = seen[site]
        family = fam.index[site]
        others = torch.ones(x.shape[-1], dtype=torch.bool)
        others[family] = False
        assert torch.equal(y[..., others], x[..., others]), site  # bit-identical elsewhere
        want = x[..., family] * factor if mode == "scale" else fam.mean[site].expand_as(
            x[..., family])  # fmt: skip
        assert torch.equal(y[..., family], want), site
        assert torch.equal(dampened[site], y)  # recorded after the intervention
    # Sites before the first dampened one see exactly the plain pass.
    first = min(planted.model.hook_names().index(s) for s in fam.sites)
    for site in planted.model.hook_names()[:first]:
        assert torch.equal(dampened[site], plain[site]), site


def test_the_write_inspection_catches_a_foreign_write(planted, catalog):
    """The check above can fail: dampening the decoys writes channels outside the family."""
    fam = catalog.family_nodes("quotes")
    cache = _record_all(planted.model, _ids(planted))
    own = _writes(dampen_interventions(fam, mode="scale", factor=0.0), cache)
    for site, changed in own.items():
        assert set(changed.tolist()) <= set(fam.index[site].tolist())
    site = "0.attn.act_in"
    decoy = FamilyNodes(
        "decoy", {site: torch.tensor([T.CONST])}, {site: torch.ones(1)}, {site: torch.zeros(1)}
    )
    foreign = _writes(dampen_interventions(decoy, mode="scale", factor=0.0), cache)
    assert not set(foreign["0.attn.act_in"].tolist()) <= set(fam.index["0.attn.act_in"].tolist())


def test_causal_share_of_the_planted_circuit_and_of_decoys(planted, catalog):
    fam = catalog.family_nodes("quotes")
    answers = catalog.answers("quotes")
    idx = _ids(planted)
    emitted = planted.tokenizer.encode("'")[0]
    share = causal_share(planted.model, idx, emitted, fam, answers=answers)
    (a, b) = answers[T.TASK]
    full = planted.model(idx)[0][0, -1]
    assert share["logprob_change"] > 0.5  # the circuit made the closing quote likely
    assert abs(share["logit_diff_change"][T.TASK]) > 1.0
    assert abs(share["logit_diff_change"][T.TASK]) <= abs(float(full[a] - full[b])) * 1.5
    decoys = {}
    for n in T.DECOYS:
        decoys.setdefault(n.site, []).append(n.index)
    decoy = FamilyNodes(  # ablated to zero: the decoys carry nothing the answer needs
        "decoys", {s: torch.tensor(v) for s, v in decoys.items()},
        {s: torch.ones(len(v)) for s, v in decoys.items()},
        {s: torch.zeros(len(v)) for s, v in decoys.items()},
    )  # fmt: skip
    low = causal_share(planted.model, idx, emitted, decoy, answers=answers)
    assert abs(low["logit_diff_change"][T.TASK]) < 0.5 * abs(share["logit_diff_change"][T.TASK])


def test_causal_share_equals_a_hand_built_mean_ablation(planted, catalog):
    """Against an ablation written in the test: each family node replaced by its stored mean at
    its hook site, every other node untouched; signs are full minus ablated (a sign flip or
    zero- instead of mean-ablation fails)."""
    model = planted.model
    fam = catalog.family_nodes("quotes")
    answers = catalog.answers("quotes")
    idx = _ids(planted)
    emitted = planted.tokenizer.encode("'")[0]

    def by_hand(site):
        def fn(x):
            out = x.clone()
            out[..., fam.index[site]] = fam.mean[site].to(x.dtype)
            return out

        return fn

    full = model(idx)[0][0, -1].float()
    abl = model.run_with_hooks(idx, interventions={s: by_hand(s) for s in fam.sites})[0, -1]
    (a, b) = answers[T.TASK]
    share = causal_share(model, idx, emitted, fam, answers=answers)
    want_lp = float(full.log_softmax(-1)[emitted] - abl.float().log_softmax(-1)[emitted])
    want_ld = float((full[a] - full[b]) - (abl[a] - abl[b]))
    assert share["logprob_change"] == pytest.approx(want_lp, abs=1e-4)
    assert share["logit_diff_change"][T.TASK] == pytest.approx(want_ld, abs=1e-4)
    assert any(float(m.abs().max()) > 0 for m in fam.mean.values())  # means are not all zero


def test_the_all_families_scorer_equals_engagement_per_family(planted, catalog):
    from sparsecircuits.monitor.scores import FamilyScorer

    fams = {n: catalog.family_nodes(n) for n in catalog.monitored()}
    # a second family sharing some of the first one's nodes and sites
    q = fams["quotes"]
    half = {s: i[: max(1, len(i) // 2)] for s, i in q.index.items()}
    fams["half"] = FamilyNodes(
        "half", half, {s: q.scale[s][: len(half[s])] for s in half},
        {s: q.mean[s][: len(half[s])] for s in half},
    )  # fmt: skip
    scorer = FamilyScorer(fams)
    _, cache = planted.model.run_with_cache(_ids(planted), names=scorer.sites)
    got = scorer(cache)  # (1, T, F)
    for j, name in enumerate(scorer.names):
        torch.testing.assert_close(got[..., j], engagement(cache, fams[name]), atol=1e-6, rtol=0)
