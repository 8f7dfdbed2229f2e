"""Writing a pruning run's outputs: ``circuit.json``, ``masks.safetensors``, ``search.json``."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from sparsecircuits.circuits.prune import PruneResult
from sparsecircuits.circuits.schema import CircuitDoc, save_circuit
from sparsecircuits.circuits.search import Trial
from sparsecircuits.fileio import atomic_write, atomic_write_json

MASKS_FILE = "masks.safetensors"  # tau (total,) and the node order, for later analysis
SEARCH_FILE = "search.json"


def save_prune_outputs(
    directory: str | Path, doc: CircuitDoc, result: PruneResult, trials: list[Trial]
) -> Path:
    """Write everything a pruning run produced into ``directory``; returns the circuit path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"tau": result.tau.contiguous(), "order": result.order.contiguous()}
    atomic_write(directory / MASKS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(
        directory / SEARCH_FILE,
        {
            "trials": [
                {
                    "config": t.config.model_dump(mode="json"),
                    "n_nodes": t.n_nodes,
                    "loss": t.loss,
                    "reached": t.reached,
                    "seconds": t.seconds,
                }
                for t in trials
            ]
        },
    )
    if doc.edges_file is not None and result.edges is not None:
        e = result.edges
        arrays = {"src": e.src, "dst": e.dst, "kind": e.kind, "weight": e.weight}
        arrays = {k: v.contiguous() for k, v in arrays.items()}
        atomic_write(directory / doc.edges_file, lambda tmp: save_file(arrays, tmp))
    return save_circuit(doc, directory)
