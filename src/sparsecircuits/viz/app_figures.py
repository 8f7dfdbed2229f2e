"""Plotly figures of the dashboard other than the graphs: attention patterns, curves, embedding
columns and the playground's node-by-token heatmap. Every figure titles its axes and colour
scale, so the colours are explained where they are shown."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sparsecircuits.viz.analysis_schema import EmbedChannel, HeadAttention, MetricRow

ACT_SCALE = "RdBu"  # activations: blue > 0, red < 0 (as the token heatmaps)
ATTN_SCALE = "Blues"
LOGIT_SCALE = "RdBu"  # signed values: blue > 0, red < 0
BLUE, RED, ORANGE, GREY = "#1f77b4", "#d62728", "#ff7f0e", "#777777"  # named in the captions


def _ticks(tokens: Sequence[str]) -> list[str]:
    return [f"{t!r}"[1:-1] or "·" for t in tokens]


def _base(fig: go.Figure, *, height: int, title: str | None = None) -> go.Figure:
    """Shared layout: title top left, legend top right, margins that fit the axis titles."""
    fig.update_layout(
        height=height,
        margin=dict(l=20, r=20, t=70 if title else 30, b=20),
        title=dict(text=title, font=dict(size=14), x=0, xanchor="left", y=0.98, yanchor="top")
        if title
        else None,
        plot_bgcolor="white",
        legend=dict(orientation="h", x=1, xanchor="right", y=1.02, yanchor="bottom"),
    )
    fig.update_xaxes(automargin=True, gridcolor="#eee", zeroline=False)
    fig.update_yaxes(automargin=True, gridcolor="#eee", zeroline=False)
    return fig


def attention_figure(att: HeadAttention, *, head: str) -> go.Figure:
    """The head's softmax attention on the prompt (queries down, keys across, sink first)."""
    keys = ["<sink>", *_ticks(att.prompt)]
    queries = _ticks(att.prompt)
    n = len(queries)
    fig = go.Figure(
        go.Heatmap(
            z=att.pattern,
            x=list(range(n + 1)),
            y=list(range(n)),
            colorscale=ATTN_SCALE,
            zmin=0,
            zmax=1,
            colorbar=dict(title=dict(text="attention<br>weight"), thickness=12),
            customdata=[[[queries[i], keys[j]] for j in range(n + 1)] for i in range(n)],
            hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>%{z:.3f}"
            "<extra></extra>",
        )
    )
    _token_axes(fig, keys, queries)
    return _base(fig, height=max(320, 16 * n + 120), title=f"head {head}: attention pattern")


def qk_figure(values: list[list[float | None]], tokens: Sequence[str], *, title: str) -> go.Figure:
    """One channel's share of the attention logit, q_c·k_c/√d_head (zero-centred)."""
    span = max([abs(v) for row in values for v in row if v is not None] + [1e-9])
    ticks = _ticks(tokens)
    n = len(ticks)
    fig = go.Figure(
        go.Heatmap(
            z=values,
            x=list(range(n)),
            y=list(range(n)),
            colorscale=LOGIT_SCALE,
            zmid=0,
            zmin=-span,
            zmax=span,
            colorbar=dict(title=dict(text="q·k / √d (logit<br>share, blue > 0)"), thickness=12),
            customdata=[[[ticks[i], ticks[j]] for j in range(n)] for i in range(n)],
            hovertemplate="query %{customdata[0]}<br>key %{customdata[1]}<br>%{z:.3f}"
            "<extra></extra>",
        )
    )
    _token_axes(fig, ticks, ticks)
    return _base(fig, height=max(320, 16 * n + 120), title=title)


def _token_axes(fig: go.Figure, xs: Sequence[str], ys: Sequence[str]) -> None:
    fig.update_xaxes(
        title="key token",
        tickmode="array",
        tickvals=list(range(len(xs))),
        ticktext=list(xs),
        tickangle=-60,
        tickfont=dict(size=10),
    )
    fig.update_yaxes(
        title="query token",
        tickmode="array",
        tickvals=list(range(len(ys))),
        ticktext=list(ys),
        autorange="reversed",
        tickfont=dict(size=10),
    )


def pruning_curve_figure(curve: list[dict[str, float]]) -> go.Figure:
    """Mask training: minibatch task loss and active nodes per step."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    steps = [r.get("step") for r in curve]
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=[r.get("task_loss") for r in curve],
            name="task loss",
            line=dict(color=BLUE),
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=[r.get("n_active") for r in curve],
            name="active nodes",
            line=dict(color=ORANGE, dash="dash"),
        ),
        secondary_y=True,
    )
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="task loss (nats, per-prompt mean)", secondary_y=False)
    fig.update_yaxes(
        title="active nodes (τ ≥ 0)",
        tickformat=",d",
        tickmode="auto",
        nticks=6,
        showgrid=False,
        rangemode="tozero",
        secondary_y=True,
    )
    return _base(fig, height=360, title="pruning: mask training")


def k_curve_figure(curve: list[dict[str, float]], *, target: float, k: int) -> go.Figure:
    """Loss of the top-k circuit against k, the target and the chosen k."""
    fig = go.Figure(
        go.Scatter(
            x=[r["k"] for r in curve],
            y=[r["loss"] for r in curve],
            mode="lines+markers",
            name="circuit loss",
            line=dict(color=BLUE),
        )
    )
    fig.add_hline(y=target, line=dict(color=RED, dash="dash"))
    fig.add_trace(  # a legend entry for the target line
        go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            name=f"target {target:g}",
            line=dict(color=RED, dash="dash"),
        )
    )
    losses = [r["loss"] for r in curve] + [target]
    fig.add_trace(
        go.Scatter(
            x=[k, k],
            y=[min(losses), max(losses)],
            mode="lines",
            name=f"circuit: k = {k}",
            line=dict(color="#444", dash="dot"),
        )
    )
    fig.update_xaxes(title="k (nodes kept)", type="log")
    fig.update_yaxes(title="task loss (nats, per-prompt mean)")
    return _base(fig, height=360, title="loss vs k (top-k nodes by τ)")


def metrics_figure(rows: list[MetricRow]) -> go.Figure:
    """The model's training log: train and validation loss, and the kept weight fraction."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    tr = [r for r in rows if r.train_loss is not None]
    va = [r for r in rows if r.val_loss is not None]
    l0 = [r for r in rows if r.l0_frac is not None]
    fig.add_trace(
        go.Scatter(
            x=[r.step for r in tr],
            y=[r.train_loss for r in tr],
            name="train loss",
            line=dict(color=BLUE),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[r.step for r in va],
            y=[r.val_loss for r in va],
            mode="lines+markers",
            name="val loss",
            line=dict(color=RED),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[r.step for r in l0],
            y=[r.l0_frac for r in l0],
            name="L0 fraction",
            line=dict(color=GREY, dash="dot"),
        ),
        secondary_y=True,
    )
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss (nats/token)", secondary_y=False)
    fig.update_yaxes(
        title="fraction of weights kept", tickmode="auto", showgrid=False, secondary_y=True
    )
    return _base(fig, height=360, title="training")


def embed_bars_figure(ch: EmbedChannel, *, channel: str) -> go.Figure:
    """Top and bottom tokens of a residual channel's embedding column."""
    rows = sorted([*ch.top, *ch.bottom], key=lambda r: r[1])
    fig = go.Figure(
        go.Bar(
            x=[w for _, w in rows],
            y=[f"{t!r}" for t, _ in rows],
            orientation="h",
            marker_color=[BLUE if w >= 0 else RED for _, w in rows],
            hovertemplate="%{y}: %{x:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="wte[token, channel] (blue > 0, red < 0)")
    fig.update_yaxes(type="category", tickfont=dict(size=11))
    return _base(fig, height=max(300, 18 * len(rows) + 100), title=f"channel {channel}: tokens")


def embed_hist_figure(ch: EmbedChannel, *, channel: str) -> go.Figure:
    """Histogram of a channel's embedding column over the vocabulary."""
    e = ch.hist.edges
    mids = [(a + b) / 2 for a, b in itertools.pairwise(e)]
    fig = go.Figure(
        go.Bar(
            x=mids,
            y=ch.hist.counts,
            width=[b - a for a, b in itertools.pairwise(e)],
            marker_color="#888",
            hovertemplate="%{x:.3f}: %{y}<extra></extra>",
        )
    )
    fig.update_xaxes(title="weight")
    fig.update_yaxes(title="tokens", type="log")
    return _base(fig, height=300, title=f"channel {channel}: all tokens")


def wpe_figure(wpe: list[list[float]], channels: Sequence[int] | None = None) -> go.Figure:
    """Positional embedding (positions down, channels across), zero-centred."""
    cols = list(channels) if channels else list(range(len(wpe[0]) if wpe else 0))
    z = [[row[c] for c in cols] for row in wpe]
    span = max([abs(v) for row in z for v in row] + [1e-9])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(c) for c in cols],
            colorscale=LOGIT_SCALE,
            zmid=0,
            zmin=-span,
            zmax=span,
            colorbar=dict(title=dict(text="wpe<br>(blue > 0)"), thickness=12),
            hovertemplate="position %{y}, channel %{x}: %{z:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="residual channel", type="category")
    fig.update_yaxes(title="position", autorange="reversed")
    return _base(fig, height=460, title="positional embedding")


def node_token_figure(
    acts: Any,
    node_ids: Sequence[str],
    tokens: Sequence[str],
    *,
    title: str,
    per_node: bool = False,
) -> go.Figure:
    """Each node's activation (rows) per prompt token (columns), zero-centred; ``per_node``
    divides each row by its own largest |activation| (hover shows the raw value)."""
    raw = [[float(v) for v in row] for row in acts]
    z = raw
    if per_node:
        z = [[v / max([abs(x) for x in row] + [1e-9]) for v in row] for row in raw]
    span = max([abs(v) for row in z for v in row] + [1e-9])
    ticks = _ticks(tokens)
    label = "activation /<br>node's max |act|" if per_node else "activation"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(ticks))),
            y=list(range(len(node_ids))),
            colorscale=ACT_SCALE,
            zmid=0,
            zmin=-span,
            zmax=span,
            colorbar=dict(title=dict(text=f"{label}<br>(blue > 0)"), thickness=12),
            customdata=[
                [[nid, t, f"{v:.4g}"] for t, v in zip(ticks, row, strict=True)]
                for nid, row in zip(node_ids, raw, strict=True)
            ],
            hovertemplate="%{customdata[0]} at %{customdata[1]}: %{customdata[2]}<extra></extra>",
        )
    )
    fig.update_xaxes(
        tickmode="array",
        tickvals=list(range(len(ticks))),
        ticktext=ticks,
        tickangle=-60,
        tickfont=dict(size=10),
        title="token",
    )
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(len(node_ids))),
        ticktext=list(node_ids),
        autorange="reversed",
        tickfont=dict(size=10),
    )
    return _base(fig, height=min(2400, max(300, 15 * len(node_ids) + 140)), title=title)
