"""``sparsecircuits export-html``: one self-contained HTML page for a circuit.

The page works offline: Plotly's JavaScript is inlined (no CDN), the circuit and its analysis
are embedded as JSON (``<script type="application/json" id="circuit-data">``), and a small
vanilla-JS inspector (``export_assets.py``) shows a clicked node's edges and snippets.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import torch

from sparsecircuits.circuits.schema import CircuitDoc, circuit_dict, load_circuit
from sparsecircuits.errors import CheckpointError
from sparsecircuits.fileio import atomic_write_bytes
from sparsecircuits.viz.analysis import analyze
from sparsecircuits.viz.analysis_schema import AnalysisDoc, dump_analysis, load_analysis
from sparsecircuits.viz.export_assets import CSS, JS
from sparsecircuits.viz.graph import circuit_figure

log = logging.getLogger(__name__)

HTML_FILE = "circuit.html"


def export_html(
    circuit_dir: str | Path,
    *,
    out: str | Path | None = None,
    model: str | None = None,
    n_windows: int = 64,
    device: str | torch.device = "cpu",
) -> Path:
    """Write the page (default ``circuit_dir/circuit.html``); returns its path.

    Uses ``analysis.json`` if it is valid for the circuit's weights, else computes it first
    (``model``: the model directory, default the one named in circuit.json)."""
    circuit_dir = Path(circuit_dir)
    if circuit_dir.is_file():
        circuit_dir = circuit_dir.parent
    doc = load_circuit(circuit_dir)
    try:
        analysis = load_analysis(circuit_dir, weights_hash=doc.model.weights_hash)
    except CheckpointError as err:
        log.info("computing the analysis first (%s)", err)
        analysis, _, _ = analyze(
            circuit_dir, model=model, n_windows=n_windows, force=True, device=device
        )
    dest = Path(out) if out is not None else circuit_dir / HTML_FILE
    page = render_html(doc, analysis)
    atomic_write_bytes(dest, page.encode())
    log.info("wrote %s (%.1f MB)", dest, dest.stat().st_size / 1e6)
    return dest


def _json_for_script(obj: Any) -> str:
    """JSON safe inside a <script> element (no ``</`` or ``<!--`` sequences)."""
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def circuit_json(doc: CircuitDoc) -> dict[str, Any]:
    """circuit.json's object, as written by ``save_circuit``."""
    return circuit_dict(doc)


def header_html(doc: CircuitDoc) -> str:
    """The page header: model, task, sizes and losses."""
    loss = doc.loss
    verdict = "reached" if doc.reached else "not reached"
    facts = [
        f"model <b>{html.escape(doc.model.id)}</b> (weights {doc.model.weights_hash[:12]}, "
        f"{doc.model.n_layer} layers, d_model {doc.model.d_model})",
        f"{doc.n_nodes} nodes of {doc.total_nodes}, {doc.n_edges} edges "
        f"({doc.n_weight_edges} weights)",
        f"loss full {loss.full:.4f} vs circuit {loss.circuit:.4f} (test: full "
        f"{loss.full_test:.4f}, circuit {loss.circuit_test:.4f}; per-prompt mean, nats)",
        f"target {doc.target_loss} {verdict}; {doc.ablation} ablation",
    ]
    title = f"Circuit for task <b>{html.escape(doc.task)}</b>"
    return f"<h1>{title}</h1><div class='facts'>{' &middot; '.join(facts)}</div>"


def render_html(doc: CircuitDoc, analysis: AnalysisDoc | None) -> str:
    """The complete page as a string."""
    import plotly.offline

    fig = circuit_figure(doc, analysis)
    data = {"circuit": circuit_json(doc), "analysis": dump_analysis(analysis) if analysis else None}
    fig_json = fig.to_json().replace("</", "<\\/")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            "<html lang='en'><head><meta charset='utf-8'>",
            f"<title>circuit: {html.escape(doc.task)}</title>",
            f"<style>{CSS}</style>",
            f"<script>{plotly.offline.get_plotlyjs()}</script>",
            "</head><body>",
            f"<header>{header_html(doc)}</header>",
            "<main><div id='graph'></div>",
            "<div id='inspector'><p class='muted'>Click a node to inspect it: its edges, and "
            "pretraining snippets as token heatmaps (blue positive, red negative).</p></div>"
            "</main>",
            f"<script type='application/json' id='circuit-data'>{_json_for_script(data)}</script>",
            f"<script type='application/json' id='figure-data'>{fig_json}</script>",
            f"<script>{JS}</script>",
            "</body></html>",
        ]
    )
