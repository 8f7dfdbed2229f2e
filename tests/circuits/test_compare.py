"""``compare``: per-task edges on two models and the geometric-mean ratio."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from sparsecircuits import cli
from sparsecircuits.circuits.compare import compare_models
from sparsecircuits.circuits.prune import PruneConfig, geometric_mean
from sparsecircuits.model.io import save_model
from tests.circuits.conftest import circuit_model

SMALL = dict(steps=3, n_train_pairs=8, n_test_pairs=8, batch_pairs=4, ablation="zero")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, circuit_tokenizer):
    """The tiny model without zeroed weights (a 'dense baseline')."""
    directory = tmp_path_factory.mktemp("dense")
    model = circuit_model(circuit_tokenizer.vocab_size, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "bigram_table":
                p.add_(0.01)  # fill every zero: dense weights
    save_model(model, directory)
    circuit_tokenizer.save(directory)
    return directory


def test_geometric_mean():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert math.isnan(geometric_mean([]))


def test_compare_counts_edges_and_ratio(circuit_model_dir, dense_dir, tmp_path):
    tasks = ["single_double_quote", "bracket_counting"]
    # A target every circuit reaches, so both tasks are compared.
    cfg = PruneConfig(**SMALL, target_loss=50.0)
    res = compare_models(str(circuit_model_dir), str(dense_dir), tasks, cfg, out=tmp_path)
    assert res["compared_tasks"] == tasks
    ratios = []
    for t in tasks:
        row = res["tasks"][t]
        s, d = row["sparse"], row["dense"]
        assert s["reached"] and d["reached"]
        want = max(1, d["n_weight_edges"]) / max(1, s["n_weight_edges"])
        assert row["ratio"] == pytest.approx(want)
        ratios.append(row["ratio"])
        for kind in ("sparse", "dense"):
            doc = json.loads((tmp_path / kind / t / "circuit.json").read_text())
            assert doc["n_weight_edges"] == row[kind]["n_weight_edges"]
    assert res["geomean_ratio"] == pytest.approx(geometric_mean(ratios))
    assert json.loads((tmp_path / "compare.json").read_text())["geomean_ratio"] == pytest.approx(
        res["geomean_ratio"]
    )


def test_compare_resumes_from_saved_circuits(circuit_model_dir, dense_dir, tmp_path, monkeypatch):
    from sparsecircuits.circuits import compare as compare_mod

    cfg = PruneConfig(**SMALL, target_loss=50.0)
    tasks = ["single_double_quote"]
    first = compare_models(str(circuit_model_dir), str(dense_dir), tasks, cfg, out=tmp_path)
    calls = []
    real = compare_mod.find_circuit
    spy = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(compare_mod, "find_circuit", spy)
    again = compare_models(str(circuit_model_dir), str(dense_dir), tasks, cfg, out=tmp_path)
    assert calls == [] and again["tasks"] == first["tasks"]  # both circuits reused
    other = cfg.model_copy(update={"steps": 4})  # different settings: pruned afresh
    compare_models(str(circuit_model_dir), str(dense_dir), tasks, other, out=tmp_path)
    assert len(calls) == 2


def test_compare_skips_tasks_that_miss_the_target(circuit_model_dir, dense_dir):
    cfg = PruneConfig(**SMALL, target_loss=1e-6)  # unreachable for random tiny models
    res = compare_models(str(circuit_model_dir), str(dense_dir), ["single_double_quote"], cfg)
    assert res["compared_tasks"] == [] and res["geomean_ratio"] is None
    assert res["tasks"]["single_double_quote"]["ratio"] is None


def test_compare_cli_json(circuit_model_dir, dense_dir):
    args = ["compare", "--sparse", str(circuit_model_dir), "--dense", str(dense_dir),
            "--task", "single_double_quote", "--target", "50", "--steps", "2", "--json",
            "--set", "n_train_pairs=8", "--set", "n_test_pairs=8",
            "--set", "batch_pairs=4"]  # fmt: skip
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{") :])
    assert set(data) >= {"tasks", "geomean_ratio", "compared_tasks"}
    assert data["tasks"]["single_double_quote"]["sparse"]["n_weight_edges"] >= 0
