"""The command line: one-line errors with exit status 2, and the commands on a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecircuits.cli import _parse_overrides
from sparsecircuits.errors import SparseCircuitsError


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsecircuits.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_overrides_parse_nested_json_values():
    got = _parse_overrides(["optim.lr=0.01", "model.n_layer=4", "corpus=src/**/*.py"])
    assert got == {"optim": {"lr": 0.01}, "model": {"n_layer": 4}, "corpus": "src/**/*.py"}
    with pytest.raises(SparseCircuitsError, match="KEY=VALUE"):
        _parse_overrides(["optim.lr"])


def test_missing_model_directory(tmp_path):
    line = _one_line_error(_cli("info", str(tmp_path / "nope")))
    assert "nope" in line and "no such model directory" in line


def test_corrupt_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    line = _one_line_error(_cli("info", str(tmp_path)))
    assert "config.json" in line and "not valid JSON" in line


def test_config_with_unknown_and_wrong_typed_fields(tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"model": {"n_layers": 2}}))
    line = _one_line_error(_cli("train", "--config", str(bad), "--out", str(tmp_path / "r")))
    assert "unknown field 'model.n_layers'" in line and str(bad) in line
    bad.write_text(json.dumps({"optim": {"lr": "fast"}}))
    line = _one_line_error(_cli("train", "--config", str(bad), "--out", str(tmp_path / "r")))
    assert "'optim.lr'" in line and "fast" in line
    line = _one_line_error(
        _cli(
            "train",
            "--preset",
            "tiny",
            "--set",
            "optim.grad_rms_mode=sometimes",
            "--out",
            str(tmp_path / "r"),
        )
    )
    assert "optim.grad_rms_mode" in line
    assert not (tmp_path / "r").exists()  # nothing was written for a bad config


def test_empty_corpus_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    line = _one_line_error(
        _cli(
            "train",
            "--preset",
            "tiny",
            "--corpus",
            str(empty),
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        )
    )
    assert str(empty) in line and ".py" in line
