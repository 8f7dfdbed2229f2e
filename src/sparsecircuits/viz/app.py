"""The circuit dashboard, a Streamlit app: ``sparsecircuits viz [RUN_DIR|MODEL]`` runs
``streamlit run`` on this file (arguments after ``--``: the target, ``--runs-dir``, ``--model``).

Pickers in the sidebar choose model, task and circuit run; the pages show one layer at a time
with a node inspector, the whole circuit, curves and the verification report, embeddings, and a
playground, the Monitor page (one served request's circuit telemetry; ``--server URL``,
``--catalog DIR``) and the Bridges page (a bridges directory's fidelity and steering results).
Costly data comes from ``analysis.json`` (``sparsecircuits analyze``).
"""

from __future__ import annotations

import sys

import streamlit as st

from sparsecircuits.circuits.schema import CircuitDoc
from sparsecircuits.viz import app_state as state
from sparsecircuits.viz.app_bridges import bridges_page
from sparsecircuits.viz.app_data import CircuitEntry
from sparsecircuits.viz.app_monitor import monitor_page
from sparsecircuits.viz.app_pages import Ctx, curves_page, embeddings_page, graph_page, layer_page
from sparsecircuits.viz.app_play import playground_page

PAGES = {
    "Circuit (by layer)": layer_page,
    "Whole circuit": graph_page,
    "Curves & report": curves_page,
    "Embeddings": embeddings_page,
    "Playground": playground_page,
    "Monitor": monitor_page,
    "Bridges": bridges_page,
}


def _pick(entries: list[CircuitEntry]) -> CircuitEntry:
    """The model, task and run pickers of the sidebar."""
    models = sorted({e.model for e in entries})
    model = st.sidebar.selectbox("Model", models, key="pick_model")
    tasks = sorted({e.task for e in entries if e.model == model})
    task = st.sidebar.selectbox("Task", tasks, key="pick_task")
    runs = [e for e in entries if e.model == model and e.task == task]
    labels = {e.label: e for e in runs}
    run = st.sidebar.selectbox("Circuit run", list(labels), key="pick_run")
    return labels[run]


def _colour(delta: float) -> str:
    """Metric delta colour: a higher loss is red, a lower one green, no change grey."""
    return "off" if abs(delta) < 5e-4 else "inverse"


def _readout(doc: CircuitDoc) -> None:
    """The circuit's size and losses (every page shows them)."""
    cols = st.columns(5)
    cols[0].metric("nodes kept", f"{doc.n_nodes:,}", help=f"of {doc.total_nodes:,} in the model")
    cols[1].metric(
        "weight edges",
        f"{doc.n_weight_edges:,}",
        help=f"nonzero weights between kept nodes (the paper's count); {doc.n_edges:,} edges "
        "with residual links",
    )
    loss = doc.loss
    cols[2].metric("full model loss", f"{loss.full:.3f}", help="train pairs")
    cols[3].metric(
        "circuit loss",
        f"{loss.circuit:.3f}",
        f"{loss.circuit - loss.full:+.3f} vs full",
        delta_color=_colour(loss.circuit - loss.full),
        help="train pairs",
    )
    cols[4].metric(
        "circuit loss, test",
        f"{loss.circuit_test:.3f}",
        f"{loss.circuit_test - loss.full_test:+.3f} vs full",
        delta_color=_colour(loss.circuit_test - loss.full_test),
        help=f"held-out test templates; full model {loss.full_test:.3f}",
    )
    reached = "reached" if doc.reached else "**not** reached"
    st.caption(
        f"Task loss = two-token cross-entropy at the last position, per-prompt mean, nats "
        f"(chance 0.693). Target {doc.target_loss:g}: {reached}. Ablation: {doc.ablation}; "
        f"{doc.n_edges:,} edges including residual links."
    )


def main(argv: list[str]) -> None:
    st.set_page_config(page_title="sparsecircuits circuits", layout="wide")
    args = state.parse_args(argv)
    entries = state.circuits(args.target, args.runs_dir)
    st.sidebar.title("sparsecircuits")
    if not entries:
        st.error(
            f"No circuits found for {args.target or 'stdlib-sparse'}; find one with "
            "`sparsecircuits prune --task single_double_quote`."
        )
        return
    entry = _pick(entries)
    doc = state.circuit(entry.path)
    if st.session_state.get("circuit_dir") != str(entry.path):  # a new circuit: reset selection
        st.session_state["circuit_dir"] = str(entry.path)
        st.session_state[state.NODE] = None
        st.session_state.pop(state.LAYER, None)
    analysis, missing = state.analysis(entry.path, doc)
    page = st.sidebar.radio("View", list(PAGES), key="page")
    st.sidebar.caption(f"{entry.path}")
    if missing:
        st.sidebar.warning(missing)
    st.title(f"{doc.task} · {entry.model}")
    _readout(doc)
    PAGES[page](Ctx(doc, entry.path, analysis, missing, args))


main(sys.argv[1:])
