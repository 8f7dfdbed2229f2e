"""The Bridges page (Streamlit): a bridges directory's models and size, its fidelity per site
(``fidelity.json``, only when it measured these bridges), and its steering experiments
(``steering/*.json``). It reads files only; no model runs. The pure parts are in
``bridges_data.py``.

The files are a few kilobytes, so they are re-read on every rerun rather than cached: a new
``bridge eval`` or ``bridge steer`` shows up at once.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sparsecircuits.errors import SparseCircuitsError
from sparsecircuits.viz import app_state as state
from sparsecircuits.viz import bridges_data as bd
from sparsecircuits.viz.app_inspector import PLOT_CONFIG
from sparsecircuits.viz.app_pages import Ctx

STEER_PICK = "bridges_steer_pick"  # session key: the chosen steering file

FIDELITY_HELP = (
    "**Reading the table.** Each site is a point in the residual stream where the two models "
    "are joined. *NMSE* is the share of the target's variance a map leaves unexplained: the "
    "encoder's from the dense residual to the sparse one, the decoder's back (0 is perfect, 1 "
    "is no better than always predicting the mean). *KL* (nats per token) measures how far a "
    "hybrid's next-token distribution is from the dense model's: *d→s* runs the dense model up "
    "to the site, encodes, and finishes in the sparse model; *s→d* runs the sparse model up to "
    "the site, decodes, and finishes in the dense model. *Agreement* is the share of positions "
    "where the hybrid and the dense model rank the same next token first. The *sparse model "
    "alone* row is the sparse model's own KL and agreement to the dense model: a reference "
    "point, not a bound; a bridge may do better or worse than it."
)
STEER_HELP = (
    "**The arms.** A sparse node is moved from its mean on the *from* class's prompts to its "
    "mean on the *to* class's (times the scale). *Bridged*: that change, carried to the next "
    "bridge site and through the decoder, is added to the dense model. *Random*: a random dense "
    "direction of the same norm, prompt by prompt (the control; mean and max over seeds). "
    "*Dense class-mean difference*: the dense residual's own class-mean difference at the site "
    "(an upper reference). *Sparse steered*: the sparse model with the node moved in place. "
    "*Flip share*: of the held-out prompts whose from-answer won before, the share whose "
    "other answer wins after. Side effects are the bridged arm's: the dense model's accuracy "
    "on other tasks and its loss on held-out text."
)


def _directory() -> Path:
    """The bridges directory typed on the page (default: the shipped bridges). The session
    key is set before the widget exists, so the widget needs no default of its own."""
    st.session_state.setdefault(state.BRIDGES_DIR, str(bd.DEFAULT_BRIDGES_DIR))
    text = st.text_input("Bridges directory (written by `sparsecircuits bridge fit`) or a "
                         "shipped name", key=state.BRIDGES_DIR)  # fmt: skip
    return Path(text.strip() or bd.DEFAULT_BRIDGES_DIR)


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _header(b: bd.BridgesDir) -> None:
    m = b.meta
    cols = st.columns(5)
    cols[0].metric("sparse model", bd.short(m.hashes.get("sparse")),
                   help=f"weights hash {m.hashes.get('sparse')}")  # fmt: skip
    cols[1].metric("dense model", bd.short(m.hashes.get("dense")),
                   help=f"weights hash {m.hashes.get('dense')}")  # fmt: skip
    cols[2].metric("steps", "—" if b.steps is None else f"{b.steps:,}")
    cols[3].metric("sites", len(m.sites), help=", ".join(m.sites))
    size = "" if b.weights_bytes is None else f", {_bytes(b.weights_bytes)}"
    cols[4].metric("parameters", f"{b.n_params:,}", help=f"{bd.WEIGHTS_FILE}{size}")
    k = "no AbsTopK" if m.k is None else f"AbsTopK k={m.k}"
    st.caption(f"Widths: dense {m.d_dense} ↔ sparse {m.d_sparse} ({k}). Bridges weights "
               f"sha256 `{bd.short(m.weights_sha256)}`{size}.")  # fmt: skip
    config = (m.model_extra or {}).get("config")
    if isinstance(config, dict):
        with st.expander("fit config"):
            st.json(config)


def _fidelity(b: bd.BridgesDir) -> None:
    st.subheader("Fidelity per site")
    cmd = f"`sparsecircuits bridge eval {b.path}`"
    if b.fidelity_other is not None:
        st.warning(f"{bd.FIDELITY_FILE} measured other bridges (weights sha256 "
                   f"{bd.short(b.fidelity_other)}, these are {bd.short(b.meta.weights_sha256)});"
                   f" measure these with {cmd}.")  # fmt: skip
        return
    if b.fidelity_error is not None:
        st.error(b.fidelity_error)
        return
    doc = b.fidelity
    if doc is None:
        st.info(f"No {bd.FIDELITY_FILE} yet: measure these bridges with {cmd}.")
        return
    st.caption(f"{bd.FIDELITY_FILE}: measured these bridges (sha256 "
               f"`{bd.short(doc.weights_sha256)}`) on {doc.windows} held-out windows of "
               f"{doc.seq_len} tokens.")  # fmt: skip
    num, pct = st.column_config.NumberColumn, "percent"
    st.dataframe(
        bd.fidelity_rows(doc), hide_index=True, width="stretch", key="bridges_fidelity",
        column_config={"enc NMSE": num(format="%.3f"), "dec NMSE": num(format="%.3f"),
                       "KL d→s": num(format="%.3f"), "KL s→d": num(format="%.3f"),
                       "agree d→s": num(format=pct), "agree s→d": num(format=pct)},
    )  # fmt: skip
    st.plotly_chart(bd.kl_figure(doc), theme=None, config=PLOT_CONFIG, key="bridges_kl")
    st.markdown(FIDELITY_HELP)


def _site_fidelity(b: bd.BridgesDir, doc: bd.SteeringDoc) -> None:
    """The steering site's fidelity: from this directory's fidelity.json when the experiment
    used these bridges (checked), else as the result recorded it (not checked: `bridge steer`
    copies fidelity.json's row without asking which bridges it measured)."""
    same = doc.bridges_sha256 == b.meta.weights_sha256
    row = next((r for r in b.fidelity.sites if r.site == doc.site), None) if b.fidelity else None
    source = f"{bd.FIDELITY_FILE} of these bridges"
    if row is None or not same:
        row, source = doc.site_fidelity, "as recorded with the result, not checked"
    if row is None:
        st.caption(f"No fidelity recorded for site {doc.site}.")
        return
    st.caption(f"Fidelity at site {doc.site} ({source}): NMSE enc {row.enc_nmse:.3f} / dec "
               f"{row.dec_nmse:.3f}; KL d→s {row.kl_d2s:.3f}, s→d {row.kl_s2d:.3f}; agreement "
               f"d→s {row.agree_d2s:.1%}, s→d {row.agree_s2d:.1%}.")  # fmt: skip


def _experiment(b: bd.BridgesDir, doc: bd.SteeringDoc) -> None:
    if doc.bridges_sha256 is not None and doc.bridges_sha256 != b.meta.weights_sha256:
        st.warning(f"This experiment steered through other bridges (weights sha256 "
                   f"{bd.short(doc.bridges_sha256)}); its numbers are not these "
                   "bridges'.")  # fmt: skip
    # One line rather than metrics: task names are too long for a metric's large type.
    st.markdown(f"**node** `{doc.node}` · **task** `{doc.task}` · **class** {doc.src} → "
                f"{doc.dst} · **site** `{doc.site}` · **positions** {doc.positions}")  # fmt: skip
    r0 = doc.rows[0]
    st.caption(f"Node class means (train prompts): {doc.src} {doc.value_from:+.3f} → "
               f"{doc.dst} {doc.value_to:+.3f}. "
               f"{doc.n_test_prompts} held-out prompts, of which {r0.bridged.n} chose the "
               f"from-answer in the dense model and {r0.sparse.n} in the sparse one (the flip "
               f"shares' denominators); {len(doc.seeds)} random seeds.")  # fmt: skip
    num, pct = st.column_config.NumberColumn, "percent"
    flips = ("bridged flip", "random flip (mean)", "random flip (max)", "dense class-mean flip",
             "sparse steered flip", "Δ accuracy, other tasks")  # fmt: skip
    config = {k: num(format=pct) for k in flips}
    config |= {k: num(format="%+.3f") for k in ("Δ logit (bridged)", "node move")}
    config |= {k: num(format="%.3f") for k in ("|Δh| bridged", "|Δh| class mean")}
    config["scale"] = num(format="%g")
    st.dataframe(bd.steering_rows(doc), hide_index=True, width="stretch", column_config=config,
                 key="bridges_steer")  # fmt: skip
    st.plotly_chart(bd.flip_figure(doc), theme=None, config=PLOT_CONFIG, key="bridges_flips")
    sizes = [f"{doc.side_pairs} test pairs per other task" if doc.side_pairs else "",
             f"{doc.heldout_windows} held-out windows" if doc.heldout_windows else ""]  # fmt: skip
    if any(sizes):
        st.caption("Side effects measured on " + " and ".join(x for x in sizes if x) + ".")
    with st.expander("Side effects per task (the dense model's accuracy, bridged arm)"):
        rows = bd.side_task_rows(doc)
        if rows:
            st.dataframe(rows, hide_index=True, width="stretch", key="bridges_side",
                         column_config={k: num(format=pct) for k in ("before", "after",
                                                                      "change")})  # fmt: skip
        else:
            st.caption("No other tasks were measured (`--side-pairs 0`).")
    _site_fidelity(b, doc)
    st.markdown(STEER_HELP)


def _steering(b: bd.BridgesDir) -> None:
    st.subheader("Steering experiments")
    files = bd.load_steering(b.path)
    if not files:
        st.info(f"No steering experiments were run for these bridges (none in "
                f"{b.path / bd.STEERING_DIR}). Run one with:")  # fmt: skip
        st.code(bd.steer_command(b.path), language="bash")
        return
    for f in files:
        if f.error is not None:
            st.error(f.error)
    good = {f.path.stem: f.doc for f in files if f.doc is not None}
    if not good:
        return
    pick = st.selectbox("Experiment", list(good), key=STEER_PICK,
                        format_func=lambda s: f"{s}: {good[s].node} on {good[s].task}")  # fmt: skip
    _experiment(b, good[pick])


def bridges_view() -> None:
    """The page itself (no circuit needed; tests run it on its own)."""
    st.header("Bridges: a weight-sparse model joined to a dense one")
    directory = _directory()
    try:
        b = bd.load_dir(directory)
    except SparseCircuitsError as err:
        if directory == bd.DEFAULT_BRIDGES_DIR and not directory.exists():
            st.info(f"The shipped bridges are not installed ({directory}); type the directory "
                    "of bridges written by `sparsecircuits bridge fit`.")  # fmt: skip
        else:
            st.error(str(err))
        return
    _header(b)
    _fidelity(b)
    _steering(b)


def bridges_page(ctx: Ctx) -> None:
    del ctx  # the page reads its own directory; the circuit is not used
    bridges_view()
