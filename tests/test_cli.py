"""The command line: one-line errors with exit status 2, and the commands on a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecircuits.cli.common import parse_overrides as _parse_overrides
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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny GPT saved with a small stdlib tokenizer (enough to build every task)."""
    from sparsecircuits.data import stdlib_dir, train_tokenizer
    from sparsecircuits.model import GPT, GPTConfig, save_model

    files = sorted(p for p in stdlib_dir().glob("*.py") if not p.name.startswith("_"))[:40]
    tok = train_tokenizer([p.read_text(encoding="utf-8") for p in files], vocab_size=1024)
    out = tmp_path_factory.mktemp("model")
    cfg = GPTConfig(
        block_size=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_head=16, d_model=32
    )
    save_model(GPT(cfg), out)
    tok.save(out)
    return out


def test_eval_json_has_the_documented_shape(tiny_model_dir):
    res = _cli(
        "eval",
        "--model",
        str(tiny_model_dir),
        "--tasks",
        "single_double_quote,bracket_counting",
        "--n-pairs",
        "4",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["model"] == str(tiny_model_dir)
    assert set(out["tasks"]) == {"single_double_quote", "bracket_counting"}
    for splits in out["tasks"].values():
        for split in ("train", "test"):
            assert 0.0 <= splits[split]["acc"] <= 1.0 and splits[split]["loss"] > 0


def test_tasks_list_and_show(tiny_model_dir):
    res = _cli("tasks", "list")
    assert res.returncode == 0
    listed = [line.split()[0] for line in res.stdout.splitlines()]
    assert len([n for n in listed if "__" not in n]) == 20
    assert "single_double_quote__inverted" in listed
    res = _cli("tasks", "show", "for_while", "--model", str(tiny_model_dir), "--n", "2")
    assert res.returncode == 0, res.stderr
    assert "resolved contrasts" in res.stdout and "[A]" in res.stdout and "[B]" in res.stdout
    line = _one_line_error(_cli("tasks", "show", "for_whilst", "--model", str(tiny_model_dir)))
    assert "for_whilst" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "optim.lr=-1"], "lr must be > 0"),
        (["--set", "steps.x=1"], "'steps' is a value"),
        (["--set", "model=3"], "'model' is a section"),
        (["--device", "nonsense"], "--device 'nonsense'"),
    ],
)
def test_bad_train_options_are_one_line_errors_and_write_nothing(tmp_path, args, expected):
    out = tmp_path / "run"
    line = _one_line_error(_cli("train", "--preset", "tiny", "--out", str(out), *args))
    assert expected in line
    assert not out.exists()


def test_corpus_manifest_prints_counts_and_tokens(tmp_path, tiny_model_dir):
    from tests.data.conftest import write_py_files

    write_py_files(tmp_path / "code", 12)
    res = _cli(
        "corpus",
        "manifest",
        str(tmp_path / "code"),
        "--tokenizer",
        str(tiny_model_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "manifest.json"),
    )
    assert res.returncode == 0, res.stderr
    assert "train:" in res.stdout and "tokens (" in res.stdout
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["tokens"]["train"] > 0 and doc["tokens"]["val"] > 0
    assert doc["split"]["train"]["files"] + doc["split"]["val"]["files"] == 12


def test_corpus_manifest_bad_spec_is_one_line_error(tmp_path):
    line = _one_line_error(_cli("corpus", "manifest", str(tmp_path / "none"), "--no-tokens"))
    assert "does not exist" in line


def test_checkpoint_pack_and_unpack_bad_input_are_one_line_errors(tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "p")
    line = _one_line_error(_cli("checkpoint", "pack", run, "--out", out))
    assert "no checkpoint to pack" in line
    line = _one_line_error(
        _cli("checkpoint", "unpack", str(tmp_path), "--out", str(tmp_path / "run"))
    )
    assert "not a packed run" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1, got -3"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--temperature", "-1"], "--temperature must be a number >= 0 (0: greedy), got -1.0"),
        (["--temperature", "nan"], "--temperature must be a number >= 0 (0: greedy), got nan"),
        (["--top-k", "-2"], "--top-k must be >= 1, got -2"),
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    ],
)
def test_sample_bad_sizes_are_one_line_errors(tiny_model_dir, args, expected):
    line = _one_line_error(_cli("sample", str(tiny_model_dir), *args))
    assert line == f"error: {expected}"


def test_sample_long_prompt_keeps_its_tail_and_says_so(tiny_model_dir):
    from sparsecircuits.data import Tokenizer

    prompt = "".join(f"value_{i} = {i}\n" for i in range(60))
    ids = Tokenizer.load(tiny_model_dir).encode(prompt)
    assert len(ids) > 128  # the tiny model's context
    res = _cli("sample", str(tiny_model_dir), "--prompt", prompt, "--max-new-tokens", "8")
    assert res.returncode == 0, res.stderr
    warning = (
        f"warning: prompt is {len(ids)} tokens; kept the last 120 (the model's context is 128)"
    )
    assert warning in res.stderr.splitlines()
    tail = Tokenizer.load(tiny_model_dir).decode(ids[-120:])
    assert res.stdout.startswith(tail) and not res.stdout.startswith(prompt[:20])
    res = _cli("sample", str(tiny_model_dir), "--prompt", "x = 1", "--max-new-tokens", "4")
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr


def test_fit_prompt_leaves_room_for_new_tokens_but_keeps_half_the_context():
    from sparsecircuits.cli.model import fit_prompt

    ids = list(range(300))
    assert fit_prompt(ids[:128], context=128, max_new_tokens=500) == (ids[:128], "")
    kept, warning = fit_prompt(ids, context=128, max_new_tokens=28)
    assert kept == ids[-100:] and "prompt is 300 tokens; kept the last 100" in warning
    kept, _ = fit_prompt(ids, context=128, max_new_tokens=1000)  # more than the context
    assert kept == ids[-64:]
