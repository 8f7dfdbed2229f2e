"""The dashboard's pages (Streamlit): the layer view, the whole-circuit graph, curves and the
verification report, and the embeddings. The playground is in ``app_play.py``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import streamlit as st

from sparsecircuits.circuits.schema import CircuitDoc
from sparsecircuits.viz import app_state as state
from sparsecircuits.viz import app_tokens as tk
from sparsecircuits.viz.analysis_schema import AnalysisDoc
from sparsecircuits.viz.app_data import report_rows
from sparsecircuits.viz.app_figures import (
    embed_bars_figure,
    embed_hist_figure,
    k_curve_figure,
    metrics_figure,
    pruning_curve_figure,
    wpe_figure,
)
from sparsecircuits.viz.app_inspector import PLOT_CONFIG, inspector
from sparsecircuits.viz.app_layer import layer_figure
from sparsecircuits.viz.graph import NEG_COLOR, POS_COLOR, RESID_COLOR, circuit_figure

MAX_EDGES = 400  # the edge threshold starts where at most this many weight edges show


def graph_legend(*, shapes: bool) -> str:
    """The colour key of the layer view and the whole-circuit graph."""
    rows = [
        [
            (
                "gradient",
                "#2166ac, #f7f7f7, #b2182b",
                "node fill: Δ task loss when the node alone"
                " is ablated (red: loss rises, the node matters; blue: it falls; nats, colour bar)",
            ),
        ],
        [
            ("line", POS_COLOR, "weight > 0"),
            ("line", NEG_COLOR, "weight < 0 (thicker, more opaque: larger |weight|)"),
            ("dotted", RESID_COLOR, "residual link (identity, not a weight)"),
            ("ring", "#000000", "inspected node"),
        ],
    ]
    if shapes:
        rows.append([("box", "#888888", "shapes in the q/k/v row: circle q, square k, diamond v")])
    return "".join(tk.legend_row(r) for r in rows)


@dataclass(frozen=True)
class Ctx:
    """What every page gets: the circuit, its directory, analysis and the app's arguments."""

    doc: CircuitDoc
    directory: Path
    analysis: AnalysisDoc | None
    missing: str | None  # why there is no analysis
    args: state.AppArgs

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.doc.nodes]


def _on_click(chart_key: str, ctx: Ctx) -> None:
    node = state.clicked_node(chart_key, set(ctx.node_ids))
    if node is not None:
        state.select_node(node, ctx.doc)


def _on_pick(ctx: Ctx) -> None:
    state.select_node(st.session_state.get(state.NODE_PICK), ctx.doc)


def _on_layer() -> None:
    st.session_state[state.LAYER] = st.session_state.get(state.LAYER_PICK)


def _threshold(ctx: Ctx, page: str) -> float:
    """The edge-threshold slider (per circuit); it starts where at most MAX_EDGES show."""
    if ctx.doc.edges_file:
        st.info(
            f"This circuit's {ctx.doc.n_edges:,} edges live in {ctx.doc.edges_file} (too many to "
            "draw); nodes are shown without edges."
        )
        return 0.0
    weights = sorted((abs(e.weight) for e in ctx.doc.edges if e.kind != "residual"), reverse=True)
    if not weights or weights[0] <= 0:
        return 0.0
    top = float(weights[0])
    start = float(weights[MAX_EDGES]) if len(weights) > MAX_EDGES else 0.0
    value = st.slider(
        "edge threshold: hide weights with |weight| below",
        min_value=0.0,
        max_value=top,
        value=start,
        step=top / 200,
        format="%.4f",
        key=f"threshold_{page}_{ctx.directory}",
    )
    shown = sum(w >= value for w in weights)
    st.caption(f"{shown:,} of {len(weights):,} weight edges of the circuit pass the threshold")
    return value


def node_picker_and_inspector(ctx: Ctx) -> None:
    """The fallback node select box and the inspector of the selected node."""
    selected = st.session_state.get(state.NODE)
    if selected not in ctx.node_ids:
        selected = None
    st.session_state[state.NODE_PICK] = selected
    deltas = {n.id: n.delta for n in ctx.doc.nodes}
    st.selectbox(
        "Inspect node (or click one in the figure)",
        [None, *ctx.node_ids],
        format_func=lambda n: "choose a node ..." if n is None else _node_label(n, deltas[n]),
        key=state.NODE_PICK,
        on_change=partial(_on_pick, ctx),
    )
    if selected is None:
        st.caption("Click a node in the figure above, or pick one here, to inspect it.")
        return
    rec = next(n for n in ctx.doc.nodes if n.id == selected)
    inspector(ctx.doc, rec, state.edges(ctx.directory), ctx.analysis, ctx.missing)


def _node_label(node_id: str, delta: float | None) -> str:
    return node_id if delta is None else f"{node_id}   (Δ {delta:+.3f})"


def layer_page(ctx: Ctx) -> None:
    _layer_view(ctx)


# Fragments: a click, the threshold slider or the node picker reruns only the view and its
# inspector, not the whole app (sidebar, read-out, circuit loading): clicks stay under 1 s.
@st.fragment
def _layer_view(ctx: Ctx) -> None:
    doc = ctx.doc
    counts = [sum(n.layer == layer for n in doc.nodes) for layer in range(doc.model.n_layer)]
    layer = st.session_state.get(state.LAYER)
    if layer not in range(doc.model.n_layer):
        layer = next((i for i, c in enumerate(counts) if c), 0)
    st.session_state[state.LAYER_PICK] = layer
    left, right = st.columns([1, 2])
    with left:
        layer = st.selectbox(
            "Layer",
            list(range(doc.model.n_layer)),
            format_func=lambda i: f"layer {i}  ({counts[i]} nodes)",
            key=state.LAYER_PICK,
            on_change=_on_layer,
        )
    with right:
        threshold = _threshold(ctx, "layer")
    fig = layer_figure(
        doc, layer, edge_threshold=threshold, selected=st.session_state.get(state.NODE)
    )
    st.plotly_chart(
        fig,
        key="layer_chart",
        on_select=partial(_on_click, "layer_chart", ctx),
        selection_mode="points",
        theme=None,
        config=PLOT_CONFIG,
    )
    st.html(graph_legend(shapes=True))
    node_picker_and_inspector(ctx)


def graph_page(ctx: Ctx) -> None:
    st.markdown(
        "All layers left to right (embeddings first when the circuit masks tokens, the two "
        "target logits last when analysis.json is present). Hover a node for its details, click "
        "it to inspect it."
    )
    _graph_view(ctx)


@st.fragment
def _graph_view(ctx: Ctx) -> None:
    threshold = _threshold(ctx, "graph")
    fig = circuit_figure(
        ctx.doc, ctx.analysis, edge_threshold=threshold, selected=st.session_state.get(state.NODE)
    )
    st.plotly_chart(
        fig,
        key="graph_chart",
        on_select=partial(_on_click, "graph_chart", ctx),
        selection_mode="points",
        theme=None,
        config=PLOT_CONFIG,
    )
    st.html(graph_legend(shapes=False))
    node_picker_and_inspector(ctx)


def curves_page(ctx: Ctx) -> None:
    doc = ctx.doc
    left, right = st.columns(2, gap="large")
    with left:
        if doc.pruning_curve:
            st.plotly_chart(pruning_curve_figure(doc.pruning_curve), theme=None, config=PLOT_CONFIG)
            st.caption("Blue: minibatch task loss; orange dashed: nodes with τ ≥ 0 (right axis).")
    with right:
        if doc.k_curve:
            fig = k_curve_figure(doc.k_curve, target=doc.target_loss, k=doc.n_nodes)
            st.plotly_chart(fig, theme=None, config=PLOT_CONFIG)
            st.caption(
                "Blue: loss of the top-k nodes; red dashed: the target; dotted: the circuit."
            )
    st.markdown("**Loss change when a whole block's circuit nodes are ablated** (nats)")
    st.dataframe(
        {
            "layer": [d.layer for d in doc.layer_deltas],
            "block": [d.block for d in doc.layer_deltas],
            "nodes": [d.n_nodes for d in doc.layer_deltas],
            "Δ loss": [round(d.delta, 4) for d in doc.layer_deltas],
        },
        hide_index=True,
    )
    _report(ctx)
    metrics = ctx.analysis.metrics if ctx.analysis is not None else None
    if metrics:
        st.plotly_chart(metrics_figure(metrics), theme=None, config=PLOT_CONFIG)
        st.caption("Blue: train loss; red: validation loss; grey dotted: fraction of weights kept.")
    else:
        st.caption("No training log (the model's run has no metrics.jsonl, or no analysis.json).")


def _report(ctx: Ctx) -> None:
    st.markdown("**Verification report** (`sparsecircuits validate`)")
    report = state.report(ctx.directory)
    if report is None:
        st.info(f"no report.json yet: run `sparsecircuits validate {ctx.directory}`")
        return
    st.markdown(f"{report.get('passed', 0)} passed, {report.get('failed', 0)} failed")
    st.html(tk.report_html(report_rows(report)))


def embeddings_page(ctx: Ctx) -> None:
    if ctx.analysis is None:
        st.info(ctx.missing)
        return
    emb = ctx.analysis.embeddings
    channels = sorted(emb.channels, key=int)
    if channels:
        users: dict[str, int] = {}
        for n in ctx.doc.nodes:
            if n.loc.value in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
                users[str(n.index)] = users.get(str(n.index), 0) + 1
        ch = st.selectbox(
            "Residual channel (read or written by the circuit)",
            channels,
            format_func=lambda c: f"channel {c}  ({users.get(c, 0)} circuit nodes)",
            key="embed_channel",
        )
        left, right = st.columns(2)
        with left:
            st.plotly_chart(
                embed_bars_figure(emb.channels[ch], channel=ch), theme=None, config=PLOT_CONFIG
            )
        with right:
            st.plotly_chart(
                embed_hist_figure(emb.channels[ch], channel=ch), theme=None, config=PLOT_CONFIG
            )
        st.caption(
            "Left: the 10 tokens with the largest and smallest token-embedding weight in this "
            "channel (blue > 0, red < 0). Right: the weight's distribution over the vocabulary "
            "(log count)."
        )
    else:
        st.caption("The circuit reads or writes no residual channel.")
    if emb.wpe:
        only = st.toggle(
            "only the circuit's residual channels", value=bool(channels), key="wpe_only"
        )
        cols = [int(c) for c in channels] if only and channels else None
        st.plotly_chart(wpe_figure(emb.wpe, cols), theme=None, config=PLOT_CONFIG)
        st.caption("Positional embedding: blue > 0, red < 0, white 0 (colour bar).")
    elif ctx.doc.model.d_pos_emb:
        d = ctx.doc.model.d_model
        st.caption(
            f"Positions are {ctx.doc.model.d_pos_emb} concatenated channels, not added to the "
            f"residual stream: position channel j is read node `attn_in`/`mlp_in` index {d} + j "
            "(see them in the layer view)."
        )
    else:
        st.caption("The model has no learned positional embedding.")
