"""``export-html`` and the shared graph figure: an offline page holding the circuit and its
analysis; columns in forward order with every node clickable."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from sparsecircuits import cli
from sparsecircuits.circuits.schema import load_circuit
from sparsecircuits.viz.analysis_schema import ANALYSIS_FILE, load_analysis
from sparsecircuits.viz.export_html import _json_for_script, export_html
from sparsecircuits.viz.graph import circuit_figure, layout

REMOTE = re.compile(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", re.I)


def _embedded(page: str, element_id: str) -> dict:
    m = re.search(rf"<script type='application/json' id='{element_id}'>(.*?)</script>", page, re.S)
    assert m, element_id
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def page(viz_circuit_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("html") / "page.html"
    assert export_html(viz_circuit_dir, out=out) == out
    return out.read_text()


def test_page_is_self_contained(page):
    assert not REMOTE.search(page)
    assert "<script src" not in page and "cdn." not in page.split("<script>")[0]
    assert "Plotly.newPlot" in page and "plotly.js" in page.lower()


def test_page_embeds_circuit_analysis_and_figure(page, viz_circuit_dir):
    data = _embedded(page, "circuit-data")
    on_disk = json.loads((viz_circuit_dir / "circuit.json").read_text())
    assert data["circuit"] == on_disk
    assert data["analysis"] == json.loads((viz_circuit_dir / ANALYSIS_FILE).read_text())
    fig = _embedded(page, "figure-data")
    nodes = fig["data"][-1]
    assert nodes["name"] == "nodes"
    assert set(nodes["customdata"]) == {n["id"] for n in on_disk["nodes"]} | {"logit.0", "logit.1"}
    doc = load_circuit(viz_circuit_dir)
    assert f"{doc.n_nodes} nodes" in page and "per-prompt mean, nats" in page


def test_export_computes_a_missing_analysis(copy_circuit, circuit_model_dir):
    d = copy_circuit(with_analysis=False)
    res = CliRunner().invoke(cli.app, ["export-html", str(d), "--model", str(circuit_model_dir)])
    assert res.exit_code == 0, res.output
    assert (d / "circuit.html").stat().st_size > 1e6  # plotly.js is inlined
    assert load_analysis(d).n_windows == 64


def test_figure_columns_and_edges(viz_circuit_dir):
    doc, an = load_circuit(viz_circuit_dir), load_analysis(viz_circuit_dir)
    cols, placed = layout(doc, an)
    assert cols[-1].key == "logits" and [c.layer for c in cols] == sorted(c.layer for c in cols)
    assert len(placed) == doc.n_nodes + 2
    fig = circuit_figure(doc, an)
    assert list(fig.layout.xaxis.ticktext) == [c.label for c in cols]
    assert len(fig.data[-1].x) == doc.n_nodes + 2

    def n_lines(f) -> int:
        return sum(sum(v is None for v in t.x) for t in f.data[:-1])

    drawn = n_lines(fig)
    assert drawn == doc.n_edges + 2 * len(an.targets.direct)
    top = max(abs(e.weight) for e in doc.edges if e.kind != "residual")
    assert n_lines(circuit_figure(doc, an, edge_threshold=top / 2)) < drawn
    bare = circuit_figure(doc)  # no analysis: no logits column
    assert len(bare.data[-1].x) == doc.n_nodes


def test_script_json_cannot_close_the_element():
    text = _json_for_script({"t": "</script><!-- x"})
    assert "</" not in text and "<!--" not in text
    assert json.loads(text) == {"t": "</script><!-- x"}
