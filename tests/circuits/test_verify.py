"""``sparsecircuits validate``: the faithfulness checks on a tiny pruned circuit, the report
files, refusal of a different model, and the sparsity-preserving random re-initialisation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsecircuits import tasks
from sparsecircuits.circuits.pipeline import find_circuit, load_for_circuits
from sparsecircuits.circuits.prune import PruneConfig
from sparsecircuits.circuits.report import save_prune_outputs
from sparsecircuits.circuits.verdicts import jaccard, spearman
from sparsecircuits.circuits.verify import CHECKS, VerifyOptions
from sparsecircuits.circuits.verify_report import REPORT_JSON, REPORT_MD, validate
from sparsecircuits.circuits.verify_tools import control_task, randomize_weights
from sparsecircuits.errors import CheckpointError, InputError
from sparsecircuits.model.io import save_model
from tests.circuits.conftest import circuit_model

TASK = "with_as"  # no registered controls: validate registers and removes temporary ones
CFG = PruneConfig(steps=5, n_train_pairs=8, n_test_pairs=8, batch_pairs=4, target_loss=10.0)


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Pretraining means of the throwaway models are cached in a temp dir, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSECIRCUITS_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def circuit_dir(tmp_path_factory, circuit_model_dir: Path) -> Path:
    """A circuit of TASK pruned (5 steps) in the tiny model, saved as ``prune`` does."""
    lm = load_for_circuits(str(circuit_model_dir))
    doc, result, trials = find_circuit(lm, TASK, CFG)
    dest = tmp_path_factory.mktemp("circuit")
    save_prune_outputs(dest, doc, result, trials)
    return dest


def _strict_json(path: Path) -> dict:
    def refuse(name: str):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_validate_command_writes_a_complete_report(circuit_dir: Path, tmp_path: Path):
    from sparsecircuits.cli import app

    before = tasks.names(include_controls=True)
    res = CliRunner().invoke(
        app, ["validate", str(circuit_dir), "--quick", "--out", str(tmp_path), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert "sufficiency" in res.output and "report written to" in res.output
    assert tasks.names(include_controls=True) == before  # temporary controls are gone

    report = _strict_json(tmp_path / REPORT_JSON)
    assert report["circuit"] == str(circuit_dir / "circuit.json")
    assert report["task"] == TASK and report["model"] and report["options"]["quick"]
    assert [c["name"] for c in report["checks"]] == list(CHECKS)
    for c in report["checks"]:
        assert c["verdict"] in ("PASS", "FAIL", "N/A", "INFO"), c["name"]
        assert c["passed"] is {"PASS": True, "FAIL": False}.get(c["verdict"]), c["name"]
        assert isinstance(c["summary"], str) and c["summary"], c["name"]
        assert c["criterion"] and c["seconds"] >= 0
    counts = [report[k] for k in ("passed", "failed", "not_applicable", "info")]
    assert sum(counts) == len(CHECKS)
    assert report["passed"] == sum(c["passed"] is True for c in report["checks"])
    assert (
        report["calibration"] is None
        and "no logit calibration" in (tmp_path / REPORT_MD).read_text()
    )

    by = {c["name"]: c for c in report["checks"]}
    assert by["sufficiency"]["loss"] == pytest.approx(by["sufficiency"]["loss_stored"], abs=1e-5)
    assert by["sufficiency"]["passed"]  # target 10 nats
    assert by["ablation_kinds"]["verdict"] == "INFO"  # no verdict of its own
    lo, hi = by["sufficiency"]["interval"]
    assert lo <= by["sufficiency"]["loss"] <= hi
    assert set(by["ablation_kinds"]["losses"]) == {"zero", "mean", "task_mean"}
    assert len(by["random_circuits"]["random_losses"]) == 20
    assert set(by["negative_controls"]["controls"]) == {"constant", "arbitrary", "inverted"}
    curve = by["mask_relaxation"]["curve"]
    assert curve[-1]["loss"] == pytest.approx(by["mask_relaxation"]["loss_full"])
    assert [r["seed"] for r in by["seed_stability"]["runs"]] == [0, 1]
    assert by["random_init"]["random_model_hash"] != report["model_hash"]

    md = (tmp_path / REPORT_MD).read_text()
    assert "| check | verdict | summary |" in md
    for c in report["checks"]:
        shown = c["verdict"] + (" (uncertain)" if c["uncertain"] else "")
        assert f"| {c['name']} | {shown} |" in md


def test_a_failing_check_is_reported_as_failing(circuit_dir: Path, tmp_path: Path):
    data = json.loads((circuit_dir / "circuit.json").read_text())
    data["target_loss"] = 1e-6
    data["prune_config"]["target_loss"] = 1e-6
    (tmp_path / "circuit.json").write_text(json.dumps(data))
    report = validate(
        tmp_path / "circuit.json",
        model=data["model"]["id"],
        options=VerifyOptions.quick_mode(),
        checks=["sufficiency", "frozen_norms", "ablation_kinds"],
    )
    assert [c["name"] for c in report["checks"]] == [  # report order
        "sufficiency",
        "ablation_kinds",
        "frozen_norms",
    ]
    verdicts = [c["verdict"] for c in report["checks"]]
    assert verdicts == ["FAIL", "INFO", "FAIL"]
    assert report["failed"] == 2 and report["passed"] == 0 and report["info"] == 1
    assert "| sufficiency | FAIL |" in (tmp_path / REPORT_MD).read_text()


def test_a_check_subset_updates_the_report_instead_of_replacing_it(circuit_dir, tmp_path):
    """``validate --check X`` after a full run keeps the other checks' results."""
    first = validate(circuit_dir, out=tmp_path, options=VerifyOptions.quick_mode(),
                     checks=["sufficiency", "necessity", "frozen_norms"])  # fmt: skip
    again = validate(circuit_dir, out=tmp_path, checks=["necessity"])
    assert [c["name"] for c in again["checks"]] == ["sufficiency", "necessity", "frozen_norms"]
    assert again["checks"][0] == first["checks"][0]
    assert json.loads((tmp_path / REPORT_JSON).read_text())["checks"][2] == first["checks"][2]


def test_sufficiency_judges_a_calibrated_circuit_as_pruning_did(circuit_model_dir, tmp_path):
    lm = load_for_circuits(str(circuit_model_dir))
    doc, result, trials = find_circuit(lm, TASK, CFG.replace(calibrate=True))
    save_prune_outputs(tmp_path, doc, result, trials)
    report = validate(tmp_path, checks=["sufficiency"])
    (check,) = report["checks"]
    assert doc.calibration is not None
    assert check["loss"] == pytest.approx(doc.loss.circuit_test, abs=1e-5)
    assert check["loss_raw"] != pytest.approx(check["loss"], abs=1e-6)


def test_validate_refuses_a_different_model(circuit_dir: Path, tmp_path: Path, circuit_tokenizer):
    other = tmp_path / "other"
    save_model(circuit_model(circuit_tokenizer.vocab_size, seed=1), other)
    circuit_tokenizer.save(other)
    with pytest.raises(CheckpointError, match="weights"):
        validate(circuit_dir, model=str(other), checks=["sufficiency"])
    with pytest.raises(CheckpointError, match="no such circuit file"):
        validate(tmp_path / "missing.json")
    with pytest.raises(InputError, match="unknown check"):
        validate(circuit_dir, checks=["sufficency"])
    with pytest.raises(InputError, match="2 seeds"):
        validate(circuit_dir, options=VerifyOptions(seeds=1))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(InputError, match="not a directory"):
        validate(circuit_dir, out=a_file, checks=["sufficiency"])
    # Through the command line: one line, exit status 2, no traceback, no report.
    res = subprocess.run(
        [sys.executable, "-m", "sparsecircuits.cli", "validate", str(circuit_dir), "--model",
         str(other), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "weights" in errors[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "r").exists()


def test_randomize_weights_keeps_the_exact_sparsity_pattern(circuit_tokenizer):
    model = circuit_model(circuit_tokenizer.vocab_size)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rand = randomize_weights(model, seed=3)
    again = randomize_weights(model, seed=3).state_dict()
    other = randomize_weights(model, seed=4).state_dict()
    for name, new in rand.state_dict().items():
        old = original[name]
        assert torch.equal(model.state_dict()[name], old), f"{name}: original changed"
        assert torch.equal(new, again[name]), f"{name}: not reproducible"
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.equal(new, torch.ones_like(new) if "weight" in name else 0 * new)
            continue
        if name == "bigram_table":  # a corpus statistic: the control keeps it
            assert torch.equal(new, old)
            continue
        assert torch.equal(new != 0, old != 0), f"{name}: sparsity pattern changed"
        nz = old != 0
        if nz.sum() > 1:
            assert not torch.equal(new[nz], old[nz]) and not torch.equal(new, other[name])
            ratio = new[nz].pow(2).mean().sqrt() / old[nz].pow(2).mean().sqrt()
            assert 0.5 < float(ratio) < 2.0, f"{name}: scale not kept"
    assert any((v == 0).float().mean() > 0.5 for v in rand.state_dict().values())


def test_statistics_and_controls():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert jaccard(set(), set()) == 1.0
    assert spearman([0, 1, 2, 3], [5, 3, 2, 0]) == pytest.approx(-1.0)
    assert spearman([0, 1, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([0, 1, 2], [0, 0, 1]) == pytest.approx(math.sqrt(3) / 2)  # ties averaged
    assert math.isnan(spearman([0, 1, 2], [1, 1, 1]))
    registered = control_task("single_double_quote", "constant")
    assert registered is tasks.get("single_double_quote__constant")
    built = control_task(TASK, "inverted")
    assert built.name == f"{TASK}__inverted" and built.control
    assert built.name not in tasks.names(include_controls=True)
