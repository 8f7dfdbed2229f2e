"""The whole-circuit graph as a Plotly figure, shared by ``export-html`` and the Streamlit app.

Columns run in forward order: the token embedding (only when the circuit masks tokens), then for
every layer its non-empty node locations (``attn_in``, q, k, v, ``attn_out``, ``mlp_in``,
neurons, ``mlp_out``; a layer without nodes keeps one empty labelled column), then the two
target logits (when an analysis with ``targets`` is given). Nodes are coloured by their ablation
delta (diverging scale centred on 0, with a colourbar); edges are lines coloured by weight sign
whose width and opacity grow with |weight|. Only columns are labelled; node details are in the
hover text. Every node marker carries its circuit.json id as ``customdata`` (for click handlers).
"""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass

import plotly.graph_objects as go

from sparsecircuits.circuits.nodes import LAYER_LOCATIONS, QKV, Location
from sparsecircuits.circuits.schema import CircuitDoc, NodeRec
from sparsecircuits.viz.analysis_schema import AnalysisDoc

POS_COLOR = "#1b9e77"  # positive weight (teal; distinct from the nodes' red-blue delta scale)
NEG_COLOR = "#d95f02"  # negative weight (orange)
RESID_COLOR = "#999999"  # residual (identity) links
DELTA_SCALE = "RdBu_r"
N_BINS = 4  # edge strength levels (one trace per sign and level)
SHORT = {
    "attn_in": "attn in", "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_out": "attn out",
    "mlp_in": "mlp in", "mlp_neuron": "neurons", "mlp_out": "mlp out",
}  # fmt: skip


@dataclass(frozen=True)
class Column:
    """One column of the graph: ``key`` ("embed", "L.loc", "L" for an empty layer, "logits")."""

    key: str
    label: str  # tick text, e.g. "L1<br>q"
    layer: int  # -1 embedding, n_layer for the logits


@dataclass(frozen=True)
class Placed:
    """A drawn node: its id, column index ``x``, vertical position ``y`` and hover text."""

    id: str
    x: int
    y: float
    hover: str
    delta: float | None


def layout(
    doc: CircuitDoc, analysis: AnalysisDoc | None = None
) -> tuple[list[Column], list[Placed]]:
    """Columns in forward order and the position of every node (circuit nodes, then the target
    logits ``logit.0``/``logit.1`` when ``analysis.targets`` is set)."""
    by_col: dict[str, list[NodeRec]] = defaultdict(list)
    for n in doc.nodes:
        by_col["embed" if n.loc is Location.EMBED else f"{n.layer}.{n.loc.value}"].append(n)
    cols: list[Column] = []
    if by_col.get("embed"):
        cols.append(Column("embed", "tokens", -1))
    for layer in range(doc.model.n_layer):
        keys = [f"{layer}.{loc.value}" for loc in LAYER_LOCATIONS if by_col.get(f"{layer}.{loc}")]
        if not keys:
            cols.append(Column(str(layer), f"L{layer}<br>(none)", layer))
        for k in keys:
            cols.append(Column(k, f"L{layer}<br>{SHORT[k.split('.')[1]]}", layer))
    targets = analysis.targets if analysis is not None else None
    if targets is not None:
        cols.append(Column("logits", "logits", doc.model.n_layer))
    tallest = max([len(v) for v in by_col.values()] + [2])
    step = 1.0 / tallest
    placed: list[Placed] = []
    for x, col in enumerate(cols):
        nodes = sorted(by_col.get(col.key, []), key=_order)
        for i, n in enumerate(nodes):
            y = 0.5 + (i - (len(nodes) - 1) / 2) * step
            placed.append(Placed(n.id, x, y, _hover(n), n.delta))
    if targets is not None:
        for i, tok in enumerate(targets.tokens):
            y = 0.5 + (i - 0.5) * max(step, 0.2)
            side = "A" if i == 0 else "B"
            hover = f"logit.{i}<br>target of prompt {side}: {html.escape(repr(tok), quote=False)}"
            placed.append(Placed(f"logit.{i}", len(cols) - 1, y, hover, None))
    return cols, placed


def _order(n: NodeRec) -> tuple[int, int, int]:
    """Within a column: q/k/v nodes grouped by head, then by channel index."""
    return (n.head or 0, n.channel or 0, n.index)


def _hover(n: NodeRec) -> str:
    parts = [n.id]
    if n.loc in QKV and n.head is not None:
        parts.append(f"head.channel {n.head}.{n.channel}")
    parts.append("Δ loss " + ("n/a" if n.delta is None else f"{n.delta:+.4f} nats"))
    parts.append(f"tau {n.tau:.3g}")
    return "<br>".join(parts)


def graph_edges(
    doc: CircuitDoc, analysis: AnalysisDoc | None = None
) -> list[tuple[str, str, str, float]]:
    """Every drawn edge as (src id, dst id, kind, weight): the circuit's edges plus, with
    ``analysis.targets``, the direct links of residual writes to the two logits (kind "logit")."""
    out = [(e.src, e.dst, e.kind, e.weight) for e in doc.edges]
    targets = analysis.targets if analysis is not None else None
    if targets is not None:
        for src, ws in targets.direct.items():
            out += [(src, f"logit.{i}", "logit", w) for i, w in enumerate(ws)]
    return out


def _edge_traces(
    edges: list[tuple[str, str, str, float]], pos: dict[str, tuple[int, float]]
) -> list[go.Scatter]:
    """Lines grouped by (sign, |weight| level); weights are scaled per group of kinds (circuit
    weights, logit links) so each uses the full width range; residual links are grey dots."""
    traces: list[go.Scatter] = []
    resid = [(s, d) for s, d, k, _ in edges if k == "residual"]
    if resid:
        traces.append(_lines(resid, pos, name="residual link", color=RESID_COLOR, width=1,
                             opacity=0.5, dash="dot", group="residual", legend=True))  # fmt: skip
    shown: set[str] = set()
    for family in ("weights", "logit"):
        sel = [e for e in edges if e[2] != "residual" and (e[2] == "logit") == (family == "logit")]
        top = max((abs(w) for *_, w in sel), default=0.0)
        if top <= 0:
            continue
        bins: dict[tuple[bool, int], list[tuple[str, str]]] = defaultdict(list)
        for s, d, _, w in sel:
            level = min(int(abs(w) / top * N_BINS), N_BINS - 1)
            bins[(w >= 0, level)].append((s, d))
        for (positive, level), pairs in sorted(bins.items()):
            name = "weight > 0" if positive else "weight < 0"
            frac = (level + 1) / N_BINS
            traces.append(
                _lines(
                    pairs,
                    pos,
                    name=name,
                    color=POS_COLOR if positive else NEG_COLOR,
                    width=0.5 + 3.5 * frac,
                    opacity=0.15 + 0.7 * frac,
                    group=name,
                    legend=name not in shown,
                )
            )
            shown.add(name)
    return traces


def _lines(
    pairs: list[tuple[str, str]], pos: dict[str, tuple[int, float]], *, name: str, color: str,
    width: float, opacity: float, group: str, legend: bool, dash: str = "solid",
) -> go.Scatter:  # fmt: skip
    xs: list[float | None] = []
    ys: list[float | None] = []
    for s, d in pairs:
        if s in pos and d in pos:
            xs += [pos[s][0], pos[d][0], None]
            ys += [pos[s][1], pos[d][1], None]
    return go.Scatter(
        x=xs, y=ys, mode="lines", name=name, legendgroup=group, showlegend=legend,
        line=dict(color=color, width=width, dash=dash), opacity=opacity, hoverinfo="skip",
    )  # fmt: skip


def circuit_figure(
    doc: CircuitDoc,
    analysis: AnalysisDoc | None = None,
    *,
    edge_threshold: float = 0.0,
    height: int | None = None,
    selected: str | None = None,
) -> go.Figure:
    """The whole circuit as a figure (see the module docstring).

    ``edge_threshold``: hide weight edges with |weight| below it (residual links always shown).
    ``height`` in pixels (default: grows with the tallest column). ``selected``: a node id to
    ring. The node trace is the last trace, named "nodes", with ``customdata`` = node ids.
    Circuits whose edges live in ``edges.safetensors`` (``doc.edges_file``) are drawn without
    edges.
    """
    cols, placed = layout(doc, analysis)
    pos = {p.id: (p.x, p.y) for p in placed}
    edges = [
        e for e in graph_edges(doc, analysis) if e[2] == "residual" or abs(e[3]) >= edge_threshold
    ]
    fig = go.Figure(_edge_traces(edges, pos))
    deltas = [p.delta for p in placed if p.delta is not None]
    span = max([abs(d) for d in deltas] + [1e-9])
    fig.add_trace(
        go.Scatter(
            x=[p.x for p in placed],
            y=[p.y for p in placed],
            mode="markers",
            name="nodes",
            showlegend=False,
            customdata=[p.id for p in placed],
            hovertext=[p.hover for p in placed],
            hoverinfo="text",
            marker=dict(
                size=[14 if p.id == selected else 9 for p in placed],
                color=[0.0 if p.delta is None else p.delta for p in placed],
                colorscale=DELTA_SCALE,
                cmin=-span,
                cmax=span,
                line=dict(
                    color=["black" if p.id == selected else "#444" for p in placed],
                    width=[3 if p.id == selected else 0.5 for p in placed],
                ),
                colorbar=dict(title=dict(text="Δ loss when<br>ablated (nats)"), thickness=12),
            ),
        )
    )
    for i, col in enumerate(cols):  # shade alternate layers
        if col.layer % 2 == 0 and 0 <= col.layer < doc.model.n_layer:
            fig.add_vrect(x0=i - 0.5, x1=i + 0.5, fillcolor="#f2f2f2", line_width=0, layer="below")
    for p in placed:  # the only labelled nodes: the two target tokens
        if p.id.startswith("logit."):
            tok = analysis.targets.tokens[int(p.id.split(".")[1])] if analysis else ""
            label = html.escape(repr(tok), quote=False)
            fig.add_annotation(x=p.x, y=p.y, text=label, showarrow=False, xshift=8, xanchor="left")
    tallest = max([sum(1 for p in placed if p.x == i) for i in range(len(cols))] + [1])
    fig.update_layout(
        height=height or max(420, min(1400, 14 * tallest + 160)),
        margin=dict(l=20, r=20, t=40, b=60),
        plot_bgcolor="white",
        hovermode="closest",
        clickmode="event+select",
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0),
        xaxis=dict(
            tickmode="array",
            tickvals=list(range(len(cols))),
            ticktext=[c.label for c in cols],
            range=[-0.6, len(cols) + 0.3],
            showgrid=False,
            zeroline=False,
            fixedrange=False,
        ),
        yaxis=dict(visible=False, range=[-0.03, 1.03]),
    )
    return fig
