"""The node inspector (Streamlit): a node's edges, its top and bottom activating snippets, its
activations on the task's two classes, and for q/k/v nodes its head's attention pattern."""

from __future__ import annotations

import html

import streamlit as st

from sparsecircuits.circuits.nodes import QKV, SITE
from sparsecircuits.circuits.schema import CircuitDoc, NodeRec
from sparsecircuits.viz import app_tokens as tk
from sparsecircuits.viz.analysis_schema import AnalysisDoc, NodeAnalysis, PromptActs
from sparsecircuits.viz.app_data import EdgeRow
from sparsecircuits.viz.app_figures import attention_figure, qk_figure

PLOT_CONFIG = {"displaylogo": False}


def inspector(
    doc: CircuitDoc,
    rec: NodeRec,
    edges: dict[str, list[EdgeRow]],
    analysis: AnalysisDoc | None,
    missing: str | None,
) -> None:
    """Everything known about node ``rec``."""
    with st.container(border=True, key="inspector"):
        st.subheader(f"Node {rec.id}")
        where = f"hook site `{_site(rec)}`, channel {rec.index}"
        if rec.head is not None:
            where += f" (head {rec.head}, channel {rec.channel} within the head)"
        delta = "n/a" if rec.delta is None else f"{rec.delta:+.4f} nats"
        st.markdown(f"{where} · Δ loss when ablated alone: **{delta}** · τ {rec.tau:.3g}")
        info = analysis.nodes.get(rec.id) if analysis is not None else None
        left, right = st.columns([3, 2])
        with left:
            _edge_table(edges.get(rec.id, []))
        with right:
            if info is not None:
                _stats(info)
        if info is None:
            st.info(missing or f"analysis.json has no entry for {rec.id}")
            return
        _snippets(info)
        _task(info)
        if rec.loc in QKV and analysis is not None:
            _attention(rec, analysis)


def _site(rec: NodeRec) -> str:
    return "embed" if rec.layer < 0 else f"{rec.layer}.{SITE[rec.loc]}"


def _edge_table(rows: list[EdgeRow]) -> None:
    n_in = sum(r.direction == "in" for r in rows)
    st.markdown(f"**Edges**: {n_in} in, {len(rows) - n_in} out (strongest first)")
    if not rows:
        st.caption("no edges to other circuit nodes")
        return
    cells = [
        [r.direction, html.escape(r.node), html.escape(r.kind), f"{r.weight:+.5f}"] for r in rows
    ]
    st.html(
        tk.table_html(["direction", "node", "kind", "weight"], cells, numeric=[3], max_height=300)
    )


def _stats(info: NodeAnalysis) -> None:
    s = info.stats
    st.markdown("**Activation over pretraining text**")
    st.markdown(
        f"mean {s.mean:.4g} · std {s.std:.4g}  \nmin {s.min:.4g} · max {s.max:.4g}  \n"
        f"nonzero on {100 * s.frac_nonzero:.1f}% of tokens"
    )


def _snippets(info: NodeAnalysis) -> None:
    st.markdown("**Top and bottom activating snippets** (pretraining text, by quantile)")
    snips = [*info.samples.top, *info.samples.bottom]
    scale = max([abs(a) for s in snips for a in s.acts] + [1e-9])
    st.html(tk.legend_html(scale=scale))
    top, bottom = st.tabs(["top activations", "bottom activations"])
    for tab, group, side in (
        (top, info.samples.top, "top"),
        (bottom, info.samples.bottom, "bottom"),
    ):
        lines = [
            (
                f"{side} {s.q:g} quantile: activation {s.value:.4g} at the outlined token",
                tk.token_spans(s.tokens, s.acts, scale=scale, focus=s.focus),
            )
            for s in group
        ]
        with tab:
            st.html(tk.token_block(lines) if lines else "<i>no snippets</i>")


def _task(info: NodeAnalysis) -> None:
    t = info.task
    st.markdown(
        f"**On the task** (first {len(t.a)} pairs; final-position mean: A {t.mean_a:.4g}, "
        f"B {t.mean_b:.4g})"
    )
    zero = st.toggle("zero-centred colours", value=True, key="task_zero")
    view = st.radio(
        "prompts", ["class A", "class B", "difference B − A"], horizontal=True, key="task_view"
    )
    if view == "difference B − A":
        rows = [
            tk.difference(a.tokens, a.acts, b.tokens, b.acts) for a, b in zip(t.a, t.b, strict=True)
        ]
        captions = [f"pair {i}: B − A (aligned at the last token)" for i in range(len(rows))]
    else:
        prompts: list[PromptActs] = t.a if view == "class A" else t.b
        rows = [(p.tokens, p.acts) for p in prompts]
        captions = [f"pair {i}, prompt {view[-1]}" for i in range(len(rows))]
    values = [v for _, acts in rows for v in acts]
    if not values:
        st.caption("no task prompts")
        return
    low, high = min(values), max(values)
    scale = max(abs(low), abs(high), 1e-9) if zero else max(high - low, 1e-9)
    st.html(tk.legend_html(scale=scale, zero_centered=zero, low=low))
    lines = [
        (c, tk.token_spans(toks, acts, scale=scale, zero_centered=zero, low=low))
        for c, (toks, acts) in zip(captions, rows, strict=True)
    ]
    st.html(tk.token_block(lines))


def _attention(rec: NodeRec, analysis: AnalysisDoc) -> None:
    key = f"{rec.layer}.{rec.head}"
    att = analysis.attention.get(key)
    if att is None:
        st.caption(f"no attention pattern stored for head {key}")
        return
    st.markdown(f"**Head {key} on the first task prompt (A)**")
    left, right = st.columns(2)
    with left:
        st.plotly_chart(attention_figure(att, head=key), theme=None, config=PLOT_CONFIG)
    with right:
        values = att.channels.get(str(rec.channel))
        if values is None:
            st.caption(
                f"channel {rec.channel} is kept at v only: q·k is shown for channels kept at q or k"
            )
        else:
            title = f"channel {rec.channel}: its share of the attention logit"
            st.plotly_chart(
                qk_figure(values, att.prompt, title=title), theme=None, config=PLOT_CONFIG
            )
