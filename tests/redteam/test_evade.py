"""``evade`` against the family's rules or a dense probe: text after the target, the probe's
folded read-out against the fitted regression, its gradient candidates against exhaustive
evaluation, and hits that the probe itself (computed independently) does not flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsecircuits.errors import InputError
from sparsecircuits.model.hooks import Hooks
from sparsecircuits.monitor.detect_metrics import fit_logistic
from sparsecircuits.redteam.objective import LinearProbe
from sparsecircuits.redteam.search import Searcher, allowed_tokens
from sparsecircuits.redteam.template import Template
from tests.redteam.test_search import _objective, model, tok  # noqa: F401 (fixtures)

SITE = "0.resid_mid"
T = Template(prefix="x = '", span_tokens=3, target="'", after="; y = 1\n", min_target_prob=0.01)


def _pooled(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: F811
    hooks = Hooks(cache_names=[SITE])
    with torch.no_grad():
        model(ids, hooks=hooks)
    return hooks.cache[SITE].float().mean(1)  # (B, d_model)


def _probe(model, tok, threshold: float | None = None):  # noqa: F811
    """A probe fitted on random texts labelled by whether they hold a quote (its threshold:
    the median logit of those texts unless given)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(tok.vocab_size, (40, 12), generator=gen)
    y = np.array([float("'" in tok.decode(r.tolist())) for r in ids])
    y[:2] = [0.0, 1.0]  # both classes present
    x = _pooled(model, ids).double().numpy()
    lr = fit_logistic(x, y, l2=0.1)
    t = float(np.median(lr.decision(x))) if threshold is None else threshold
    return LinearProbe.folded(site=SITE, w=lr.w, b=lr.b, mu=lr.mu, sd=lr.sd, threshold=t), lr


def test_folded_probe_is_the_fitted_regression(model, tok):  # noqa: F811
    probe, lr = _probe(model, tok)
    ids = torch.randint(tok.vocab_size, (6, 9), generator=torch.Generator().manual_seed(1))
    hooks = Hooks(cache_names=[SITE])
    with torch.no_grad():
        model(ids, hooks=hooks)
    expected = lr.decision(_pooled(model, ids).double().numpy())
    assert np.allclose(probe.logit(hooks.cache).numpy(), expected, atol=1e-3)


def test_text_after_the_target_is_read_but_not_part_of_the_behaviour(model, tok):  # noqa: F811
    obj = _objective(model, "evade")
    s = Searcher(obj, tok, T)
    lay = s.layout
    assert lay.tgt_end - lay.tgt == len(tok.encode("'")) and lay.length > lay.tgt_end
    span = s.allowed[:3]
    ids = s.ids(span[None])
    assert tok.decode(ids[0].tolist()) == T.text(tok.decode(span.tolist()))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0][0].float(), -1)
    want = sum(float(logp[p - 1, ids[0, p]]) for p in range(lay.tgt, lay.tgt_end))
    assert float(obj.score(ids, lay).target_logprob[0]) == pytest.approx(want, abs=1e-4)
    assert T.text("a").endswith("'; y = 1\n")
    with pytest.raises(InputError, match="'after' follows the target"):
        Searcher(obj, tok, Template(prefix="x", span_tokens=2, after="y"))


def gradient_vs_exhaustive(obj, tok, template: Template, seed: int):  # noqa: F811
    """For every single swap of a seeded start span: (the one-hot gradient's predicted change,
    the exact change of the objective), both flattened over positions and tokens, and their
    rank correlation."""
    s = Searcher(obj, tok, template, topk=len(allowed_tokens(tok, template)))
    base = s.initial(torch.Generator().manual_seed(seed))
    (start,) = s.evaluate(base[None], 0)
    g = obj.gradient(s.ids(base[None]), s.layout)
    pred, exact = [], []
    for p in range(len(base)):
        spans = base.expand(len(s.allowed), -1).clone()
        spans[:, p] = s.allowed
        exact.append(obj.score(s.ids(spans), s.layout).loss - start.loss)
        pred.append(g[p, s.allowed] - g[p, base[p]])
    pred_t, exact_t = torch.cat(pred), torch.cat(exact)
    ranks = lambda v: v.argsort().argsort().float()  # noqa: E731
    rho = float(torch.corrcoef(torch.stack([ranks(pred_t), ranks(exact_t)]))[0, 1])
    return pred_t, exact_t, rho


def test_probe_gradient_candidates_agree_with_exhaustive_evaluation(model, tok):  # noqa: F811
    probe, _ = _probe(model, tok, threshold=-50.0)  # always over: the probe term is active
    obj = _objective(model, "evade")
    obj.probe = probe
    pred_t, exact_t, rho = gradient_vs_exhaustive(obj, tok, T, 2)
    assert rho > 0.1, rho  # first order through attention and norms: noisy, as GCG's
    quarter = len(pred_t) // 4
    best = set(exact_t.argsort()[:quarter].tolist())
    chosen = set(pred_t.argsort()[:quarter].tolist())
    assert len(best & chosen) > quarter // 4  # a random quarter holds about a quarter


def test_evade_hits_are_unflagged_by_the_probe_itself(model, tok):  # noqa: F811
    probe, lr = _probe(model, tok)
    obj = _objective(model, "evade")
    obj.probe = probe
    s = Searcher(obj, tok, T, batch=16, topk=16)
    res = s.run(mode="gcg", budget=128, seed=0)
    assert res.hits
    for h in res.hits:
        ids = s.ids(torch.tensor([h.span_ids]))
        logit = float(lr.decision(_pooled(model, ids).double().numpy())[0])
        assert logit <= probe.threshold + 1e-3 and not h.flagged
        assert h.target_logprob >= np.log(T.min_target_prob) - 1e-6
    # The criterion mutated: a probe that flags everything leaves nothing to report.
    obj.probe = LinearProbe(probe.site, probe.weight, probe.bias, threshold=-1e9)
    assert not s.run(mode="gcg", budget=64, seed=0).hits


def _share_objective(model, kind: str = "engage"):  # noqa: F811
    obj = _objective(model, kind)
    obj.measure = "causal_share"
    return obj


def test_causal_share_measure_is_the_servers_causal_share(model, tok):  # noqa: F811
    """At every position the measure equals ``monitor.scores.causal_share`` (the server's
    telemetry) for the token there, computed on the prefix alone by a separate pass."""
    from sparsecircuits.monitor.scores import causal_share

    obj = _share_objective(model)
    s = Searcher(obj, tok, T)
    ids = s.ids(s.initial(torch.Generator().manual_seed(0))[None])
    with torch.no_grad():
        _, eng = obj._run(model.embed(ids), ids, detach=True)
    share = obj._measured(eng)[0]
    assert share[0] == float("-inf")
    for p in range(1, ids.shape[1]):
        want = causal_share(model, ids[:, :p], int(ids[0, p]), obj.family, answers={})
        assert float(share[p]) == pytest.approx(want["logprob_change"], abs=1e-4)
    assert float(share[1:].abs().max()) > 1e-4  # the family's nodes matter at all


def test_causal_share_hits_pass_the_threshold_and_the_criterion_can_fail(model, tok):  # noqa: F811
    obj = _share_objective(model)
    obj.benign_max = (0.0, 1e-3)  # planted: a share above 1e-3 nats is a hit
    s = Searcher(obj, tok, T, batch=16, topk=16)
    res = s.run(mode="gcg", budget=64, seed=0)
    assert res.hits and all(h.value > 1e-3 for h in res.hits)
    for h in res.hits[:3]:
        with torch.no_grad():
            ids = s.ids(torch.tensor([h.span_ids]))
            _, eng = obj._run(model.embed(ids), ids, detach=True)
        assert float(obj._measured(eng)[0, s.layout.span_lo :].max()) == pytest.approx(h.value)
    obj.benign_max = (0.0, 1e9)  # mutated: no share is that large
    assert not s.run(mode="gcg", budget=64, seed=0).hits


def test_a_causal_share_scan_says_so_in_its_reports(tmp_path):
    from typer.testing import CliRunner

    from sparsecircuits.cli import app
    from sparsecircuits.redteam.report import read_report

    out = tmp_path / "scan"
    r = CliRunner().invoke(app, ["scan", "--family", "brackets", "--objective", "suppress",
                                 "--measure", "causal-share", "--budget", "16", "--out",
                                 str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "causal-share threshold" in r.output
    probe = next(e for e in read_report(out / "report.jsonl") if e["entry_type"] == "attempt")
    assert probe["probe_params"]["measure"] == "causal_share"
    assert "causal share down" in probe["goal"]
    r = CliRunner().invoke(app, ["scan", "--family", "brackets", "--objective", "evade",
                                 "--measure", "causal-share"])  # fmt: skip
    assert isinstance(r.exception, InputError) and "--measure" in str(r.exception)


def test_rule_evade_gradient_candidates_agree_with_exhaustive_evaluation(model, tok):  # noqa: F811
    """evade against the family's k-of-n rules: the first term (z over each rule's threshold)
    is active everywhere with a rule at z = -50, and the gradient ranks swaps with it."""
    from sparsecircuits.monitor.calibrate import FlagRule

    obj = _objective(model, "evade")
    obj.rules = [FlagRule.model_construct(z=-50.0, k=1, n=1)]  # below every z: always over
    _, _, rho = gradient_vs_exhaustive(obj, tok, T, 2)
    assert rho > 0.1, rho
