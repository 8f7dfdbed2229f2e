"""``compare`` as the paper ran it: circuits judged on held-out templates, every task reported,
ratios at several targets, the bigram-table flag, one search budget per model, matched-loss
baselines, resumable outputs and one-line CLI errors."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparsecircuits import cli
from sparsecircuits import tasks as task_registry
from sparsecircuits.circuits import compare as compare_mod
from sparsecircuits.circuits.compare import CompareOptions, compare_models
from sparsecircuits.circuits.compare_stats import (
    check_tokenizers,
    edge_ratio,
    ratio_summary,
    reached,
)
from sparsecircuits.circuits.edges import WEIGHT_KINDS, edge_set
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.prune import PruneConfig, geometric_mean
from sparsecircuits.cli.compare import print_comparison
from sparsecircuits.data import (
    Tokenizer,
    build_token_cache,
    load_corpus,
    stdlib_dir,
    train_tokenizer,
)
from sparsecircuits.errors import InputError
from sparsecircuits.model.io import load_model, save_model
from sparsecircuits.train.metrics import heldout_loss
from tests.circuits.conftest import circuit_model

SMALL = dict(steps=3, n_train_pairs=8, n_test_pairs=8, batch_pairs=4, ablation="zero")
TASKS = ["single_double_quote", "else_elif"]
FAST = dict(trials=1, eval_windows=0)  # one trial per task, no pretraining losses


def _dense(vocab: int, seed: int = 1):
    model = circuit_model(vocab, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "bigram_table":
                p.add_(0.01)  # fill every zero: dense weights
    return model


def _save(model, tok: Tokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory)
    tok.save(directory)
    return directory


def _spy(monkeypatch) -> list:
    """Record (model spec, task, options) of every find_circuit call (still running it)."""
    calls: list = []
    real = compare_mod.find_circuit
    monkeypatch.setattr(
        compare_mod,
        "find_circuit",
        lambda *a, **k: calls.append((a[0].spec, a[1], k)) or real(*a, **k),
    )
    return calls


@torch.no_grad()
def plant_else_elif(model, tok: Tokenizer):
    """Set the fixed bigram table so the current token alone decides ``else_elif`` (``else`` ->
    ``:\\n`` up, ``elif`` -> ``:\\n`` down): the task is then solved outside the node space."""
    t = task_registry.get("else_elif")
    sign: dict[tuple[int, int], float] = {}
    for split in ("train", "test"):
        for n in (8, 64):
            b = t.build(tok, split=split, n=n, seed=0, max_len=64)
            colon = Counter([*b.target_a.tolist(), *b.target_b.tolist()]).most_common(1)[0][0]
            for p, c in [*zip(b.prompts_a, b.target_a.tolist(), strict=True),
                         *zip(b.prompts_b, b.target_b.tolist(), strict=True)]:  # fmt: skip
                s = 20.0 if c == colon else -20.0
                assert sign.setdefault((p[-1], colon), s) == s, "the last token must decide"
    for (last, colon), s in sign.items():
        model.bigram_table[last, colon] = s
    return model


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, circuit_tokenizer):
    """The tiny model without zeroed weights (a 'dense baseline')."""
    directory = tmp_path_factory.mktemp("dense")
    return _save(_dense(circuit_tokenizer.vocab_size), circuit_tokenizer, directory)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, circuit_tokenizer):
    """(sparse dir, dense dir): the tiny models with ``else_elif`` planted in the bigram table."""
    root, tok = tmp_path_factory.mktemp("planted"), circuit_tokenizer
    sparse = plant_else_elif(circuit_model(tok.vocab_size), tok)
    dense = plant_else_elif(_dense(tok.vocab_size), tok)
    return _save(sparse, tok, root / "sparse"), _save(dense, tok, root / "dense")


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    """Both tasks on the planted models at the primary target 0.15, re-cut at 50 (which any
    circuit of a tiny random model reaches)."""
    out = tmp_path_factory.mktemp("planted_run")
    cfg = PruneConfig(**SMALL, target_loss=0.15)
    opts = CompareOptions(**FAST, targets=(50.0,))
    res = compare_models(str(planted[0]), str(planted[1]), TASKS, cfg, options=opts, out=out)
    return res, out, cfg, opts


# ------------------------------------------------------------------------------ pure verdicts
def test_geometric_mean_and_edge_ratio():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert math.isnan(geometric_mean([]))
    assert edge_ratio(0, 10) == 10.0 and edge_ratio(5, 0) == 0.2


def test_reached_is_the_test_loss_at_most_the_target():
    assert reached(0.15, 0.15) and reached(0.1, 0.15)
    assert not reached(0.1500001, 0.15)


def _point(edges: int, *, ok: bool = True, outside: bool = False) -> dict:
    return {"n_weight_edges": edges, "reached": ok, "decided_outside": outside}


def test_ratio_summary_lists_every_task_left_out_and_why():
    at = lambda **kw: {"at": {"0.15": _point(**kw)}}  # noqa: E731
    rows = {
        "a": {"sparse": at(edges=10), "dense": at(edges=40)},
        "b": {"sparse": at(edges=10, outside=True), "dense": at(edges=90)},
        "c": {"sparse": at(edges=10, ok=False), "dense": at(edges=90)},
        "d": {"sparse": at(edges=10), "dense": at(edges=90, ok=False)},
        "e": {"sparse": at(edges=1, ok=False), "dense": at(edges=9, ok=False)},
    }
    every = ratio_summary(rows, "dense", "0.15", without_flagged=False)
    assert every["ratios"] == {"a": 4.0, "b": 9.0} and every["geomean"] == pytest.approx(6.0)
    assert every["excluded"] == {
        "c": "missed by sparse",
        "d": "missed by dense",
        "e": "missed by both",
    }
    clean = ratio_summary(rows, "dense", "0.15", without_flagged=True)
    assert clean["ratios"] == {"a": 4.0} and clean["n_tasks"] == 1
    assert clean["excluded"]["b"] == "decided outside the node space on sparse"


# ------------------------------------------------------------------------ runs on tiny models
def test_every_task_is_reported_at_every_target(planted_run):
    res, _, _, _ = planted_run
    assert list(res["tasks"]) == TASKS and res["complete"]
    assert res["targets"] == [0.15, 50.0] and res["masks_trained_at"] == 0.15
    for key in ("0.15", "50"):
        for variant in ("all", "without_flagged"):
            s = res["ratios"]["dense"][key][variant]
            assert set(s["ratios"]) | set(s["excluded"]) == set(TASKS)
            assert not set(s["ratios"]) & set(s["excluded"])
    assert res["geomean_ratio"] == res["ratios"]["dense"]["0.15"]["all"]["geomean"]


def test_bigram_table_flag(planted_run):
    res, _, _, _ = planted_run
    for kind in ("sparse", "dense"):
        planted = res["tasks"]["else_elif"][kind]
        assert planted["empty_loss_test"] <= 0.15 and planted["decided_outside"]
        assert planted["at"]["0.15"]["decided_outside"] and planted["reached"]
        plain = res["tasks"]["single_double_quote"][kind]  # random weights: near chance
        assert plain["empty_loss_test"] > 0.15 and not plain["decided_outside"]
        assert not plain["at"]["0.15"]["decided_outside"]
        assert plain["at"]["50"]["decided_outside"]  # any loss of a tiny model is below 50
    r = res["ratios"]["dense"]["0.15"]
    assert list(r["all"]["ratios"]) == ["else_elif"]  # flagged, still in the labelled "all"
    assert r["all"]["excluded"] == {"single_double_quote": "missed by both"}
    assert r["without_flagged"]["geomean"] is None
    assert r["without_flagged"]["excluded"]["else_elif"] == (
        "decided outside the node space on sparse and dense"
    )


def test_ratio_per_target_from_recut_circuits(planted_run, planted):
    res, out, _, _ = planted_run
    for key in ("0.15", "50"):
        rows = res["tasks"]
        want = {
            t: edge_ratio(rows[t]["sparse"]["at"][key]["n_weight_edges"],
                          rows[t]["dense"]["at"][key]["n_weight_edges"])
            for t in TASKS
            if rows[t]["sparse"]["at"][key]["reached"] and rows[t]["dense"]["at"][key]["reached"]
        }  # fmt: skip
        got = res["ratios"]["dense"][key]["all"]
        assert got["ratios"] == pytest.approx(want)
        assert got["geomean"] == pytest.approx(geometric_mean(list(want.values())))
    assert res["ratios"]["dense"]["50"]["all"]["n_tasks"] == 2
    assert res["ratios"]["dense"]["0.15"]["all"]["n_tasks"] == 1
    # The primary target is the searched circuit; the re-cut's sizes are the node order's.
    for kind, directory in zip(("sparse", "dense"), planted, strict=True):
        row = res["tasks"]["single_double_quote"][kind]
        assert row["at"]["0.15"]["n_nodes"] == row["n_nodes"]
        cut = row["at"]["50"]
        assert cut["reached"] and cut["loss_train"] <= 50.0 and cut["loss_test"] <= 50.0
        order = load_file(str(out / kind / "single_double_quote" / "masks.safetensors"))["order"]
        model = load_model(directory)
        counts = edge_set(model, NodeSpace(model.config), order[: cut["n_nodes"]]).count_by_kind()
        assert cut["n_weight_edges"] == sum(counts[k] for k in WEIGHT_KINDS)


def test_reached_is_judged_on_test_not_train(planted_run, planted, tmp_path, monkeypatch):
    """A circuit whose train loss reaches the target but whose held-out test loss misses it is
    not in the ratio (planted in the saved circuit, which the rerun reuses)."""
    res, out, cfg, opts = planted_run
    assert "else_elif" in res["ratios"]["dense"]["0.15"]["all"]["ratios"]
    shutil.copytree(out, tmp_path / "out")
    path = tmp_path / "out" / "sparse" / "else_elif" / "circuit.json"
    doc = json.loads(path.read_text())
    assert doc["loss"]["circuit"] <= 0.15
    doc["loss"]["circuit_test"] = 0.5
    path.write_text(json.dumps(doc))
    calls = _spy(monkeypatch)
    again = compare_models(str(planted[0]), str(planted[1]), TASKS, cfg, options=opts,
                           out=tmp_path / "out")  # fmt: skip
    assert calls == []  # every circuit reused
    row = again["tasks"]["else_elif"]["sparse"]
    assert row["reused"] and row["reached_train"] and not row["reached"]
    assert row["loss_train"] <= 0.15 < row["loss_test"] == 0.5
    ratios = again["ratios"]["dense"]["0.15"]["all"]
    assert ratios["excluded"]["else_elif"] == "missed by sparse" and ratios["geomean"] is None


def test_resumes_from_saved_circuits(circuit_model_dir, dense_dir, tmp_path, monkeypatch):
    cfg, opts = PruneConfig(**SMALL, target_loss=50.0), CompareOptions(**FAST)
    args = (str(circuit_model_dir), str(dense_dir), ["single_double_quote"])
    first = compare_models(*args, cfg, options=opts, out=tmp_path)
    calls = _spy(monkeypatch)
    again = compare_models(*args, cfg, options=opts, out=tmp_path)
    assert calls == []
    for kind in ("sparse", "dense"):
        a, b = (r["tasks"]["single_double_quote"][kind] for r in (first, again))
        assert b["reused"] and not a["reused"]
        same = lambda r: {k: v for k, v in r.items() if k not in ("reused", "cut_s")}  # noqa: E731
        assert same(a) == same(b)
    other = cfg.model_copy(update={"steps": 4})  # other settings: pruned afresh
    compare_models(*args, other, options=opts, out=tmp_path)
    assert len(calls) == 2


def test_partial_results_after_each_task(circuit_model_dir, dense_dir, tmp_path, monkeypatch):
    """compare.json is rewritten after every task; a killed run keeps what it found."""
    seen = []
    cfg = PruneConfig(**{**SMALL, "steps": 1}, target_loss=50.0)

    def on_task(task, result):
        seen.append(json.loads((tmp_path / "compare.json").read_text()))
        raise KeyboardInterrupt  # killed after the first task

    with pytest.raises(KeyboardInterrupt):
        compare_models(str(circuit_model_dir), str(dense_dir), TASKS, cfg,
                       options=CompareOptions(**FAST), out=tmp_path, on_task=on_task)  # fmt: skip
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved == seen[0] and not saved["complete"] and list(saved["tasks"]) == TASKS[:1]


def test_budget_is_split_evenly_and_the_time_used_recorded(
    circuit_model_dir, dense_dir, monkeypatch, capsys
):
    calls = _spy(monkeypatch)
    opts = CompareOptions(trials=3, budget_per_model_s=0.02, eval_windows=0)
    cfg = PruneConfig(**{**SMALL, "steps": 1}, target_loss=50.0)
    res = compare_models(str(circuit_model_dir), str(dense_dir), TASKS, cfg, options=opts)
    # Every (model, task) gets the same trials and half of its model's budget.
    specs = (str(circuit_model_dir), str(dense_dir))
    assert calls == [(m, t, {"trials": 3, "budget_s": 0.01}) for t in TASKS for m in specs]
    assert res["search"] == {"trials_per_task": 3, "budget_per_model_s": 0.02,
                             "budget_per_task_s": 0.01, "same_for_every_model": True}  # fmt: skip
    assert res["prune_config"] == cfg.model_dump(mode="json")  # one centre for both models
    for kind in ("sparse", "dense"):
        m = res["models"][kind]
        assert m["trials"] == sum(res["tasks"][t][kind]["trials"] for t in TASKS)
        assert m["trials"] == 2  # the budget is spent after each task's first trial
        got = sum(res["tasks"][t][kind]["search_s"] for t in TASKS)
        assert m["search_s"] == pytest.approx(got) and got > 0
        assert m["wall_s"] >= m["search_s"]
    print_comparison(res)  # every first trial ran past its 0.01 s share, and the table says so
    assert " ".join(capsys.readouterr().out.split()).count("(over budget:") == 2


def test_different_tokenizers_are_refused_unless_allowed(circuit_model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(circuit_model_dir, other)
    texts = [(stdlib_dir() / n).read_text(encoding="utf-8") for n in ("ast.py", "typing.py")]
    tok = train_tokenizer(texts, vocab_size=Tokenizer.load(circuit_model_dir).vocab_size)
    tok.save(other)  # the same vocabulary size, other merges
    opts = CompareOptions(trials=1, eval_windows=1, eval_corpus=str(stdlib_dir() / "json"))
    with pytest.raises(InputError, match="--allow-different-tokenizers"):
        compare_models(str(circuit_model_dir), str(other), ["else_elif"], PruneConfig(**SMALL),
                       options=opts)  # fmt: skip
    assert not check_tokenizers({"sparse": "a", "dense": "b"}, allow_different=True)
    assert check_tokenizers({"sparse": "a", "dense": "a"}, allow_different=False)


# --------------------------------------------------------------------------------------- CLI
def _main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["sparsecircuits", *args])
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "no_such_task"], "no_such_task"),
        (["--task", "else_elif", "--targets", ""], "--targets"),
        (["--task", "else_elif", "--targets", " , "], "--targets"),
        (["--task", "else_elif", "--targets", "0.1,abc"], "--targets"),
        (["--task", "else_elif", "--targets", "0.1,-1"], "--targets"),
        (["--task", "else_elif", "--budget-per-model", "-5"], "--budget-per-model"),
        (["--task", "else_elif", "--budget-per-model", "0"], "--budget-per-model"),
        (["--task", "else_elif", "--trials", "0"], "--trials"),
        (["--task", "else_elif", "--eval-windows", "-1"], "--eval-windows"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(
    extra, message, circuit_model_dir, dense_dir, monkeypatch, capsys
):
    args = ["compare", "--sparse", str(circuit_model_dir), "--dense", str(dense_dir), *extra]
    code, err = _main(args, monkeypatch, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]


def test_cli_matched_loss_rows_and_pretraining_losses(planted, dense_dir, tmp_path):
    """--dense-matched adds a third model with its own rows and ratios; the pretraining losses
    of all three come from ``heldout_loss`` on the same held-out files; the table says it all."""
    corpus = stdlib_dir() / "json"
    args = ["compare", "--sparse", str(planted[0]), "--dense", str(planted[1]),
            "--dense-matched", str(dense_dir), "--task", "else_elif", "--targets", "0.15,50",
            "--trials", "1", "--budget-per-model", "100", "--eval-windows", "1",
            "--eval-corpus", str(corpus), "--out", str(tmp_path),
            "--cache-dir", str(tmp_path / "cache"), "--steps", "1", "--set", "ablation=zero",
            "--set", "n_train_pairs=8", "--set", "n_test_pairs=8",
            "--set", "batch_pairs=4"]  # fmt: skip
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["complete"] and saved["dense_matched"] == str(dense_dir)
    assert set(saved["tasks"]["else_elif"]) == {"sparse", "dense", "dense_matched"}
    assert set(saved["ratios"]) == {"dense", "dense_matched"}
    matched = saved["ratios"]["dense_matched"]
    assert matched["0.15"]["all"]["excluded"] == {"else_elif": "missed by dense_matched"}
    assert matched["50"]["all"]["n_tasks"] == 1
    p = saved["pretrain_loss"]
    assert p["corpus"] == str(corpus) and p["same_tokenizer"] and p["val_files"] >= 1
    assert set(p["models"]) == {"sparse", "dense", "dense_matched"}
    assert all(m["windows"] == 1 for m in p["models"].values())
    # The library function eval-loss and the model cards use, on the same held-out files.
    tok = Tokenizer.load(planted[0])
    _, val = build_token_cache(load_corpus(str(corpus)), tok, cache_dir=tmp_path / "cache/tokens")
    ev = heldout_loss(load_model(dense_dir), val, windows=1, device=torch.device("cpu"))
    assert p["models"]["dense_matched"]["val_loss"] == pytest.approx(ev["val_loss"])
    text = " ".join(res.output.split())
    assert "budget 100 s per model = 100.0 s per task" in text and "over budget" not in text
    assert "pretraining loss on the held-out files" in text and "over 1 of" in text
    for kind, label in (("sparse", "sparse"), ("dense", "dense"), ("dense_matched", "matched")):
        assert f"{label} {p['models'][kind]['val_loss']:.4f} over 1 of" in text
    assert "matched / sparse" in text and "dense / sparse" in text
    assert "else_elif (missed by dense_matched)" in text  # the unplanted model misses it
    assert (
        "decided outside the node space (bigram table, biases, token embedding): else_elif "
        "(sparse, dense)" in text
    )
