"""One layer of a circuit as a Plotly figure (the dashboard's layer view).

Rows top to bottom: attention's read (``act_in``), its q/k/v channels grouped by head, its write
(``resid_delta``); then the MLP's read (``act_in``), neurons (``post_act``) and write
(``resid_delta``). Nodes are coloured by their ablation delta (same scale in every layer), edges
by weight sign with width and opacity growing with |weight| (relative to the largest weight of
the whole circuit). The node trace is named "nodes" and carries node ids as ``customdata``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import plotly.graph_objects as go

from sparsecircuits.circuits.nodes import QKV, Location
from sparsecircuits.circuits.schema import CircuitDoc, NodeRec
from sparsecircuits.viz.graph import DELTA_SCALE, N_BINS, NEG_COLOR, POS_COLOR, RESID_COLOR

# (location or "qkv", row label, y); attention on top, the MLP below with a gap between.
ROWS: tuple[tuple[str, str, float], ...] = (
    ("attn_in", "attn read<br>act_in", 6.0),
    ("qkv", "q / k / v<br>by head", 5.0),
    ("attn_out", "attn write<br>resid_delta", 4.0),
    ("mlp_in", "MLP read<br>act_in", 2.6),
    ("mlp_neuron", "neurons<br>post_act", 1.6),
    ("mlp_out", "MLP write<br>resid_delta", 0.6),
)
SYMBOLS = {"attn_q": "circle", "attn_k": "square", "attn_v": "diamond"}
QKV_ORDER = {"attn_q": 0, "attn_k": 1, "attn_v": 2}


@dataclass(frozen=True)
class LayerNode:
    rec: NodeRec
    x: float
    y: float


def _row_of(n: NodeRec) -> str:
    return "qkv" if n.loc in QKV else n.loc.value


def layer_layout(doc: CircuitDoc, layer: int) -> tuple[list[LayerNode], list[tuple[str, float]]]:
    """Positions of the layer's nodes (x in [0, 1], y per row) and the head labels (text, x)."""
    rows: dict[str, list[NodeRec]] = defaultdict(list)
    for n in doc.nodes:
        if n.layer == layer and n.loc is not Location.EMBED:
            rows[_row_of(n)].append(n)
    placed: list[LayerNode] = []
    heads: list[tuple[str, float]] = []
    for key, _, y in ROWS:
        nodes = rows.get(key, [])
        if key == "qkv":
            by_head: dict[int, list[NodeRec]] = defaultdict(list)
            for n in nodes:
                by_head[n.head if n.head is not None else -1].append(n)
            total = len(nodes) + max(len(by_head) - 1, 0)  # one empty slot between heads
            slot = 0
            for head in sorted(by_head):
                group = sorted(
                    by_head[head], key=lambda n: (QKV_ORDER[n.loc.value], n.channel or 0, n.index)
                )
                xs = [(slot + i + 0.5) / total for i in range(len(group))]
                placed += [LayerNode(n, x, y) for n, x in zip(group, xs, strict=True)]
                heads.append((f"h{head}", sum(xs) / len(xs)))
                slot += len(group) + 1
        else:
            nodes = sorted(nodes, key=lambda n: n.index)
            placed += [LayerNode(n, (i + 0.5) / len(nodes), y) for i, n in enumerate(nodes)]
    return placed, heads


def layer_edges(doc: CircuitDoc, layer: int) -> list[tuple[str, str, str, float]]:
    """Edges with both ends in ``layer``: (src, dst, kind, weight)."""
    ids = {n.id for n in doc.nodes if n.layer == layer}
    return [(e.src, e.dst, e.kind, e.weight) for e in doc.edges if e.src in ids and e.dst in ids]


def max_weight(doc: CircuitDoc) -> float:
    """Largest |weight| of the circuit's weight edges (residual links excluded)."""
    return max((abs(e.weight) for e in doc.edges if e.kind != "residual"), default=0.0)


def delta_span(doc: CircuitDoc) -> float:
    """Half-range of the symmetric delta colour scale, shared by every layer."""
    return max([abs(n.delta) for n in doc.nodes if n.delta is not None] + [1e-9])


def _hover(n: NodeRec, degree: Counter) -> str:
    parts = [f"<b>{n.id}</b>"]
    if n.head is not None:
        parts.append(f"head {n.head}, channel {n.channel}")
    parts.append("Δ loss " + ("n/a" if n.delta is None else f"{n.delta:+.4f} nats"))
    parts.append(f"tau {n.tau:.3g}; edges in {degree[('in', n.id)]}, out {degree[('out', n.id)]}")
    return "<br>".join(parts)


def layer_figure(
    doc: CircuitDoc, layer: int, *, edge_threshold: float = 0.0, selected: str | None = None
) -> go.Figure:
    """The layer view of ``layer`` (see the module docstring); weight edges with |weight| below
    ``edge_threshold`` are hidden (residual links always shown); ``selected`` is ringed."""
    placed, heads = layer_layout(doc, layer)
    pos = {p.rec.id: (p.x, p.y) for p in placed}
    degree: Counter = Counter()
    for e in doc.edges:
        degree[("out", e.src)] += 1
        degree[("in", e.dst)] += 1
    edges = [
        e for e in layer_edges(doc, layer) if e[2] == "residual" or abs(e[3]) >= edge_threshold
    ]
    fig = go.Figure(_edge_traces(edges, pos, top=max_weight(doc)))
    for name, symbol in SYMBOLS.items():  # legend entries for the q/k/v marker shapes
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=name.removeprefix("attn_"),
                marker=dict(symbol=symbol, color="#888", size=9),
                legendgroup=name,
            )
        )
    span = delta_span(doc)
    fig.add_trace(
        go.Scatter(
            x=[p.x for p in placed],
            y=[p.y for p in placed],
            mode="markers",
            name="nodes",
            showlegend=False,
            customdata=[p.rec.id for p in placed],
            hovertext=[_hover(p.rec, degree) for p in placed],
            hoverinfo="text",
            marker=dict(
                symbol=[SYMBOLS.get(p.rec.loc.value, "circle") for p in placed],
                size=[17 if p.rec.id == selected else 12 for p in placed],
                color=[0.0 if p.rec.delta is None else p.rec.delta for p in placed],
                colorscale=DELTA_SCALE,
                cmin=-span,
                cmax=span,
                line=dict(
                    color=["black" if p.rec.id == selected else "#555" for p in placed],
                    width=[3 if p.rec.id == selected else 0.6 for p in placed],
                ),
                colorbar=dict(
                    title=dict(text="Δ loss when<br>ablated (nats)"), thickness=12, len=0.8
                ),
            ),
        )
    )
    fig.add_hrect(y0=3.5, y1=6.5, fillcolor="#eef3f8", line_width=0, layer="below")
    fig.add_hrect(y0=0.1, y1=3.1, fillcolor="#f6f1ea", line_width=0, layer="below")
    for text, x in heads:
        fig.add_annotation(
            x=x,
            y=5.4,
            text=text,
            showarrow=False,
            font=dict(size=11),
            bgcolor="rgba(255,255,255,0.9)",
            borderpad=1,
        )
    counts = Counter(_row_of(p.rec) for p in placed)
    for key, _, y in ROWS:
        if not counts.get(key):
            fig.add_annotation(
                x=0.5, y=y, text="no nodes", showarrow=False, font=dict(size=11, color="#999")
            )
    fig.update_layout(
        height=560,
        margin=dict(l=100, r=10, t=40, b=10),
        plot_bgcolor="white",
        hovermode="closest",
        clickmode="event+select",
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0),
        xaxis=dict(visible=False, range=[-0.02, 1.02]),
        yaxis=dict(
            tickmode="array",
            tickvals=[y for *_, y in ROWS],
            ticktext=[r[1] for r in ROWS],
            range=[0.05, 6.55],
            automargin=True,
            showgrid=False,
            zeroline=False,
            fixedrange=True,
        ),
    )
    return fig


def _edge_traces(
    edges: list[tuple[str, str, str, float]], pos: dict[str, tuple[float, float]], *, top: float
) -> list[go.Scatter]:
    traces: list[go.Scatter] = []
    resid = [(s, d) for s, d, k, _ in edges if k == "residual"]
    if resid:
        traces.append(
            _lines(
                resid,
                pos,
                name="residual link",
                color=RESID_COLOR,
                width=1.2,
                opacity=0.7,
                dash="dot",
                legend=True,
            )
        )
    bins: dict[tuple[bool, int], list[tuple[str, str]]] = defaultdict(list)
    for s, d, k, w in edges:
        if k != "residual" and top > 0:
            bins[(w >= 0, min(int(abs(w) / top * N_BINS), N_BINS - 1))].append((s, d))
    for (positive, level), pairs in sorted(bins.items()):
        frac = (level + 1) / N_BINS
        traces.append(
            _lines(
                pairs,
                pos,
                name="weight > 0" if positive else "weight < 0",
                color=POS_COLOR if positive else NEG_COLOR,
                width=0.5 + 3.5 * frac,
                opacity=0.15 + 0.7 * frac,
                legend=False,
            )
        )
    for positive in sorted({p for p, _ in bins}, reverse=True):  # full-strength legend marks
        name = "weight > 0" if positive else "weight < 0"
        color = POS_COLOR if positive else NEG_COLOR
        traces.append(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                name=name,
                legendgroup=name,
                line=dict(color=color, width=3),
            )
        )
    return traces


def _lines(
    pairs: list[tuple[str, str]],
    pos: dict[str, tuple[float, float]],
    *,
    name: str,
    color: str,
    width: float,
    opacity: float,
    legend: bool,
    dash: str = "solid",
) -> go.Scatter:
    xs: list[float | None] = []
    ys: list[float | None] = []
    for s, d in pairs:
        if s in pos and d in pos:
            xs += [pos[s][0], pos[d][0], None]
            ys += [pos[s][1], pos[d][1], None]
    return go.Scatter(
        x=xs,
        y=ys,
        mode="lines",
        name=name,
        legendgroup=name,
        showlegend=legend,
        line=dict(color=color, width=width, dash=dash),
        opacity=opacity,
        hoverinfo="skip",
    )
