"""The dashboard's cached loaders and selection state (Streamlit).

Everything costly is loaded once per process (``st.cache_resource``, keyed by the file's path
and modification time, so a re-run ``analyze`` or ``validate`` shows up on the next rerun);
playground runs are memoised by their inputs (``st.cache_data``). A click never recomputes
anything else.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st

from sparsecircuits.circuits.schema import CIRCUIT_FILE, CircuitDoc, check_model, load_circuit
from sparsecircuits.errors import SparseCircuitsError
from sparsecircuits.viz.analysis_schema import ANALYSIS_FILE, AnalysisDoc, load_analysis

if TYPE_CHECKING:  # torch loads with the first model (playground), not on the first render
    from sparsecircuits.circuits.masking import Ablation
    from sparsecircuits.circuits.pipeline import LoadedModel
    from sparsecircuits.viz import playground as pg
from sparsecircuits.viz.app_data import (
    CircuitEntry,
    EdgeRow,
    discover_circuits,
    edge_index,
    read_report,
)

NODE = "node"  # session key: the inspected node id
NODE_PICK = "node_pick"  # the fallback select box
LAYER = "layer"  # the layer view's layer
LAYER_PICK = "layer_pick"  # its select box
BRIDGES_DIR = "bridges_dir"  # the Bridges page's directory (default: the shipped bridges)


@dataclass(frozen=True)
class AppArgs:
    target: str | None
    runs_dir: str
    model: str | None
    server: str | None = None  # the Monitor page's model server (``--server URL``)
    catalog: str | None = None  # its catalogue directory (else the server's ``/healthz``)


def parse_args(argv: list[str]) -> AppArgs:
    """The app's own arguments (after ``--`` on the ``streamlit run`` line)."""
    p = argparse.ArgumentParser(prog="sparsecircuits viz (app)")
    p.add_argument("target", nargs="?", default=None)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--model", default=None)
    p.add_argument("--server", default=None)
    p.add_argument("--catalog", default=None)
    ns, _ = p.parse_known_args(argv)
    return AppArgs(ns.target, ns.runs_dir, ns.model, ns.server, ns.catalog)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(show_spinner=False, ttl=30)
def circuits(target: str | None, runs_dir: str) -> list[CircuitEntry]:
    return discover_circuits(target, runs_dir=runs_dir)


@st.cache_resource(show_spinner="reading circuit.json ...", max_entries=16)
def _circuit(path: str, mtime: float) -> CircuitDoc:
    del mtime  # part of the cache key
    return load_circuit(path)


def circuit(directory: Path) -> CircuitDoc:
    return _circuit(str(directory / CIRCUIT_FILE), _mtime(directory / CIRCUIT_FILE))


@st.cache_resource(show_spinner="reading analysis.json ...", max_entries=16)
def _analysis(path: str, mtime: float, weights_hash: str) -> AnalysisDoc | str:
    del mtime
    try:
        return load_analysis(path, weights_hash=weights_hash)
    except SparseCircuitsError as err:
        return str(err)


def analysis(directory: Path, doc: CircuitDoc) -> tuple[AnalysisDoc | None, str | None]:
    """(analysis, None) or (None, why there is none)."""
    path = directory / ANALYSIS_FILE
    if not path.exists():
        return None, f"no {ANALYSIS_FILE} yet: run `sparsecircuits analyze {directory}`"
    got = _analysis(str(path), _mtime(path), doc.model.weights_hash)
    return (None, got) if isinstance(got, str) else (got, None)


@st.cache_resource(show_spinner=False, max_entries=16)
def _edges(path: str, mtime: float) -> dict[str, list[EdgeRow]]:
    del mtime
    return edge_index(load_circuit(path))


def edges(directory: Path) -> dict[str, list[EdgeRow]]:
    return _edges(str(directory / CIRCUIT_FILE), _mtime(directory / CIRCUIT_FILE))


@st.cache_resource(show_spinner=False, max_entries=16)
def _report(directory: str, mtime: float) -> dict[str, Any] | None:
    del mtime
    return read_report(directory)


def report(directory: Path) -> dict[str, Any] | None:
    return _report(str(directory), _mtime(directory / "report.json"))


@st.cache_resource(show_spinner="loading the model ...", max_entries=4)
def _model(spec: str) -> LoadedModel:
    from sparsecircuits.circuits.pipeline import load_for_circuits

    return load_for_circuits(spec)


def model_for(doc: CircuitDoc, override: str | None) -> tuple[LoadedModel | None, str | None]:
    """The circuit's model (or ``override``), checked against the circuit's weights hash."""
    spec = override or doc.model.id
    try:
        lm = _model(spec)
        check_model(doc, lm.model, source="circuit.json")
    except SparseCircuitsError as err:
        hint = "" if override else " (start `sparsecircuits viz` with --model PATH)"
        return None, f"{err}{hint}"
    return lm, None


@st.cache_resource(show_spinner="computing ablation values (once per model) ...", max_entries=8)
def ablation(
    spec: str, circuit_path: str, kind: str, _lm: LoadedModel, _doc: CircuitDoc
) -> Ablation:
    from sparsecircuits.viz import playground as pg

    del spec, circuit_path  # cache key
    return pg.circuit_ablation(_lm, _doc, kind=kind)


@st.cache_resource(show_spinner=False, max_entries=16)
def task_example(
    spec: str, circuit_path: str, _lm: LoadedModel, _doc: CircuitDoc
) -> pg.TaskExample:
    from sparsecircuits.viz import playground as pg

    del spec, circuit_path
    return pg.task_example(_doc, _lm.tokenizer, block_size=_lm.model.config.block_size)


@st.cache_data(show_spinner="running the model ...", max_entries=64)
def playground(
    spec: str,
    circuit_path: str,
    text: str,
    change: tuple[str, ...],
    mode: str,
    source: str | None,
    kind: str,
    target_ids: tuple[int, ...],
    _lm: LoadedModel,
    _doc: CircuitDoc,
    _ablation: Ablation | None,
    continue_tokens: int = 0,
) -> pg.PlaygroundResult:
    from sparsecircuits.viz import playground as pg

    del spec, circuit_path, kind
    return pg.run_playground(
        _lm.model,
        _lm.tokenizer,
        text,
        doc=_doc,
        ablation=_ablation,
        change=change,
        mode=mode,
        source_text=source,
        target_ids=target_ids,
        continue_tokens=continue_tokens,
    )


def select_node(node_id: str | None, doc: CircuitDoc) -> None:
    """Inspect ``node_id``: the layer view follows it."""
    st.session_state[NODE] = node_id
    st.session_state[NODE_PICK] = node_id
    rec = next((n for n in doc.nodes if n.id == node_id), None)
    if rec is not None and rec.layer >= 0:
        st.session_state[LAYER] = rec.layer


def clicked_node(chart_key: str, valid: set[str]) -> str | None:
    """The node id of the point last clicked in the chart ``chart_key`` (None if none)."""
    state = st.session_state.get(chart_key)
    if state is None:
        return None
    selection = state.get("selection") if hasattr(state, "get") else None
    for point in (selection or {}).get("points", []):
        data = point.get("customdata")
        if isinstance(data, list | tuple):
            data = data[0] if data else None
        if isinstance(data, str) and data in valid:
            return data
    return None
