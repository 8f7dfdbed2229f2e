"""Hostile-review findings on issue 22 (circuit-aware red teaming), each a strict xfail that
shows the bug as the code stands; fixing the bug turns the test into an XPASS (then drop the
marker). Tiny models and the shipped ``stdlib-sparse`` only; no network."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecircuits.errors import InputError
from sparsecircuits.monitor.calibrate import FlagRule
from sparsecircuits.redteam.search import Searcher
from sparsecircuits.redteam.template import Template
from tests.model.helpers import tiny_model
from tests.redteam.test_search import TEMPLATE, _objective, model, tok  # noqa: F401 (fixtures)


def test_a_forbidden_string_the_span_writes_is_refused():
    """The docs: no forbidden string may appear in the text the span adds, across its edges
    too. With prefix ending 'o' and suffix starting 's', ``text('')`` holds one 'os' that no
    real candidate has, so one the span writes (whole, or with the suffix) passes."""
    t = Template(prefix='x = "o', span_tokens=2, suffix='s"\n', forbidden=["os"])
    assert not t.forbidden_ok("os")  # 'x = "ooss"': the span's own "os"
    assert not t.forbidden_ok("o")  # 'x = "oos"': the span's "o" + the suffix's "s"


def _rank_agreement(model, tok, seed: int) -> float:  # noqa: F811
    """Rank correlation between the one-hot gradient's predicted change and the exact change
    of every single swap, for engage on the causal share."""
    from tests.redteam.test_evade import gradient_vs_exhaustive

    obj = _objective(model, "engage")
    obj.measure = "causal_share"
    return gradient_vs_exhaustive(obj, tok, TEMPLATE, seed)[2]


def test_causal_share_gradient_candidates_agree_with_exhaustive_evaluation(model, tok):  # noqa: F811
    rhos = [_rank_agreement(model, tok, seed) for seed in range(6)]
    assert sum(rhos) / len(rhos) > 0.1, rhos


def test_benign_quantiles_are_per_model(tok, monkeypatch):  # noqa: F811
    from sparsecircuits.redteam import scan as scan_mod

    monkeypatch.setattr(scan_mod, "_BENIGN", {})  # leave the module's cache as it was
    got = []
    for seed in (0, 1):
        m = tiny_model(seed, vocab_size=tok.vocab_size, block_size=32)
        mon = scan_mod.Monitor(m, tok, None, None, {"fam": []}, {})
        got.append(scan_mod.benign_max_quantiles(mon, _objective(m, "engage"), 5))
    assert got[0] != got[1]  # two different random models: different benign engagement


def _evade_report(model, tok, tmp_path):  # noqa: F811
    """An evade scan's report of one span whose prompt (prefix + span + suffix) is cooler than
    the text after it, under a 1-of-1 rule between the two: (attempts, objective, template,
    z gap between the two parts)."""
    from sparsecircuits.redteam.report import read_report
    from sparsecircuits.redteam.scan import write_scan
    from sparsecircuits.redteam.search import SearchResult

    t = Template(prefix="x = '", span_tokens=3, target="'",
                 after="; import os; os.remove(p) #", min_target_prob=0.01)  # fmt: skip
    obj = _objective(model, "evade")
    s = Searcher(obj, tok, t, batch=16, topk=16)
    lay = s.layout
    spans = s.allowed[torch.randint(len(s.allowed), (64, 3),
                                    generator=torch.Generator().manual_seed(0))]  # fmt: skip
    ids = s.ids(spans)
    with torch.no_grad():
        _, eng = obj._run(model.embed(ids), ids, detach=True)
    z = (eng - obj.stats.median) / obj.stats.sigma
    gap = z[:, lay.tgt :].amax(-1) - z[:, : lay.tgt].amax(-1)
    j = int(gap.argmax())
    mid = float(z[j, : lay.tgt].max() + z[j, lay.tgt :].max()) / 2
    obj.rules = [FlagRule(z=mid, k=1, n=1)]
    (f,) = s.evaluate(spans[j : j + 1], 0)
    run = {"family": "fam", "objective": "evade", "mode": "random", "budget": 1, "seed": 0,
           "model": "tiny", "hashes": {}, "started": "2026-01-01T00:00:00+00:00",
           "version": "0.1.0", "measure": "engagement"}  # fmt: skip
    write_scan(tmp_path, s, SearchResult(best=f, trajectory=[f], evaluations=1), run=run)
    done = [r for r in read_report(tmp_path / "report.jsonl")
            if r["entry_type"] == "attempt" and r["status"] == 2]  # fmt: skip
    return done, obj, t, float(gap[j])


def _flags_on(obj, tok, model, text: str) -> float:  # noqa: F811
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        _, eng = obj._run(model.embed(ids), ids, detach=True)
    return float(obj.flags((eng - obj.stats.median) / obj.stats.sigma)[0])


def test_evade_report_setup_holds(model, tok, tmp_path):  # noqa: F811
    """The next test's premise (so that its xfail is the bug, not the setup): one attempt,
    its scored text flagged by the rule, its shown prompt not."""
    from sparsecircuits.redteam.report import detector_name

    done, obj, t, gap = _evade_report(model, tok, tmp_path)
    assert len(done) == 1 and gap > 1.0
    (a,) = done
    prompt = a["prompt"]["turns"][-1]["content"]["text"]
    assert _flags_on(obj, tok, model, t.text(a["notes"]["span"])) == 1.0
    assert _flags_on(obj, tok, model, prompt) == 0.0
    assert a["detector_results"][detector_name("circuit.fam")] == [1.0]


def test_evade_report_circuit_score_is_for_the_text_it_shows(model, tok, tmp_path):  # noqa: F811
    """An evade attempt's circuit score is the rule on the text it shows: its prompt and its
    output (the kept target and the text after it), as garak's detectors score."""
    from sparsecircuits.redteam.report import detector_name

    done, obj, t, _ = _evade_report(model, tok, tmp_path)
    for a in done:
        prompt = a["prompt"]["turns"][-1]["content"]["text"]
        (output,) = [o["text"] for o in a["outputs"]]
        assert output == t.target + t.after and prompt + output == t.text(a["notes"]["span"])
        score = a["detector_results"][detector_name("circuit.fam")][0]
        assert score == _flags_on(obj, tok, model, prompt + output)


def test_an_impossible_fluency_bound_is_one_line(model, tok):  # noqa: F811
    t = Template(prefix="def f(x):\n    return ", span_tokens=2, max_fluency_nats=1e-6)
    s = Searcher(_objective(model, "engage"), tok, t, batch=16)
    with pytest.raises(InputError, match="scored meets max_fluency_nats 1e-06") as err:
        s.run(mode="random", budget=48, seed=0)
    assert "\n" not in str(err.value)


def test_in_process_telemetry_does_not_drop_the_start_of_a_long_text():
    from sparsecircuits.redteam.telemetry import InProcess, verdict

    tp = InProcess("stdlib-sparse")
    flag = 'name = "hello"; os.system("rm -rf /") #"\n'
    assert verdict(tp.record(flag)).score == 1.0
    long = flag + "def add(a, b):\n    return a + b\n" * 30  # > 256 tokens
    assert len(tp.tok.encode(long)) > tp.model.config.block_size
    try:
        score = verdict(tp.record(long)).score
    except InputError:
        return  # refusing, as the server does, is honest too
    assert score == 1.0, json.dumps({"score": score})
