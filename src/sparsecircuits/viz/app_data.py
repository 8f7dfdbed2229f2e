"""What the dashboard shows, without Streamlit: finding circuits on disk and reading the tables
of one circuit (a node's edges, the verification report)."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsecircuits.circuits.schema import CIRCUIT_FILE, CircuitDoc, model_label
from sparsecircuits.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stdlib-sparse"
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class CircuitEntry:
    """One circuit on disk: its directory and what the pickers show."""

    path: Path  # the directory holding circuit.json
    model: str  # model label (shipped name or model directory name)
    model_id: str  # the model as recorded in circuit.json (what the app loads)
    task: str
    run: str  # the directory name (a timestamp in the prune output layout)
    n_nodes: int
    created: str

    @property
    def label(self) -> str:
        return f"{self.run}  ({self.n_nodes} nodes)"


def discover_circuits(
    target: str | None = None, *, runs_dir: str | Path = "runs"
) -> list[CircuitEntry]:
    """Circuits for ``target``: a circuit directory (or its circuit.json), a directory holding
    circuits up to three levels down (``runs/``, ``runs/<model>``, ``runs/<model>/<task>``), or
    a model (shipped name, model or run directory), whose circuits are
    ``runs_dir/<model label>/*/*/circuit.json`` (the layout ``sparsecircuits prune`` writes).
    Newest run first within a task."""
    target = target or DEFAULT_MODEL
    path = Path(target)
    found: list[Path] = []
    if path.is_file() and path.name == CIRCUIT_FILE:
        found = [path]
    elif (path / CIRCUIT_FILE).is_file():
        found = [path / CIRCUIT_FILE]
    elif path.is_dir():
        for pattern in ("*/*/*/", "*/*/", "*/"):
            found += path.glob(pattern + CIRCUIT_FILE)
    if not found:
        found = list(Path(runs_dir, model_label(target)).glob(f"*/*/{CIRCUIT_FILE}"))
    entries = [e for e in (_entry(p) for p in sorted(set(found))) if e is not None]
    entries.sort(key=lambda e: e.run, reverse=True)
    return sorted(entries, key=lambda e: (e.model, e.task))  # stable: newest first per task


def _entry(path: Path) -> CircuitEntry | None:
    try:
        data = json.loads(path.read_text())
        model_id = str(data["model"]["id"])
        return CircuitEntry(
            path=path.parent,
            model=model_label(model_id),
            model_id=model_id,
            task=str(data["task"]),
            run=path.parent.name,
            n_nodes=int(data["n_nodes"]),
            created=str(data.get("created", "")),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("skipping %s: not a readable circuit file (%s)", path, err)
        return None


def require_circuits(target: str | None, *, runs_dir: str | Path = "runs") -> list[CircuitEntry]:
    """:func:`discover_circuits`, raising InputError (with the command to make one) if none."""
    entries = discover_circuits(target, runs_dir=runs_dir)
    if not entries:
        name = target or DEFAULT_MODEL
        where = Path(runs_dir, model_label(name), "*", "*", CIRCUIT_FILE)
        raise InputError(
            f"no circuits found for {name!r} (looked in {name} and {where}); find one with "
            f"`sparsecircuits prune --task single_double_quote --model {name}`"
        )
    return entries


@dataclass(frozen=True)
class EdgeRow:
    direction: str  # "in" or "out"
    node: str  # the other end
    kind: str
    weight: float


def edge_index(doc: CircuitDoc) -> dict[str, list[EdgeRow]]:
    """Every node's in- and out-edges, strongest |weight| first."""
    out: dict[str, list[EdgeRow]] = defaultdict(list)
    for e in doc.edges:
        out[e.dst].append(EdgeRow("in", e.src, e.kind, e.weight))
        out[e.src].append(EdgeRow("out", e.dst, e.kind, e.weight))
    for rows in out.values():
        rows.sort(key=lambda r: (r.direction, -abs(r.weight)))
    return dict(out)


def read_report(directory: str | Path) -> dict[str, Any] | None:
    """``report.json`` of ``sparsecircuits validate`` in the circuit's directory, if any."""
    path = Path(directory) / REPORT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable %s (%s)", path, err)
        return None
    return data if isinstance(data, dict) and isinstance(data.get("checks"), list) else None


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per check: name, PASS/FAIL, criterion, summary."""
    return [
        {
            "check": c.get("name", "?"),
            "result": c.get("verdict") or ("PASS" if c.get("passed") else "FAIL"),
            "criterion": c.get("criterion", ""),
            "summary": c.get("summary", ""),
        }
        for c in report["checks"]
    ]
