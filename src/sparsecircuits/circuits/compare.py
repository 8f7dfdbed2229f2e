"""Sparse vs dense circuit sizes: the paper's headline comparison (circuits in weight-sparse
models are ~16x smaller, geometric mean of edges over tasks, at the same target loss)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sparsecircuits.circuits.pipeline import find_circuit, load_for_circuits
from sparsecircuits.circuits.prune import PruneConfig, geometric_mean
from sparsecircuits.circuits.report import save_prune_outputs
from sparsecircuits.circuits.schema import CIRCUIT_FILE, CircuitDoc, load_circuit
from sparsecircuits.errors import CheckpointError
from sparsecircuits.fileio import atomic_write_json

log = logging.getLogger(__name__)


def compare_models(
    sparse: str,
    dense: str,
    tasks: Sequence[str],
    cfg: PruneConfig,
    *,
    device: str | torch.device = "cpu",
    out: Path | None = None,
) -> dict[str, Any]:
    """Prune each task on both models with ``cfg``. ``ratio`` per task = dense weight edges /
    sparse weight edges; ``geomean_ratio`` is over tasks where both circuits reach the target
    (edges = nonzero weights between kept nodes, the paper's count; residual links are
    reported separately in ``geomean_ratio_all_edges``). A count of 0 is taken as 1 so that
    every ratio and its logarithm stay defined.

    With ``out``, each circuit is written to ``out/{sparse,dense}/TASK/`` as it is found, and a
    rerun reuses those whose model weights and prune settings match: a killed comparison
    resumes where it stopped."""
    models = {"sparse": load_for_circuits(sparse, device=device)}
    models["dense"] = load_for_circuits(dense, device=device)
    rows: dict[str, dict[str, Any]] = {}
    for task in tasks:
        row: dict[str, Any] = {}
        for kind, lm in models.items():
            directory = Path(out) / kind / task if out is not None else None
            doc = _reusable(directory, lm.hash, task, cfg) if directory is not None else None
            if doc is None:
                doc, result, trials = find_circuit(lm, task, cfg)
                if directory is not None:
                    save_prune_outputs(directory, doc, result, trials)
            row[kind] = {
                "n_nodes": doc.n_nodes,
                "n_edges": doc.n_edges,
                "n_weight_edges": doc.n_weight_edges,
                "loss": doc.loss.circuit,
                "loss_test": doc.loss.circuit_test,
                "loss_full": doc.loss.full,
                "reached": doc.reached,
            }
            log.info("%s on %s: %d weight edges", task, kind, doc.n_weight_edges)
        both = row["sparse"]["reached"] and row["dense"]["reached"]
        row["ratio"] = (
            max(1, row["dense"]["n_weight_edges"]) / max(1, row["sparse"]["n_weight_edges"])
            if both
            else None
        )
        rows[task] = row
    compared = [t for t, r in rows.items() if r["ratio"] is not None]
    result = {
        "sparse": sparse,
        "dense": dense,
        "target_loss": cfg.target_loss,
        "prune_config": cfg.model_dump(mode="json"),
        "tasks": rows,
        "compared_tasks": compared,
        "geomean_ratio": geometric_mean([rows[t]["ratio"] for t in compared]) if compared else None,
        "geomean_ratio_all_edges": (
            geometric_mean(
                [
                    max(1, rows[t]["dense"]["n_edges"]) / max(1, rows[t]["sparse"]["n_edges"])
                    for t in compared
                ]
            )
            if compared
            else None
        ),
    }
    if out is not None:
        atomic_write_json(Path(out) / "compare.json", result)
    return result


def _reusable(directory: Path, model_hash: str, task: str, cfg: PruneConfig) -> CircuitDoc | None:
    """The circuit saved in ``directory`` by an earlier run with the same model and settings."""
    if not (directory / CIRCUIT_FILE).is_file():
        return None
    try:
        doc = load_circuit(directory)
    except CheckpointError as err:
        log.warning("not reusing %s: %s", directory, err)
        return None
    same = (
        doc.model.weights_hash == model_hash
        and doc.task == task
        and doc.prune_config == cfg.model_dump(mode="json")
    )
    if same:
        log.info("reusing %s", directory / CIRCUIT_FILE)
    return doc if same else None


def print_comparison(result: dict[str, Any]) -> None:
    """A table of per-task circuit sizes and the geometric-mean ratio."""
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"circuit size at target {result['target_loss']} (loss per prompt): "
        f"{result['sparse']} vs {result['dense']}"
    )
    for col in ("task", "sparse nodes", "sparse edges", "dense nodes", "dense edges", "ratio"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for name, r in result["tasks"].items():
        s, d = r["sparse"], r["dense"]

        def cell(x: dict[str, Any], key: str) -> str:
            return f"{x[key]:,}" + ("" if x["reached"] else " (missed)")

        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        t.add_row(name, cell(s, "n_nodes"), cell(s, "n_weight_edges"), cell(d, "n_nodes"),
                  cell(d, "n_weight_edges"), ratio)  # fmt: skip
    console = Console()
    console.print(t)
    g = result["geomean_ratio"]
    n = len(result["compared_tasks"])
    console.print(
        "geometric-mean ratio (dense / sparse weight edges) over "
        f"{n} task(s) where both reach the target: " + ("-" if g is None else f"{g:.1f}x")
    )
