"""The scan's search: gradient candidates against an independent first-order computation and
exhaustive evaluation, batched scoring against one-at-a-time, constraints on every hit,
determinism, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsecircuits.errors import InputError
from sparsecircuits.monitor.calibrate import BaselineDoc, FlagRule
from sparsecircuits.monitor.scores import FamilyNodes
from sparsecircuits.redteam.objective import CircuitObjective
from sparsecircuits.redteam.search import Searcher, allowed_tokens
from sparsecircuits.redteam.template import Template, load_template
from tests.model.helpers import tiny_model

SITE = "0.mlp.post_act"


@pytest.fixture(scope="module")
def tok():
    from sparsecircuits.data import stdlib_dir, train_tokenizer

    texts = [(stdlib_dir() / n).read_text(encoding="utf-8") for n in ("glob.py", "bisect.py")]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(vocab_size=tok.vocab_size, block_size=32)


def _objective(model, kind: str, *, rule: FlagRule | None = None) -> CircuitObjective:
    width = model.transformer.h[0].mlp.c_fc.weight.shape[0]
    idx = torch.tensor([1, 5, 9, min(17, width - 1)])
    fam = FamilyNodes("fam", {SITE: idx}, {SITE: torch.ones(4)}, {SITE: torch.zeros(4)})
    stats = dict(n_tokens=100, mean=0.05, median=0.05, mad=0.01, sigma=0.02, p50=0.05,
                 p90=0.08, p99=0.1, p99_9=0.12)  # fmt: skip
    base = BaselineDoc(created="x", catalog_sha256="0" * 64, weights_hash="0" * 64,
                       source="test", flag=FlagRule(), families={"fam": stats})  # fmt: skip
    return CircuitObjective(model, fam, base, objective=kind, rules=[rule or FlagRule()],
                            min_target_prob=0.01)  # fmt: skip


TEMPLATE = Template(prefix="def f(x):\n    return ", span_tokens=3, suffix="\n")


def test_gradient_candidates_match_an_independent_first_order_computation(model, tok):
    """The one-hot gradient (GCG) must rank swaps as a plain autograd through the input
    embedding does: the predicted change of swap (p, v) is grad_x[p] . (e_v - e_old)."""
    obj = _objective(model, "engage")
    s = Searcher(obj, tok, TEMPLATE, topk=5)
    base = s.initial(torch.Generator().manual_seed(0))
    ids = s.ids(base[None])
    lay = s.layout
    wte = model.transformer.wte.weight
    x = model.embed(ids).detach().requires_grad_(True)
    logits, eng = obj._run(x, ids, detach=False)
    z, tgt, _ = obj._terms(logits, eng, ids, lay)
    (gx,) = torch.autograd.grad(obj.loss_of(eng, z, tgt, lay, smooth=True).sum(), x)
    pred = gx[0, lay.span_lo : lay.span_hi] @ wte.T  # (span, vocab), up to a per-row constant
    pred = pred.masked_fill(~s.mask, float("inf"))
    expected = (-pred).topk(5, dim=-1).indices
    assert torch.equal(s.candidates(base), expected)


def test_gradient_candidates_agree_with_exhaustive_evaluation(model, tok):
    """On a tiny vocabulary, every single swap is scored exactly. The gradient's predicted
    changes must agree in rank with the exact ones (positive rank correlation), and its top
    quarter must hold more of the truly best swaps than a random quarter would."""
    obj = _objective(model, "engage")
    s = Searcher(obj, tok, TEMPLATE, topk=len(allowed_tokens(tok, TEMPLATE)))
    base = s.initial(torch.Generator().manual_seed(1))
    (start,) = s.evaluate(base[None], 0)
    g = obj.gradient(s.ids(base[None]), s.layout)
    allowed = s.allowed
    pred, exact = [], []
    for p in range(len(base)):
        spans = base.expand(len(allowed), -1).clone()
        spans[:, p] = allowed
        scores = obj.score(s.ids(spans), s.layout).loss
        exact.append(scores - start.loss)
        pred.append(g[p, allowed] - g[p, base[p]])
    pred_t, exact_t = torch.cat(pred), torch.cat(exact)

    def ranks(v: torch.Tensor) -> torch.Tensor:
        return v.argsort().argsort().float()

    rho = torch.corrcoef(torch.stack([ranks(pred_t), ranks(exact_t)]))[0, 1]
    assert rho > 0.1, float(rho)
    quarter = len(pred_t) // 4
    best = set(exact_t.argsort()[:quarter].tolist())
    chosen = set(pred_t.argsort()[:quarter].tolist())
    assert len(best & chosen) > quarter // 4  # a random quarter holds about a quarter


def test_batched_scores_equal_one_at_a_time(model, tok):
    obj = _objective(model, "evade")
    t = Template(prefix="x = '", span_tokens=3, suffix="", target="'\n")
    s = Searcher(obj, tok, t)
    spans = s.allowed[torch.randint(len(s.allowed), (5, 3), generator=torch.Generator())]
    batch = obj.score(s.ids(spans), s.layout)
    for j in range(5):
        one = obj.score(s.ids(spans[j : j + 1]), s.layout)
        for a, b in ((batch.loss, one.loss), (batch.engagement, one.engagement),
                     (batch.target_logprob, one.target_logprob)):  # fmt: skip
            assert torch.allclose(a[j], b[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["gcg", "evolve", "random"])
def test_constraints_hold_on_every_hit_and_seeds_repeat(model, tok, mode):
    t = Template(prefix="x = (", span_tokens=3, suffix=")\n", python_valid=True,
                 forbidden=["e", "("], max_fluency_nats=50.0)  # fmt: skip
    obj = _objective(model, "engage")
    s = Searcher(obj, tok, t, batch=16, topk=16)
    res = s.run(mode=mode, budget=96, seed=3)
    assert res.evaluations <= 96
    for f in res.hits + res.trajectory:
        assert all(i in set(s.allowed.tolist()) for i in f.span_ids)
        assert not any(bad in tok.decode([i]) for i in f.span_ids for bad in t.forbidden)
    for h in res.hits:
        assert h.python_valid and t.python_ok(h.span) and h.fluency <= 50.0
        assert h.engagement > obj.threshold()
    again = s.run(mode=mode, budget=96, seed=3)
    assert [h.span_ids for h in again.hits] == [h.span_ids for h in res.hits]


def test_an_impossible_constraint_set_is_one_line(model, tok):
    """A template nothing can complete as Python: no candidate parses, and the search says
    so in one line instead of reporting an empty result."""
    t = Template(prefix="x = (((", span_tokens=2, suffix="", python_valid=True)
    s = Searcher(_objective(model, "engage"), tok, t, batch=16)
    with pytest.raises(InputError, match="none of the 48 candidates") as err:
        s.run(mode="random", budget=48, seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="needs a 'prefix'"):
        Searcher(_objective(model, "engage"), tok, Template(span_tokens=2, max_fluency_nats=3))


def test_bad_input_is_one_line(model, tok, tmp_path: Path):
    chars = sorted({c for i in range(tok.vocab_size)
                    for c in tok.id_to_bytes(i).decode("utf-8", "replace")})  # fmt: skip
    with pytest.raises(InputError, match="leave no token"):
        allowed_tokens(tok, Template(span_tokens=2, forbidden=chars))
    bad = tmp_path / "t.yaml"
    bad.write_text("prefix: 'x = '\nsuffix: '\\n'\n")
    with pytest.raises(InputError, match="span_tokens") as err:
        load_template(bad, family="fam")
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="evade needs a 'target'"):
        Searcher(_objective(model, "evade"), tok, Template(prefix="x", span_tokens=2))
    with pytest.raises(InputError, match="context"):
        Searcher(_objective(model, "engage"), tok, Template(prefix="x " * 40, span_tokens=2))
    with pytest.raises(InputError, match="budget"):
        Searcher(_objective(model, "engage"), tok, TEMPLATE).run(mode="gcg", budget=0, seed=0)


def test_unknown_family_names_the_known_ones():
    from sparsecircuits.model.io import resolve_model_dir
    from sparsecircuits.redteam.scan import load_monitor, scan

    d = resolve_model_dir("stdlib-sparse")
    mon = load_monitor(d, d / "monitor")
    with pytest.raises(InputError, match="monitored: brackets, control-flow, string-literal"):
        scan(mon, family="nope", objective="engage")
    searcher, res = scan(mon, family="string-literal", objective="engage", budget=128, seed=0)
    obj = searcher.obj
    # A hit is compared with the same statistic on benign text: the largest engagement over
    # as many positions, whose p99 is above a single token's.
    assert obj.threshold() > obj.stats.p99
    assert all(h.engagement > obj.threshold() and h.retokenizes for h in res.hits)


def test_scan_command_writes_hits_and_a_garak_report(tmp_path: Path):
    from typer.testing import CliRunner

    from sparsecircuits.cli import app
    from sparsecircuits.redteam.report import read_report

    out = tmp_path / "scan"
    r = CliRunner().invoke(app, ["scan", "--family", "string-literal", "--objective", "engage",
                                 "--budget", "64", "--seed", "1", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    hits = [json.loads(x) for x in (out / "hits.jsonl").read_text().splitlines()]
    doc = json.loads((out / "scan.json").read_text())
    assert doc["hits"] == len(hits) and doc["seed"] == 1 and doc["hashes"]["catalog_sha256"]
    entries = read_report(out / "report.jsonl")
    assert entries[0]["entry_type"] == "start_run setup"
    assert len((out / "hitlog.jsonl").read_text().splitlines()) == len(hits)
    assert all(h["hit"] and h["python_valid"] for h in hits)
