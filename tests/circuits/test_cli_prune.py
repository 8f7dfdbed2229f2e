"""``sparsecircuits prune`` on a tiny model: outputs, summary line and one-line errors."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
from typer.testing import CliRunner

from sparsecircuits import cli
from sparsecircuits.circuits.schema import load_circuit, model_label

SMALL = ["--steps", "3", "--set", "n_train_pairs=8", "--set", "n_test_pairs=8",
         "--set", "batch_pairs=4", "--ablation", "zero"]  # fmt: skip


def _main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run the console entry point (which turns errors into exit status 2); (status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sparsecircuits", *args])
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # keep pytest's logging
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


def _one_line_error(args: list[str], monkeypatch, capsys) -> str:
    code, err = _main(args, monkeypatch, capsys)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_prune_writes_outputs_and_summary(circuit_model_dir, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        cli.app,
        ["prune", "--task", "single_double_quote", "--model", str(circuit_model_dir),
         "--out", str(out), *SMALL],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for name in ("circuit.json", "masks.safetensors", "search.json"):
        assert (out / name).is_file(), name
    doc = load_circuit(out)
    assert doc.task == "single_double_quote" and doc.ablation == "zero"
    assert doc.prune_config["steps"] == 3 and doc.n_pairs == 8 and doc.n_test_pairs == 8
    assert doc.prune_config["batch_pairs"] == 4
    m = re.search(r"single_double_quote: (\d+) nodes, (\d+) edges \((\d+) weights\)", res.output)
    assert m, res.output
    assert (int(m[1]), int(m[2]), int(m[3])) == (doc.n_nodes, doc.n_edges, doc.n_weight_edges)
    assert "loss full" in res.output and str(out) in res.output
    trials = json.loads((out / "search.json").read_text())["trials"]
    assert len(trials) == 1


def test_prune_default_output_layout(circuit_model_dir, tmp_path):
    res = CliRunner().invoke(
        cli.app,
        ["prune", "--task", "single_double_quote", "--model", str(circuit_model_dir),
         "--runs-dir", str(tmp_path), "--target", "5", *SMALL],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    runs = list(tmp_path.glob("*/single_double_quote/*/circuit.json"))
    assert len(runs) == 1
    assert runs[0].parents[2].name == model_label(str(circuit_model_dir))
    assert re.fullmatch(r"\d{8}-\d{6}", runs[0].parent.name)
    assert load_circuit(runs[0]).target_loss == 5.0


def test_prune_without_task(circuit_model_dir, monkeypatch, capsys):
    line = _one_line_error(["prune", "--model", str(circuit_model_dir)], monkeypatch, capsys)
    assert "--task" in line


def test_prune_unknown_task(circuit_model_dir, tmp_path, monkeypatch, capsys):
    args = ["prune", "--task", "single_double_quotes", "--model", str(circuit_model_dir),
            "--out", str(tmp_path / "x")]  # fmt: skip
    line = _one_line_error(args, monkeypatch, capsys)
    assert "unknown task 'single_double_quotes'" in line and "single_double_quote" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["bogus=1"], "'bogus'"),
        (["steps=many"], "'steps'"),
        (["steps"], "KEY=VALUE"),
        (["ablation=median"], "'ablation'"),
    ],
)
def test_prune_bad_set(circuit_model_dir, tmp_path, monkeypatch, capsys, sets, needle):
    args = ["prune", "--task", "single_double_quote", "--model", str(circuit_model_dir),
            "--out", str(tmp_path / "x")]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    line = _one_line_error(args, monkeypatch, capsys)
    assert needle in line
    assert not (tmp_path / "x").exists()


def test_prune_out_with_several_tasks(circuit_model_dir, tmp_path, monkeypatch, capsys):
    args = ["prune", "--task", "single_double_quote", "--task", "for_while",
            "--model", str(circuit_model_dir), "--out", str(tmp_path / "x")]  # fmt: skip
    assert "--out" in _one_line_error(args, monkeypatch, capsys)


def test_model_label():
    assert model_label("stdlib-sparse") == "stdlib-sparse"
    assert model_label("runs/small/model") == "small"
    assert model_label("a b/c d") == "c_d"
