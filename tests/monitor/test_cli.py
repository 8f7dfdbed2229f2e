"""``sparsecircuits monitor catalog | calibrate | policy-check`` end to end on the planted model
(circuits reused, so nothing is pruned), and their one-line errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sparsecircuits.circuits import testing as T
from sparsecircuits.cli import app
from tests.monitor.conftest import TASK_B


def test_catalog_calibrate_and_policy_check_commands(planted, families_file, circuit_dirs,
                                                     tmp_path):  # fmt: skip
    cat = tmp_path / "cat"
    run = CliRunner().invoke
    reuse = [f"--reuse={t}={d}" for t, d in circuit_dirs.items()]
    res = run(app, ["monitor", "catalog", "--model", str(planted.directory), "--out", str(cat),
                    "--families", str(families_file), *reuse, "--windows", "2",
                    "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "quotes: 1 admitted (planted_quote), 8 nodes" in res.output
    assert f"rejected {TASK_B}: necessity FAIL" in res.output
    assert json.loads((cat / "catalog.json").read_text())["weights_hash"] == planted.hash

    res = run(app, ["monitor", "calibrate", "--catalog", str(cat), "--windows", "2",
                    "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    base = json.loads((cat / "baseline.json").read_text())
    assert set(base["families"]) == {"quotes"} and base["flag"] == {"z": 4.0, "k": 3, "n": 8}

    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - {family: quotes, action: dampen, "
                      "dampen: {mode: mean_ablate}}\n")  # fmt: skip
    res = run(app, ["monitor", "policy-check", str(policy), "--catalog", str(cat), "--pairs",
                    "4", "--windows", "1", "--task", T.TASK, "--task", "with_as",
                    "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "rules[0]: dampen quotes" in res.output and T.TASK in res.output
    assert "held-out loss" in res.output and "policy sha256" in res.output


def test_monitor_commands_refuse_bad_input_in_one_line(catalog_dir, tmp_path):
    from sparsecircuits.cli import main  # noqa: F401  (the entry point prints `error: ...`)

    run = CliRunner().invoke
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - {family: decoys, action: block}\n")
    res = run(app, ["monitor", "policy-check", str(policy), "--catalog", str(catalog_dir)])
    assert res.exit_code != 0
    assert "unknown family 'decoys' (monitored: quotes)" in str(res.exception)
    res = run(app, ["monitor", "calibrate", "--catalog", str(catalog_dir), "--k", "9"])
    assert res.exit_code != 0 and "k (9) must be <= n (8)" in str(res.exception)
    res = run(app, ["monitor", "catalog", "--out", str(tmp_path), "--reuse", "nonsense"])
    assert res.exit_code != 0 and "expected TASK=CIRCUIT_DIR" in str(res.exception)
