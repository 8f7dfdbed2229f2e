"""The dashboard's Streamlit-free parts: finding circuits, tables, the layer figure, token
heatmaps and the launch command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from sparsecircuits.circuits.nodes import QKV
from sparsecircuits.circuits.schema import load_circuit
from sparsecircuits.errors import InputError
from sparsecircuits.viz import app_figures as f
from sparsecircuits.viz import app_tokens as tk
from sparsecircuits.viz.analysis_schema import MetricRow, load_analysis
from sparsecircuits.viz.app_data import (
    discover_circuits,
    edge_index,
    read_report,
    report_rows,
    require_circuits,
)
from sparsecircuits.viz.app_layer import layer_figure, layer_layout
from sparsecircuits.viz.launch import streamlit_command


def test_discover_layouts(viz_circuit_dir, tmp_path):
    runs = tmp_path / "runs"
    label = "circuit_model0"  # model_label of the tiny model's directory name
    doc = load_circuit(viz_circuit_dir)
    for run in ("20250101-000000", "20250102-000000"):
        dest = runs / label / doc.task / run
        shutil.copytree(viz_circuit_dir, dest)
        data = json.loads((dest / "circuit.json").read_text())
        data["model"]["id"] = str(tmp_path / label)
        (dest / "circuit.json").write_text(json.dumps(data))
    (runs / "junk" / "t" / "r").mkdir(parents=True)
    (runs / "junk" / "t" / "r" / "circuit.json").write_text("{not json")
    direct = discover_circuits(str(viz_circuit_dir))
    assert [e.path for e in direct] == [viz_circuit_dir] and direct[0].task == doc.task
    for target in (runs, runs / label, runs / label / doc.task):
        found = discover_circuits(str(target))
        assert [e.run for e in found] == ["20250102-000000", "20250101-000000"]  # newest first
        assert {e.model for e in found} == {label}
    by_model = discover_circuits(str(tmp_path / label), runs_dir=runs)  # a model spec
    assert len(by_model) == 2 and by_model[0].label.endswith(f"({doc.n_nodes} nodes)")
    with pytest.raises(InputError, match="sparsecircuits prune"):
        require_circuits("no-such-model", runs_dir=runs)


def test_edge_index_and_report(viz_circuit_dir, tmp_path):
    doc = load_circuit(viz_circuit_dir)
    idx = edge_index(doc)
    e = doc.edges[0]
    assert any(r.direction == "out" and r.node == e.dst for r in idx[e.src])
    assert any(r.direction == "in" and r.node == e.src for r in idx[e.dst])
    assert sum(len(v) for v in idx.values()) == 2 * len(doc.edges)
    assert read_report(tmp_path) is None
    checks = [
        {"name": "sufficiency", "passed": True, "criterion": "c", "summary": "s"},
        {"name": "necessity", "passed": False, "criterion": "c2", "summary": "s2"},
    ]
    (tmp_path / "report.json").write_text(json.dumps({"checks": checks}))
    rows = report_rows(read_report(tmp_path))
    assert [(r["check"], r["result"]) for r in rows] == [
        ("sufficiency", "PASS"),
        ("necessity", "FAIL"),
    ]


def test_layer_figure(viz_circuit_dir):
    doc = load_circuit(viz_circuit_dir)
    placed, heads = layer_layout(doc, 0)
    assert {p.rec.id for p in placed} == {n.id for n in doc.nodes if n.layer == 0}
    assert all(0 < p.x < 1 for p in placed) and heads
    qkv = [p for p in placed if p.rec.loc in QKV]
    assert [p.rec.head for p in sorted(qkv, key=lambda p: p.x)] == sorted(p.rec.head for p in qkv)
    fig = layer_figure(doc, 0, selected=placed[0].rec.id)
    nodes = next(t for t in fig.data if t.name == "nodes")
    assert set(nodes.customdata) == {p.rec.id for p in placed}
    assert max(nodes.marker.size) > min(nodes.marker.size)  # the selected node is larger

    def n_lines(f):
        return sum(len(t.x) for t in f.data if t.mode == "lines" and t.x and t.x[0] is not None)

    top = max(abs(e.weight) for e in doc.edges if e.kind != "residual")
    assert n_lines(layer_figure(doc, 0, edge_threshold=top / 2)) < n_lines(fig)


def test_token_html_escapes_and_colours():
    spans = tk.token_spans(["<b>", "\n", " x"], [1.0, -0.5, 0.0], scale=1.0, focus=0)
    assert "<b>" not in spans.replace("<span", "").split(">", 1)[0] and "&lt;b&gt;" in spans
    assert "↵" in spans and "outline" in spans
    assert tk.color(1.0, scale=1.0).startswith("rgba(33,102,172")
    assert tk.color(-1.0, scale=1.0).startswith("rgba(178,24,43")
    assert tk.color(0.5, scale=1.0, zero_centered=False, low=0.0).endswith("0.425)")
    tokens, diff = tk.difference(["a", "x", "b"], [1.0, 2.0, 3.0], ["y", "b"], [0.0, 5.0])
    assert tokens == ["x|y", "b"] and diff == [-2.0, 2.0]
    assert "0" in tk.legend_html(scale=2.0) and "&lt;" in tk.legend_row([("line", "#000", "<")])


def test_streamlit_command(tmp_path):
    cmd = streamlit_command(port=8600, target="x", runs_dir=tmp_path, model="m")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("viz/app.py")
    joined = " ".join(cmd)
    for flag in (
        "--server.port 8600",
        "--server.headless true",
        "--server.address 127.0.0.1",
        "--browser.gatherUsageStats false",
    ):
        assert flag in joined
    assert cmd[cmd.index("--") + 1 :] == ["x", "--runs-dir", str(tmp_path), "--model", "m"]


def test_viz_without_circuits_is_a_one_line_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "sparsecircuits.cli", "viz", "--runs-dir", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: no circuits found for 'stdlib-sparse'")
    assert len(res.stderr.strip().splitlines()) == 1 and "sparsecircuits prune" in res.stderr


def test_report_html_and_figures(viz_circuit_dir):
    rows = [{"check": "a<b", "result": "PASS", "criterion": "c", "summary": "s"}]
    out = tk.report_html([*rows, {**rows[0], "result": "FAIL"}])
    assert "a&lt;b" in out and "#1a7f37" in out and "#cf222e" in out
    doc = load_circuit(viz_circuit_dir)
    analysis = load_analysis(viz_circuit_dir)
    head, att = next(iter(analysis.attention.items()))
    channel = next(iter(att.channels.values()), None)
    metrics = [MetricRow(step=s, train_loss=3.0 - s / 100, l0_frac=0.5) for s in range(0, 50, 10)]
    metrics.append(MetricRow(step=50, val_loss=2.4))
    emb = next(iter(analysis.embeddings.channels.items()))
    figs = [
        f.pruning_curve_figure(doc.pruning_curve),
        f.k_curve_figure(doc.k_curve, target=doc.target_loss, k=doc.n_nodes),
        f.metrics_figure(metrics),
        f.attention_figure(att, head=head),
        f.embed_bars_figure(emb[1], channel=emb[0]),
        f.embed_hist_figure(emb[1], channel=emb[0]),
        f.node_token_figure([[1.0, -2.0], [0.0, 0.5]], ["n1", "n2"], ["a", "b"], title="t",
                            per_node=True),
    ]  # fmt: skip
    if channel is not None:
        figs.append(f.qk_figure(channel, att.prompt, title="qk"))
    if analysis.embeddings.wpe:
        figs.append(f.wpe_figure(analysis.embeddings.wpe, [0, 3]))
    for fig in figs:
        assert fig.data and fig.layout.height >= 300
    z = figs[6].data[0].z
    assert max(abs(v) for row in z for v in row) == 1.0  # per-node scaling
