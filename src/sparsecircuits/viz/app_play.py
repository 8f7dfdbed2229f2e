"""The playground page (Streamlit): type Python, see the next-token distribution and every
circuit node's activation per token, and ablate or patch chosen nodes live. The model work is
in ``viz/playground.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import streamlit as st

from sparsecircuits.errors import SparseCircuitsError
from sparsecircuits.viz import app_state as state
from sparsecircuits.viz.app_figures import node_token_figure
from sparsecircuits.viz.app_inspector import PLOT_CONFIG
from sparsecircuits.viz.app_pages import Ctx

if TYPE_CHECKING:  # the playground module imports torch; it loads with the first run
    from sparsecircuits.viz.playground import PlaygroundResult, TokenProb

MODES = {"ablate": "ablate (replace by the ablation value)", "patch": "patch from a source prompt"}


def playground_page(ctx: Ctx) -> None:
    doc = ctx.doc
    lm, err = state.model_for(doc, ctx.args.model)
    if lm is None:
        st.error(err)
        return
    spec, cpath = str(lm.directory), str(ctx.directory)
    try:
        example = state.task_example(spec, cpath, lm, doc)
    except SparseCircuitsError as e:
        st.warning(f"could not build the task's first pair: {e}")
        example = None
    if ctx.analysis is not None and ctx.analysis.targets is not None:
        target_ids = tuple(ctx.analysis.targets.ids)
    else:
        target_ids = example.target_ids if example is not None else ()
    if example is not None:
        st.session_state.setdefault("pg_text", example.prompt_a)
        st.session_state.setdefault("pg_source", example.prompt_b)
    kinds = ["mean", "zero", "task_mean"]
    with st.form("playground", border=True):
        text = st.text_area(
            "Python prompt (the model predicts the next token)", key="pg_text", height=160
        )
        change = st.multiselect(
            "Circuit nodes to change", [n.id for n in doc.nodes], key="pg_nodes"
        )
        left, mid = st.columns(2)
        with left:
            mode = st.radio("How", list(MODES), format_func=MODES.get, key="pg_mode")
        with mid:
            kind = st.selectbox(
                "Ablation values",
                kinds,
                index=kinds.index(doc.ablation),
                key="pg_kind",
                help="mean: pretraining mean per channel; task_mean: mean over task prompts",
            )
        source = st.text_area("Source prompt (patch mode)", key="pg_source", height=100)
        n_cont = st.number_input(
            "Continue greedily (tokens; 0 = off)", 0, 128, 0, key="pg_continue",
            help="the model's own continuation of the prompt (KV-cached decoding), clean and, "
            "in ablate mode, with the chosen nodes ablated at every position",
        )  # fmt: skip
        st.form_submit_button("Run", type="primary")
    ablation = None
    try:
        if change and mode == "ablate":
            ablation = state.ablation(spec, cpath, kind, lm, doc)
        result = state.playground(
            spec,
            cpath,
            text,
            tuple(change),
            mode,
            source if mode == "patch" else None,
            kind,
            tuple(target_ids),
            lm,
            doc,
            ablation,
            int(n_cont),
        )
    except SparseCircuitsError as e:
        st.error(str(e))
        return
    _show(result, kind)


def _show(r: PlaygroundResult, kind: str) -> None:
    changed = bool(r.changed_nodes)
    how = f"ablated ({kind})" if r.mode == "ablate" else "patched"
    what = f"{len(r.changed_nodes)} node(s) {how}" if changed else "no node changed"
    st.markdown(f"**{len(r.tokens)} tokens; {what}.**")
    if r.targets:
        _targets(r)
    left, right = st.columns(2)
    with left:
        st.markdown("**Next token, clean** (top 10)")
        _top_table(r.top, "top_clean")
    with right:
        st.markdown(f"**Next token, {'changed' if changed else 'clean'}** (top 10)")
        _top_table(r.top_changed, "top_changed")
    if r.continuation is not None:
        _continuation(r)
    _heatmap(r)


def _continuation(r: PlaygroundResult) -> None:
    cols = st.columns(2 if r.continuation_changed is not None else 1)
    cols[0].markdown("**Greedy continuation, clean**")
    cols[0].code(r.continuation or "(nothing before <|endoftext|>)", language="python")
    if r.continuation_changed is not None:
        cols[1].markdown("**Greedy continuation, nodes ablated**")
        cols[1].code(r.continuation_changed or "(nothing before <|endoftext|>)", language="python")


def _targets(r: PlaygroundResult) -> None:
    st.markdown("**The task's two answer tokens** (logits at the last position)")
    cols = st.columns(len(r.targets) + 1)
    for col, t, side in zip(cols, r.targets, "AB", strict=False):
        col.metric(
            f"logit of {t.token!r} (answer {side})",
            f"{t.changed:.3f}",
            f"{t.delta:+.3f}",
            delta_color="off" if abs(t.delta) < 1e-6 else "normal",
        )
    diff = r.logit_diff
    if diff is not None:
        cols[-1].metric("logit A − logit B", f"{diff[1]:.3f}", f"{diff[1] - diff[0]:+.3f}")
    st.caption(
        "Big number: with the change; small: its difference from the clean run (green up, red "
        "down). A − B > 0 means the model prefers answer A."
    )


def _top_table(top: list[TokenProb], key: str) -> None:
    st.dataframe(
        {
            "token": [repr(t.token) for t in top],
            "probability": [round(t.prob, 4) for t in top],
            "logit": [round(t.logit, 3) for t in top],
        },
        hide_index=True,
        width="stretch",
        key=key,
    )


def _heatmap(r: PlaygroundResult) -> None:
    st.markdown("**Circuit nodes on this prompt** (activation per token)")
    views = ["clean", "changed", "changed − clean"] if r.changed_nodes else ["clean"]
    left, mid, right = st.columns(3)
    with left:
        view = st.radio("show", views, horizontal=True, key="pg_view")
    with mid:
        per_node = st.toggle("scale each node to its own max", value=True, key="pg_per_node")
    acts = {"clean": r.acts, "changed": r.acts_changed}.get(view, r.acts_changed - r.acts)
    keep = list(range(len(r.node_ids)))
    with right:
        active_only = st.toggle(
            "only nodes that are nonzero here", value=len(keep) > 40, key="pg_active"
        )
    if active_only:
        keep = [i for i in keep if bool((acts[i] != 0).any())]
    if not keep:
        st.caption("no circuit node is active on this prompt")
        return
    fig = node_token_figure(
        acts[keep],
        [r.node_ids[i] for i in keep],
        r.tokens,
        title=f"node activations ({view})",
        per_node=per_node,
    )
    st.plotly_chart(fig, theme=None, config=PLOT_CONFIG, key="pg_heatmap")
    scale = "each row scaled to its own largest |activation|" if per_node else "one scale"
    st.caption(
        f"Colour: activation (blue > 0, red < 0, white 0; {scale}; see the colour bar). "
        "Hover a cell for the raw value."
    )
