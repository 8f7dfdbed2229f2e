"""``import-viz``: a synthetic ``viz_data.pt`` in the official structure, against a tiny official
model directory, becomes a ``circuit.json`` that our loader and dashboard data layer open; bad
files are one-line errors and write nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from sparsecircuits.circuits.edges import edge_set
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.pipeline import load_for_circuits
from sparsecircuits.circuits.schema import CIRCUIT_FILE, check_model, load_circuit, save_circuit
from sparsecircuits.errors import CheckpointError, InputError
from sparsecircuits.interop.viz_import import LOSS_SCALE, import_viz, infer_task
from sparsecircuits.model.io import load_model, weights_hash
from sparsecircuits.viz.analysis import analysis_writer
from sparsecircuits.viz.analysis_schema import load_analysis
from sparsecircuits.viz.app_data import discover_circuits, edge_index, require_circuits
from sparsecircuits.viz.app_layer import layer_figure
from sparsecircuits.viz.export_html import export_html
from tests.circuits.conftest import circuit_tokenizer  # noqa: F401
from tests.model.test_catpos import D_POS, catpos_config, catpos_state
from tests.model.test_official_format import BASE_CONFIG, official_state, resolve, write_official

WINDOWS = 2  # pretraining windows for the analysis (enough to exercise it)
NODES = {  # official location -> kept channels (d_model 48, n_head*d_head 32, d_mlp 96)
    "0.attn.act_in": [5, 7],
    "0.attn.q": [1, 9],
    "0.attn.k": [3],
    "0.attn.v": [3, 30],
    "0.attn.resid_delta": [2, 7],
    "0.mlp.act_in": [2],
    "1.mlp.act_in": [2, 7],
    "1.mlp.post_act": [10, 40, 95],
    "1.mlp.resid_delta": [7],
}


@dataclass
class Unsafe:  # a class the weights_only unpickler refuses
    x: int = 1


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, circuit_tokenizer) -> Path:  # noqa: F811
    """A tiny official model (beeg_config.json + final_model.pt) with a tokenizer.json."""
    cfg = {**BASE_CONFIG, "vocab_size": circuit_tokenizer.vocab_size, "block_size": 64}
    directory = write_official(tmp_path_factory.mktemp("csp_tiny"), cfg, official_state(
        resolve(cfg), 0))  # fmt: skip
    circuit_tokenizer.save(directory)
    return directory


def viz_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """A viz_data.pt payload in the official structure (losses on the official 2x scale)."""
    return {
        "circuit_data": {k: torch.tensor(v) for k, v in NODES.items()},
        "importances": {
            "loss": 0.2,
            "interv_loss": torch.tensor(0.5),
            "ch_interv_losses": {
                k: [0.6 + 0.1 * i for i in range(len(v))] for k, v in NODES.items()
            },
            "layer_interv_losses": {"0.attn": 0.9, "0.mlp": 0.3, "1.attn": 0.25, "1.mlp": 0.7},
            "pair_data": [],
            "pair_data_connections": [],
            "task_samples": [[torch.zeros(4, dtype=torch.long)], {}],
            "beeg_model_config": dict(cfg),
        },
        "samples": {},
        "all_loss": [(0, 0.9), (1, 0.5)],
        "num_total_nodes": 1234,
        "prune_config": {"k": 18, "lr": 0.003, "ablation": torch.tensor([1.0])},
    }


def write_viz(root: Path, data: dict[str, Any], task: str = "single_double_quote_beeg3") -> Path:
    path = root / "viz" / "csp_tiny" / task / "prune_v4" / "18" / "viz_data.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return path


@pytest.fixture
def official_cfg(official_dir) -> dict[str, Any]:
    return json.loads((official_dir / "beeg_config.json").read_text())


def test_import_opens_in_the_dashboard(official_dir, official_cfg, tmp_path):
    src = write_viz(tmp_path, viz_data(official_cfg))
    out = tmp_path / "runs" / "csp_tiny" / "single_double_quote" / "official-18"
    res = import_viz(src, model=official_dir, out=out, analyze=analysis_writer(n_windows=WINDOWS))
    assert res.analysed and res.note is None
    model = load_model(official_dir)
    doc = load_circuit(out, model=model)  # our schema, and the model's weights hash
    assert doc == res.doc
    assert doc.task == "single_double_quote"  # "_beeg3" variant of our task
    assert doc.model.id == str(official_dir.resolve()) and doc.model.n_layer == 2
    assert doc.n_nodes == sum(len(v) for v in NODES.values())
    # losses halved from the official per-pair sums to our per-prompt means
    assert doc.loss.full == pytest.approx(0.1) and doc.loss.circuit == pytest.approx(0.25)
    assert not doc.reached  # 0.25 > the stand-in target 0.15
    byid = {n.id: n for n in doc.nodes}
    assert byid["1.mlp_neuron.95"].delta == pytest.approx(0.8 * LOSS_SCALE - 0.25)
    assert byid["0.attn_q.9"].head == 1 and byid["0.attn_q.9"].channel == 1
    assert all(n.tau == 0.0 for n in doc.nodes)
    deltas = {(d.layer, d.block): (d.n_nodes, d.delta) for d in doc.layer_deltas}
    assert deltas[(0, "attn")] == (9, pytest.approx(0.9 - 0.25))  # as the official viewer
    assert deltas[(0, "mlp")][0] == 1 and deltas[(1, "mlp")][0] == 6
    # edges are the model's weights between the kept nodes, as for a pruned circuit
    space = NodeSpace(model.config)
    kept = torch.tensor(sorted(space.flat_index(n) for n in doc.kept_nodes()))
    assert doc.n_edges == len(edge_set(model, space, kept)) == len(doc.edges) > 0
    imp = doc.imported_from
    assert imp is not None and imp.format == "openai.viz_data" and imp.loss_scale == 0.5
    assert {"nodes[].tau", "loss.circuit_test", "target_loss"} <= set(imp.placeholders)
    assert imp.official["num_total_nodes"] == 1234
    assert imp.official["prune_config"]["ablation"] == [1.0]  # JSON-converted
    assert imp.official["pruning_losses"] == [{"step": 0.0, "loss": 0.45},
                                              {"step": 1.0, "loss": 0.25}]  # fmt: skip
    # the dashboard: discovery (by directory and by the prune layout), analysis, edges, model
    (entry,) = require_circuits(str(out))
    assert discover_circuits(str(tmp_path / "runs")) == [entry]
    assert entry.task == "single_double_quote" and entry.n_nodes == doc.n_nodes
    analysis = load_analysis(out, weights_hash=doc.model.weights_hash)
    assert set(analysis.nodes) == set(byid)
    assert edge_index(doc)
    lm = load_for_circuits(entry.model_id)
    check_model(doc, lm.model, source="circuit.json")
    fig = layer_figure(doc, 1)
    assert set(next(t for t in fig.data if t.name == "nodes").customdata) == {
        n.id for n in doc.nodes if n.layer == 1
    }
    page = export_html(out, out=tmp_path / "page.html").read_text()
    assert "single_double_quote" in page


def test_without_a_tokenizer_the_circuit_is_still_written(official_dir, official_cfg, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("beeg_config.json", "final_model.pt"):
        shutil.copy(official_dir / name, bare / name)
    src = write_viz(tmp_path, viz_data(official_cfg))
    res = import_viz(src, model=bare, out=tmp_path / "c", analyze=analysis_writer(n_windows=2))
    assert not res.analysed and "no tokenizer" in (res.note or "")
    doc = load_circuit(tmp_path / "c")
    assert doc.model.weights_hash == weights_hash(load_model(official_dir))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [CIRCUIT_FILE]


def test_pruned_circuits_keep_their_file_format(official_dir, official_cfg, tmp_path):
    """``imported_from`` is an optional key: a circuit without it writes no such key."""
    res = import_viz(write_viz(tmp_path, viz_data(official_cfg)), model=official_dir,
                     out=tmp_path / "c", analyze=None)  # fmt: skip
    plain = res.doc.model_copy(update={"imported_from": None})
    save_circuit(plain, tmp_path / "plain")
    assert "imported_from" not in json.loads((tmp_path / "plain" / CIRCUIT_FILE).read_text())
    assert load_circuit(tmp_path / "plain") == plain


def test_position_channels_of_concatenated_positions_are_read_nodes(tmp_path):
    """With ``d_pos_emb``, attention and MLP read d_model + d_pos_emb channels: indices from
    d_model up are position channels and import as ordinary read nodes."""
    cfg = catpos_config()
    model_dir = write_official(tmp_path / "catpos", cfg, catpos_state(resolve(cfg), seed=1))
    d, width = cfg["d_model"], cfg["d_model"] + D_POS
    data = viz_data(cfg)
    data["circuit_data"] = {"0.attn.act_in": torch.tensor([3, d + 1]),
                            "1.mlp.act_in": torch.tensor([width - 1])}  # fmt: skip
    data["importances"]["ch_interv_losses"] = {}
    res = import_viz(write_viz(tmp_path, data), model=model_dir, out=tmp_path / "c")
    doc = load_circuit(tmp_path / "c", model=load_model(model_dir))
    assert doc == res.doc and doc.model.d_pos_emb == D_POS
    assert {n.id for n in doc.nodes} == {
        "0.attn_in.3",
        f"0.attn_in.{d + 1}",
        f"1.mlp_in.{width - 1}",
    }
    assert all(n.delta is None for n in doc.nodes)  # no per-channel losses in the file
    data["circuit_data"] = {"0.attn.act_in": torch.tensor([width])}
    with pytest.raises(CheckpointError, match=rf"index {width} outside \[0, {width}\)"):
        import_viz(write_viz(tmp_path / "bad", data), model=model_dir, out=tmp_path / "d")


def _drop(d: dict, *keys: str) -> dict:
    d = dict(d)
    *parents, leaf = keys
    node = d
    for k in parents:
        node[k] = dict(node[k])
        node = node[k]
    del node[leaf]
    return d


def _bad_cases(cfg: dict[str, Any], official_dir: Path) -> dict[str, tuple[Any, str]]:
    good = viz_data(cfg)

    def with_nodes(nodes: dict[str, list[int]]) -> dict:
        return {**good, "circuit_data": {k: torch.tensor(v) for k, v in nodes.items()}}

    ch_short = _drop(good, "importances", "ch_interv_losses")
    ch_short["importances"]["ch_interv_losses"] = {"0.attn.q": [0.1]}
    other = dict(good, importances={**good["importances"],
                                    "beeg_model_config": {**cfg, "n_layer": 8}})  # fmt: skip
    return {
        "no circuit_data": (_drop(good, "circuit_data"), "field 'circuit_data' is missing"),
        "no interv_loss": (
            _drop(good, "importances", "interv_loss"),
            "field 'importances.interv_loss' is missing",
        ),
        "index out of range": (
            with_nodes({"0.attn.q": [1, 32]}),
            "field 'circuit_data.0.attn.q': index 32 outside [0, 32)",
        ),
        "unknown site": (
            with_nodes({"0.attn.y": [1]}),
            "field 'circuit_data': location '0.attn.y' is not a node location",
        ),
        "no such layer": (
            with_nodes({"2.mlp.post_act": [1]}),
            f"location '2.mlp.post_act': {official_dir.resolve()} has layers 0..1",
        ),
        "float indices": (
            {**good, "circuit_data": {"0.attn.q": torch.tensor([1.0])}},
            "field 'circuit_data.0.attn.q': expected a 1-D integer tensor",
        ),
        "nan loss": (
            {**good, "importances": {**good["importances"], "loss": float("nan")}},
            "field 'importances.loss': expected a finite number",
        ),
        "ch losses misaligned": (
            ch_short,
            "field 'importances.ch_interv_losses.0.attn.q': 1 values for the 2 channels",
        ),
        "another model": (other, "n_layer=8 (model: 2)"),
        "positions concatenated in the file's model": (
            dict(
                good,
                importances={**good["importances"], "beeg_model_config": {**cfg, "d_pos_emb": 32}},
            ),
            "d_pos_emb=32 (model: None)",
        ),
        "not weights-only": (
            {**good, "samples": Unsafe()},
            "cannot be read with torch.load(weights_only=True)",
        ),
        "not a dict": ([1, 2], "expected a dict (viz_data.pt), got list"),
    }


def test_bad_files_are_one_line_errors_and_write_nothing(official_dir, official_cfg, tmp_path):
    for name, (data, message) in _bad_cases(official_cfg, official_dir).items():
        root = tmp_path / name.replace(" ", "_")
        src = write_viz(root, data)
        out = root / "out"
        with pytest.raises(CheckpointError) as err:
            import_viz(src, model=official_dir, out=out, analyze=None)
        text = str(err.value)
        assert message in text and "\n" not in text and text.startswith(str(src)), (name, text)
        assert not out.exists(), name
        assert sorted(p.name for p in root.iterdir()) == ["viz"], name  # no temp directory


def test_task_and_output_checks(official_dir, official_cfg, tmp_path):
    src = write_viz(tmp_path, viz_data(official_cfg), task="some_unknown_task")
    assert infer_task(src) is None
    with pytest.raises(InputError, match="give --task NAME"):
        import_viz(src, model=official_dir, out=tmp_path / "c", analyze=None)
    res = import_viz(src, model=official_dir, out=tmp_path / "c", task="their_task",
                     analyze=analysis_writer(n_windows=2))  # fmt: skip
    assert res.doc.task == "their_task" and not res.analysed  # not a task we can build
    assert "not one of our tasks" in (res.note or "")
    with pytest.raises(InputError, match=r"exists and is not an empty directory \(--force"):
        import_viz(src, model=official_dir, out=tmp_path / "c", task="if_equals")
    res = import_viz(src, model=official_dir, out=tmp_path / "c", task="if_equals", force=True,
                     analyze=None)  # fmt: skip
    assert load_circuit(tmp_path / "c").task == "if_equals"
    (tmp_path / "f").write_text("a file, not a circuit directory")
    with pytest.raises(InputError, match="not an empty directory"):
        import_viz(src, model=official_dir, out=tmp_path / "f", task="if_equals", force=True)
    assert (tmp_path / "f").read_text() == "a file, not a circuit directory"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsecircuits.cli", *args], capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_cli_import_viz(official_dir, official_cfg, tmp_path):
    src = write_viz(tmp_path, viz_data(official_cfg))
    out = tmp_path / "c"
    res = _cli("import-viz", str(src), "--model", str(official_dir), "--out", str(out),
               "--no-analyze")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"{out}: single_double_quote, {sum(map(len, NODES.values()))} nodes" in res.stdout
    assert load_circuit(out).imported_from is not None
    bad = write_viz(tmp_path / "bad", _drop(viz_data(official_cfg), "importances"))
    res = _cli("import-viz", str(bad), "--model", str(official_dir), "--out", str(tmp_path / "d"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: field 'importances' is missing"]
    assert not (tmp_path / "d").exists()
