"""The Monitor page (Streamlit): one served request's circuit telemetry — its tokens coloured
by each family's engagement, the flags, the policy's decision, and from each family a way to
its circuits. The telemetry comes from the model server named by ``--server`` (``GET
/v1/telemetry/{id}``) or from a JSON file; the pure parts are in ``monitor_view.py``.

Torch-free at import: the tokenizer (for token texts the operator supplies) loads on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from sparsecircuits.errors import SparseCircuitsError
from sparsecircuits.viz import app_state as state
from sparsecircuits.viz import monitor_view as mv
from sparsecircuits.viz.app_inspector import PLOT_CONFIG
from sparsecircuits.viz.app_pages import Ctx

if TYPE_CHECKING:
    from sparsecircuits.data.tokenizer import Tokenizer
    from sparsecircuits.viz.app_data import CircuitEntry

VIEW = "mon_view"  # session key: the loaded TelemetryView
ERROR = "mon_error"  # session key: why the last load failed
CIRCUIT_PAGE = "Circuit (by layer)"
SOURCES = {"server": "request id, from the server", "file": "telemetry JSON file",
           "paste": "paste telemetry JSON"}  # fmt: skip


@st.cache_resource(show_spinner="loading the tokenizer ...", max_entries=4)
def _tokenizer(spec: str) -> Tokenizer:
    from sparsecircuits.data.tokenizer import Tokenizer
    from sparsecircuits.model.io import resolve_model_dir  # imports torch: only on use

    return Tokenizer.load(resolve_model_dir(spec))


@st.cache_data(show_spinner=False, ttl=60)
def _catalog_links(catalog_dir: str) -> dict[str, list[mv.CircuitLink]] | str:
    try:
        return mv.family_circuits(catalog_dir)
    except SparseCircuitsError as err:
        return str(err)


def _load(loader: object) -> None:
    """Run ``loader()`` (returns a TelemetryView); keep it, or the one-line reason it failed."""
    try:
        st.session_state[VIEW] = loader()  # type: ignore[operator]
        st.session_state[ERROR] = None
    except SparseCircuitsError as err:
        st.session_state[ERROR] = str(err)


def _source(ctx: Ctx) -> None:
    """Where the telemetry comes from: the server, a file or pasted JSON."""
    server = ctx.args.server
    options = [k for k in SOURCES if server is not None or k != "server"]
    how = st.radio("Telemetry from", options, format_func=SOURCES.get, horizontal=True,
                   key="mon_source")  # fmt: skip
    if how == "server":
        assert server is not None
        with st.form("mon_fetch", border=False):
            rid = st.text_input(f"Request id (the completion's `id`; read from {server})",
                                key="mon_request_id", placeholder="cmpl-...")  # fmt: skip
            if st.form_submit_button("Load telemetry", type="primary"):
                _load(lambda: mv.fetch_telemetry(server, rid))
    elif how == "file":
        up = st.file_uploader("Telemetry JSON (`GET /v1/telemetry/{id}`'s answer)",
                              type=["json"], key="mon_file")  # fmt: skip
        if up is not None and st.session_state.get("mon_file_seen") != up.file_id:
            st.session_state["mon_file_seen"] = up.file_id
            _load(lambda: mv.parse_telemetry_text(up.getvalue()))
    else:
        with st.form("mon_paste", border=False):
            text = st.text_area("Telemetry JSON", key="mon_json", height=140)
            if st.form_submit_button("Show", type="primary"):
                _load(lambda: mv.parse_telemetry_text(text))


def _labels(ctx: Ctx, view: mv.TelemetryView) -> list[str]:
    """Token labels: indices, or the pieces of the text the operator supplies (the telemetry
    itself holds no text, by design)."""
    with st.expander("Token texts (optional: the server stores no prompt or completion text)"):
        st.caption("Paste the request's prompt and the response's `choices[0].text`; they are "
                   "tokenized here with the dashboard's model's tokenizer (`--model`, else the "
                   "current circuit's), which must be the served model's.")  # fmt: skip
        prompt = st.text_area("prompt", key="mon_prompt", height=80)
        completion = st.text_area("completion text", key="mon_completion", height=80)
    pieces: list[list[str] | None] = [None, None]
    if prompt or completion:
        try:
            tok = _tokenizer(ctx.args.model or ctx.doc.model.id)
        except SparseCircuitsError as err:
            st.warning(f"token texts not used: {err}")
        else:
            for i, text in enumerate((prompt, completion)):
                if text:
                    pieces[i] = [tok.decode([t]) for t in tok.encode(text)]
    labels, note = mv.token_labels(view, *pieces)
    if note:
        st.caption(f"Token texts: {note}.")
    return labels


def _decision(view: mv.TelemetryView) -> None:
    d = view.decision
    cols = st.columns(5)
    cols[0].metric("action", d["action"])
    cols[1].metric("family", d.get("family") or "—")
    cols[2].metric("rule", d.get("rule") or "—")
    at = d.get("at_token")
    cols[3].metric("at token", "—" if at is None else ("prompt" if at == mv.PROMPT else f"g{at}"))
    sha = d["policy_sha256"]
    cols[4].metric("policy", sha[:8], help=f"policy SHA-256 {sha}")
    parts = [f"request `{view.request_id}`"]
    if view.model:
        parts.append(f"model `{view.model}`")
    if view.finish_reason:
        parts.append(f"finish `{view.finish_reason}`")
    parts.append(f"{view.n_prompt} prompt + {view.n_generated} generated tokens observed")
    st.caption(" · ".join(parts) + (f". Reason: {d['reason']}" if d.get("reason") else ""))


def _open_circuit(entry: CircuitEntry) -> None:
    """Point the sidebar pickers at ``entry`` and show its layer view (a widget callback: the
    pickers read these keys on the rerun that follows)."""
    st.session_state["pick_model"] = entry.model
    st.session_state["pick_task"] = entry.task
    st.session_state["pick_run"] = entry.label
    st.session_state["page"] = CIRCUIT_PAGE


def _match(link: mv.CircuitLink, entries: list[CircuitEntry]) -> CircuitEntry | None:
    """The dashboard's entry of a catalogue circuit: the same directory, else the same task."""
    target = Path(link.path).resolve()
    same = [e for e in entries if Path(e.path).resolve() == target]
    return (same or [e for e in entries if e.task == link.task] or [None])[0]


def _families(ctx: Ctx, view: mv.TelemetryView) -> None:
    """Per family: its peak z, dampening, and its circuits (a button when the dashboard lists
    the circuit, else its directory)."""
    catalog = ctx.args.catalog
    if catalog is None and ctx.args.server is not None:
        try:
            catalog = mv.fetch_catalog_dir(ctx.args.server)
        except SparseCircuitsError as err:
            st.caption(f"catalogue unknown: {err}")
    links = _catalog_links(catalog) if catalog else {}
    if isinstance(links, str):
        st.warning(links)
        links = {}
    entries = state.circuits(ctx.args.target, ctx.args.runs_dir)
    st.markdown("**Families**")
    for fam in view.families:
        cols = st.columns([2, 1, 1, 4])
        cols[0].markdown(f"**{fam.name}**" + (" · dampened" if fam.dampened else ""))
        cols[1].metric("max z", "—" if fam.max_z is None else f"{fam.max_z:.2f}")
        fired = sum(len(a) for a in fam.flags.values())
        cols[2].metric("flags", fired, help="times a rule of this family fired")
        with cols[3]:
            if not links:
                st.caption("no catalogue: start the dashboard with --catalog or --server")
            for link in links.get(fam.name, []):
                entry = _match(link, entries)
                tag = "" if link.admitted else " (not admitted)"
                if entry is not None:
                    st.button(f"open circuit: {link.task}{tag}", on_click=_open_circuit,
                              args=(entry,), key=f"mon_open_{fam.name}_{link.task}")  # fmt: skip
                else:
                    st.markdown(f"{link.task}{tag}: `{link.path}` (not in this dashboard's "
                                "circuit list)")  # fmt: skip


def monitor_page(ctx: Ctx) -> None:
    st.header("Monitor: one request's circuit telemetry")
    _source(ctx)
    if st.session_state.get(ERROR):
        st.error(st.session_state[ERROR])
    view: mv.TelemetryView | None = st.session_state.get(VIEW)
    if view is None:
        hint = "" if ctx.args.server else " (or start `sparsecircuits viz --server URL`)"
        st.info(f"Load a request's telemetry to see it{hint}.")
        return
    _decision(view)
    if not view.families:
        st.info("This server has no catalogue: no family was monitored (the decision is the "
                "no-catalogue monitor's allow).")  # fmt: skip
        return
    labels = _labels(ctx, view)
    colour = st.radio("colour", ["engagement", "z"], horizontal=True, key="mon_colour",
                      format_func={"engagement": "engagement", "z": "robust z"}.get)  # fmt: skip
    fig = mv.engagement_figure(view, labels, colour=colour)
    st.plotly_chart(fig, theme=None, config=PLOT_CONFIG, key="mon_heatmap")
    st.caption("Rows: families; columns: tokens (left of the dashed line: the prompt). Colour: "
               "engagement (1 = the family's nodes as active as on benign code) or robust z "
               "against the benign baseline; × marks a token where a rule fired (a rule fired "
               "by the prompt's pass is marked on the prompt's last token).")  # fmt: skip
    rows = mv.flag_rows(view, labels)
    st.markdown("**Flags**")
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch", key="mon_flags")
    else:
        st.caption("no rule fired on this request")
    _families(ctx, view)
