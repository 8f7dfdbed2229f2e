"""circuit.json end to end: find a circuit on a tiny model, save, reload, and refuse bad files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsecircuits.circuits import pipeline
from sparsecircuits.circuits.edges import WEIGHT_KINDS
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.prune import PruneConfig, PruneResult
from sparsecircuits.circuits.report import MASKS_FILE, SEARCH_FILE, save_prune_outputs
from sparsecircuits.circuits.schema import CIRCUIT_FILE, CircuitDoc, load_circuit
from sparsecircuits.errors import CheckpointError
from sparsecircuits.model.io import load_model, save_model, weights_hash

CFG = dict(steps=3, n_train_pairs=8, n_test_pairs=8, batch_pairs=4, ablation="zero")


@dataclass
class Found:
    lm: pipeline.LoadedModel
    doc: CircuitDoc
    result: PruneResult
    out: Path
    kind: str


def _find(lm: pipeline.LoadedModel, target: float, out: Path, kind: str) -> Found:
    doc, result, trials = pipeline.find_circuit(
        lm, "single_double_quote", PruneConfig(**CFG, target_loss=target)
    )
    save_prune_outputs(out, doc, result, trials)
    return Found(lm, doc, result, out, kind)


@pytest.fixture(scope="module")
def lm(circuit_model_dir) -> pipeline.LoadedModel:
    return pipeline.load_for_circuits(str(circuit_model_dir))


@pytest.fixture(scope="module")
def missed(lm, tmp_path_factory) -> Found:
    """An unreachable target: the whole model is the circuit (every edge kind, linear deltas)."""
    return _find(lm, 1e-6, tmp_path_factory.mktemp("missed"), "missed")


@pytest.fixture(scope="module")
def small(lm, missed, tmp_path_factory) -> Found:
    """A target just above the full model's loss (same prompts and ablation): reached."""
    return _find(lm, missed.doc.loss.full + 0.01, tmp_path_factory.mktemp("small"), "small")


@pytest.fixture(params=["small", "missed"])
def found(request) -> Found:
    return request.getfixturevalue(request.param)


def test_round_trip_and_counts(found):
    doc = found.doc
    loaded = load_circuit(found.out, model=found.lm.model)
    assert loaded == doc
    assert load_circuit(found.out / CIRCUIT_FILE) == doc
    raw = json.loads((found.out / CIRCUIT_FILE).read_text())
    assert raw["schema"] == "sparsecircuits.circuit" and raw["version"] == 1
    assert isinstance(raw["n_nodes"], int) and isinstance(raw["n_edges"], int)
    assert set(raw["loss"]) >= {"full", "circuit", "circuit_test"}
    assert raw["n_nodes"] == len(raw["nodes"]) == found.result.k
    assert raw["n_edges"] == len(raw["edges"]) == sum(raw["n_edges_by_kind"].values())
    assert doc.n_weight_edges == sum(doc.n_edges_by_kind[k] for k in WEIGHT_KINDS)
    assert sum(doc.n_nodes_by_location.values()) == doc.n_nodes
    assert doc.total_nodes == NodeSpace(found.lm.model.config).total
    space = NodeSpace(found.lm.model.config)
    assert doc.kept_flat(space) == found.result.kept.tolist()
    ids = {n.id for n in doc.nodes}
    assert all(e.src in ids and e.dst in ids for e in doc.edges)
    assert doc.loss.circuit == pytest.approx(found.result.loss_circuit, rel=1e-6)
    assert doc.model.weights_hash == weights_hash(found.lm.model)
    assert doc.reached == (doc.loss.circuit <= doc.target_loss)
    masks = load_file(str(found.out / MASKS_FILE))
    assert torch.equal(masks["tau"], found.result.tau)
    assert torch.equal(masks["order"], found.result.order)
    search = json.loads((found.out / SEARCH_FILE).read_text())
    assert len(search["trials"]) == 1 and search["trials"][0]["n_nodes"] == doc.n_nodes


def test_small_and_missed_circuits(found):
    doc = found.doc
    if found.kind == "missed":
        assert not doc.reached and doc.n_nodes == doc.total_nodes
        assert doc.delta_method == "linear"
        assert {k for k, n in doc.n_edges_by_kind.items() if n == 0} == {"embed"}
    else:
        assert doc.reached and doc.n_nodes < doc.total_nodes
    small = doc.n_nodes <= pipeline.MAX_EXACT_DELTAS
    assert doc.delta_method == ("exact" if small else "linear")
    assert all(n.delta is not None for n in doc.nodes)


def test_load_against_other_weights_is_refused(small, circuit_model_dir):
    other = load_model(circuit_model_dir)
    with torch.no_grad():
        other.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    with pytest.raises(CheckpointError, match="hash") as err:
        load_circuit(small.out, model=other)
    assert "\n" not in str(err.value) and CIRCUIT_FILE in str(err.value)


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / CIRCUIT_FILE
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _bad_cases(raw: dict) -> dict[str, tuple[object, str]]:
    missing = {k: v for k, v in raw.items() if k != "n_edges"}
    extra = {**raw, "surprise": 1}
    wrong_type = {**raw, "n_nodes": "many"}
    return {
        "schema": ({**raw, "schema": "something.else"}, "not a circuit file"),
        "no_schema": ({k: v for k, v in raw.items() if k != "schema"}, "not a circuit file"),
        "version": ({**raw, "version": 99}, "version 99"),
        "missing": (missing, "n_edges"),
        "extra": (extra, "surprise"),
        "wrong_type": (wrong_type, "n_nodes"),
        "not_json": ("{nope", "JSON"),
        "list": ([1, 2], "not a circuit file"),
        "n_nodes": ({**raw, "n_nodes": raw["n_nodes"] + 1}, "n_nodes"),
        "layer": (_node(raw, layer=raw["model"]["n_layer"]), "layer"),
        "index": (_node(raw, index=10**6), "outside"),
        "negative": (_node(raw, index=-1), "outside"),
        "twice": (
            {**raw, "nodes": raw["nodes"] + raw["nodes"][:1], "n_nodes": raw["n_nodes"] + 1},
            "twice",
        ),
    }


def _node(raw: dict, **change) -> dict:
    """``raw`` with its first node changed (a node the recorded model does not have)."""
    return {**raw, "nodes": [{**raw["nodes"][0], **change}, *raw["nodes"][1:]]}


@pytest.mark.parametrize(
    "case",
    ["schema", "no_schema", "version", "missing", "extra", "wrong_type", "not_json", "list",
     "n_nodes", "layer", "index", "negative", "twice"],
)  # fmt: skip
def test_bad_files_raise_one_line_error(small, tmp_path, case):
    raw = json.loads((small.out / CIRCUIT_FILE).read_text())
    data, needle = _bad_cases(raw)[case]
    path = _write(tmp_path, data)
    with pytest.raises(CheckpointError) as err:
        load_circuit(path)
    msg = str(err.value)
    assert str(path) in msg and needle in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such circuit file"):
        load_circuit(tmp_path)


def test_weights_hash_compact_vs_dense(circuit_model_dir, tmp_path):
    model = load_model(circuit_model_dir)
    lm_head = model.lm_head.weight  # big and sparse enough to be stored compactly
    assert bool((torch.signbit(lm_head) & (lm_head == 0)).any())  # -0.0 from masking by mul
    save_model(model, tmp_path / "dense")
    save_model(model, tmp_path / "compact", compact=True)
    dense, compact = load_model(tmp_path / "dense"), load_model(tmp_path / "compact")
    h = weights_hash(model)
    assert weights_hash(dense) == weights_hash(compact) == h
    with torch.no_grad():
        compact.transformer.h[1].attn.c_proj.weight[3, 2] += 1e-3
    assert weights_hash(compact) != h
    with torch.no_grad():
        dense.final_logits_bias[0] += 1e-3  # buffers count too
    assert weights_hash(dense) != h
