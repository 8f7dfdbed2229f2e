"""The planted-circuit model: pruning recovers the planted nodes, every check passes on the
planted circuit and fails on corrupted versions of it (nodes dropped, nodes swapped for
distractors, a wrong-sign calibration, a model whose control task is doable)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsecircuits.circuits import testing as T
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.pipeline import find_circuit, load_for_circuits
from sparsecircuits.circuits.prune import PruneConfig
from sparsecircuits.circuits.schema import save_circuit
from sparsecircuits.circuits.verify import CHECKS, build_context, check_fns
from sparsecircuits.circuits.verify_report import validate
from sparsecircuits.circuits.verify_tools import VerifyOptions
from sparsecircuits.errors import CheckpointError

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
    # ablation_kinds has no verdict; frozen_norms is sufficiency again for a circuit pruned
    # with frozen norms.
    special = {"ablation_kinds": "INFO", "frozen_norms": "N/A"}
    assert verdicts == {n: special.get(n, "PASS") for n in CHECKS}
    assert not any(c["uncertain"] for c in by.values())
    assert by["interchange"]["share_follow"] > 0.95


def test_checks_fail_when_planted_nodes_are_dropped(planted, tmp_path):
    space = _space(planted)
    flat = T.planted_flat(space, tuple(n for n in T.PLANTED if n.loc.value != "attn_k"))
    by = _report(planted, tmp_path, flat, checks=["sufficiency", "necessity", "swap_null"])
    assert by["sufficiency"]["verdict"] == "FAIL"
    assert by["necessity"]["verdict"] == by["swap_null"]["verdict"] == "N/A"


def test_checks_fail_when_nodes_are_swapped_for_distractors(planted, tmp_path):
    """Every planted node swapped for a node of its group that carries the same signal (head 1
    does what head 0 does, neuron 1 reads what neuron 0 reads) or none: nothing reaches the
    answer, so sufficiency fails, and patching the set moves nothing, so interchange fails."""
    flat = T.planted_flat(_space(planted), T.DECOYS)
    checks = ["sufficiency", "interchange", "necessity", "random_circuits", "swap_null"]
    by = _report(planted, tmp_path, flat, checks=checks)
    verdicts = {n: by[n]["verdict"] for n in checks}
    assert verdicts == {**dict.fromkeys(checks[:2], "FAIL"), **dict.fromkeys(checks[2:], "N/A")}


def test_a_wrong_sign_calibration_is_refused(planted, tmp_path):
    """A stored calibration that inverts the logits (which pruning can no longer fit) would
    turn a circuit that does the opposite of the task into a pass: the file is refused."""
    doc = T.circuit_for_nodes(planted, T.TASK, T.planted_flat(_space(planted)), CFG)
    path = save_circuit(doc, tmp_path)
    data = json.loads(path.read_text())
    for bad in ({"scale": -1.0, "shift": 0.0}, {"shift": 0.0}, {"scale": "nan", "shift": 0.0}):
        path.write_text(json.dumps({**data, "calibration": bad}))
        with pytest.raises(CheckpointError, match="calibration") as err:
            validate(tmp_path, model=str(planted.directory), checks=["sufficiency"])
        assert "\n" not in str(err.value)


def test_negative_controls_fail_when_the_control_is_doable(tmp_path_factory, tmp_path):
    """A model that also writes the answer into the control tokens' logits: the arbitrary
    mapping control is then solved by the circuit's own nodes, and the check must say so."""
    lm = load_for_circuits(str(T.save_planted_model(tmp_path_factory.mktemp("leak"),
                                                    leak_control=True)))  # fmt: skip
    by = _report(lm, tmp_path, T.planted_flat(_space(lm)), checks=["negative_controls"])
    check = by["negative_controls"]
    assert check["verdict"] == "FAIL"
    assert check["controls"]["arbitrary"]["reached"]


def test_random_init_fails_when_random_weights_do_the_task(planted, tmp_path, monkeypatch):
    """If the 'random' model did the task as the trained one does (here: it is the trained
    model), the control must fail: the circuit would then say nothing about training."""
    from sparsecircuits.circuits import verify_reprune

    monkeypatch.setattr(verify_reprune, "random_init_model", lambda lm, seed: lm)
    by = _report(planted, tmp_path, T.planted_flat(_space(planted)), checks=["random_init"])
    assert by["random_init"]["verdict"] == "FAIL" and by["random_init"]["reached"]


def test_seed_stability_fails_for_disjoint_node_sets(planted, tmp_path, monkeypatch):
    """Seeds that find disjoint circuits must fail the stability check."""
    from sparsecircuits.circuits import verify_reprune

    def elsewhere(lm, task, cfg, **kw):
        return {"n_nodes": 8, "reached": True, "loss": 0.0, "loss_test": 0.0,
                "loss_full": 0.0, "kept": list(range(100 + 8 * cfg.seed, 108 + 8 * cfg.seed)),
                "seconds": 0.0}  # fmt: skip

    monkeypatch.setattr(verify_reprune, "prune_task", elsewhere)
    by = _report(planted, tmp_path, T.planted_flat(_space(planted)), checks=["seed_stability"])
    assert by["seed_stability"]["verdict"] == "FAIL"


# ----------------------------------------------------------------------------- scripted losses
# Each check's FAIL path on the planted circuit, with the per-prompt losses it sees scripted:
# an always-PASS or a mutated criterion in any of these checks fails a test here.
def _scripted(lm, tmp: Path, rule):
    doc = T.circuit_for_nodes(lm, T.TASK, T.planted_flat(_space(lm)), CFG)
    save_circuit(doc, tmp)
    ctx = build_context(doc, lm, OPTIONS)
    circuit = torch.zeros(ctx.space.total)
    circuit[ctx.kept] = 1.0

    def losses(gates, *, ev=None, cal=False):
        del ev, cal
        kind = "circuit" if torch.equal(gates, circuit) else "full" if bool(gates.all()) else None
        return torch.full((ctx.data.test.n_prompts,), rule(kind, float(gates.mean())))

    ctx.losses = losses
    return ctx


def test_necessity_fails_when_ablating_the_circuit_barely_hurts(planted, tmp_path):
    rule = lambda kind, frac: {"circuit": 0.05, "full": 0.02}.get(kind, 0.1)  # noqa: E731
    result = check_fns()["necessity"](_scripted(planted, tmp_path, rule))
    assert result["verdict"] == "FAIL" and result["fraction"] < 0.5


@pytest.mark.parametrize("check", ["random_circuits", "swap_null"])
def test_comparison_checks_fail_when_other_node_sets_do_as_well(planted, tmp_path, check):
    rule = lambda kind, frac: {"circuit": 0.1, "full": 0.02}.get(kind, 0.05)  # noqa: E731
    assert check_fns()[check](_scripted(planted, tmp_path, rule))["verdict"] == "FAIL"


def test_mask_relaxation_fails_on_a_bump(planted, tmp_path):
    """The loss rises well above both endpoints halfway back to the full model."""
    rule = lambda kind, frac: {"circuit": 0.1, "full": 0.02}.get(kind, 0.4)  # noqa: E731
    result = check_fns()["mask_relaxation"](_scripted(planted, tmp_path, rule))
    assert result["verdict"] == "FAIL" and result["max_rise"] > 0.2


def test_swap_null_fails_for_a_padded_circuit(planted, tmp_path):
    """The planted circuit plus 40 random nodes still reaches the target, but swapping 10% of
    its nodes mostly hits padding, so most swapped copies do as well: not a minimal circuit."""
    space = _space(planted)
    gen = torch.Generator().manual_seed(0)
    rest = torch.tensor(
        [i for i in range(space.total) if i not in set(T.planted_flat(space).tolist())]
    )
    flat = torch.cat([T.planted_flat(space), rest[torch.randperm(len(rest), generator=gen)[:40]]])
    checks = ["sufficiency", "swap_null", "negative_controls"]
    by = _report(planted, tmp_path, flat.sort().values, checks=checks)
    assert by["sufficiency"]["verdict"] == "PASS" and by["swap_null"]["verdict"] == "FAIL"
    # Controls are measured against the task re-pruned with their settings, not the padding.
    assert by["negative_controls"]["n_nodes_task"] == len(T.PLANTED)
