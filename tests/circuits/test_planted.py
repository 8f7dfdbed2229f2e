"""The planted-circuit model: pruning recovers the planted nodes, every check passes on the
planted circuit and fails on corrupted versions of it (nodes dropped, nodes swapped for
distractors, a wrong-sign calibration, a model whose control task is doable)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsecircuits.circuits import testing as T
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.pipeline import find_circuit, load_for_circuits
from sparsecircuits.circuits.prune import PruneConfig
from sparsecircuits.circuits.schema import save_circuit
from sparsecircuits.circuits.verify import CHECKS
from sparsecircuits.circuits.verify_report import validate
from sparsecircuits.circuits.verify_tools import VerifyOptions
from sparsecircuits.tasks.metrics import Calibration

# Frozen norms: with live norms, a channel nothing reads still changes the normalisation scale
# of everything it shares a residual stream with, and pruning keeps such carriers (see
# test_live_norms_keep_every_planted_node); the planted circuit is exact only without that path.
CFG = PruneConfig(frozen_norms=True)
OPTIONS = VerifyOptions(n_random=20, seeds=2, relax_seeds=2, prune_steps=40)


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSECIRCUITS_CACHE", str(tmp_path_factory.mktemp("cache")))
        T.register_planted_task()
        yield
        T.unregister_planted_task()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return load_for_circuits(str(T.save_planted_model(tmp_path_factory.mktemp("planted"))))


def _space(lm) -> NodeSpace:
    return NodeSpace(lm.model.config)


@pytest.mark.parametrize("seed", [0, 1])
def test_pruning_recovers_the_planted_circuit(planted, seed):
    doc, result, _ = find_circuit(planted, T.TASK, CFG.replace(seed=seed))
    space = _space(planted)
    kept, want = set(result.kept.tolist()), set(T.planted_flat(space).tolist())
    assert want <= kept, "a planted node was pruned"
    extra = kept - want
    assert len(extra) <= 0.1 * len(kept), [space.node(i).label(4) for i in extra]
    assert doc.reached and doc.loss.circuit_test <= CFG.target_loss


def test_live_norms_keep_every_planted_node(planted):
    """The default (live norms) keeps the planted circuit too, plus carriers of its signal."""
    _, result, _ = find_circuit(planted, T.TASK, PruneConfig())
    want = set(T.planted_flat(_space(planted)).tolist())
    assert want <= set(result.kept.tolist())


def _report(lm, tmp: Path, flat: torch.Tensor, *, checks=CHECKS, **kw) -> dict[str, dict]:
    doc = T.circuit_for_nodes(lm, T.TASK, flat, CFG, **kw)
    save_circuit(doc, tmp)
    report = validate(tmp, model=str(lm.directory), options=OPTIONS, checks=checks)
    return {c["name"]: c for c in report["checks"]}


def test_every_check_passes_on_the_planted_circuit(planted, tmp_path):
    by = _report(planted, tmp_path, T.planted_flat(_space(planted)))
    verdicts = {name: c["verdict"] for name, c in by.items()}
    assert verdicts == {n: "INFO" if n == "ablation_kinds" else "PASS" for n in CHECKS}
    assert not any(c["uncertain"] for c in by.values())
    assert by["interchange"]["share_follow"] > 0.95


def test_checks_fail_when_planted_nodes_are_dropped(planted, tmp_path):
    space = _space(planted)
    flat = T.planted_flat(space, tuple(n for n in T.PLANTED if n.loc.value != "attn_k"))
    by = _report(planted, tmp_path, flat, checks=["sufficiency", "necessity", "frozen_norms"])
    assert by["sufficiency"]["verdict"] == "FAIL" and by["frozen_norms"]["verdict"] == "FAIL"
    assert by["necessity"]["verdict"] == "N/A"


def test_checks_fail_when_nodes_are_swapped_for_distractors(planted, tmp_path):
    """Every planted node swapped for a node of its group that carries the same signal (head 1
    does what head 0 does, neuron 1 reads what neuron 0 reads) or none: nothing reaches the
    answer, so sufficiency fails, and patching the set moves nothing, so interchange fails."""
    flat = T.planted_flat(_space(planted), T.DECOYS)
    checks = ["sufficiency", "interchange", "frozen_norms", "random_circuits", "swap_null"]
    by = _report(planted, tmp_path, flat, checks=checks)
    verdicts = {n: by[n]["verdict"] for n in checks}
    assert verdicts == {**dict.fromkeys(checks[:3], "FAIL"), **dict.fromkeys(checks[3:], "N/A")}


def test_a_wrong_sign_calibration_fails(planted, tmp_path):
    """A calibration that inverts the logits (which pruning can no longer fit) is caught."""
    flat = T.planted_flat(_space(planted))
    by = _report(planted, tmp_path, flat, calibration=Calibration(-1.0, 0.0),
                 checks=["sufficiency", "frozen_norms", "necessity"])  # fmt: skip
    assert by["sufficiency"]["verdict"] == "FAIL" and by["frozen_norms"]["verdict"] == "FAIL"
    assert by["necessity"]["verdict"] == "N/A"  # only judged for circuits that reach the target


def test_negative_controls_fail_when_the_control_is_doable(tmp_path_factory, tmp_path):
    """A model that also writes the answer into the control tokens' logits: the arbitrary
    mapping control is then solved by the circuit's own nodes, and the check must say so."""
    lm = load_for_circuits(str(T.save_planted_model(tmp_path_factory.mktemp("leak"),
                                                    leak_control=True)))  # fmt: skip
    by = _report(lm, tmp_path, T.planted_flat(_space(lm)), checks=["negative_controls"])
    check = by["negative_controls"]
    assert check["verdict"] == "FAIL"
    assert check["controls"]["arbitrary"]["reached"]
