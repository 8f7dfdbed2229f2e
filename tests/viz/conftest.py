"""Shared fixtures for the viz tests: a circuit pruned on the tiny circuit-test model, saved
with its ``analysis.json`` (4 pretraining windows). Treat ``viz_circuit_dir`` as read-only; copy
it (``copy_circuit``) before writing into it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sparsecircuits.circuits import pipeline
from sparsecircuits.circuits.prune import PruneConfig
from sparsecircuits.circuits.report import save_prune_outputs
from sparsecircuits.viz.analysis import analyze
from tests.circuits.conftest import circuit_model_dir, circuit_tokenizer  # noqa: F401

VIZ_WINDOWS = 4
# An unreachable target keeps every node: the circuit covers every node location.
VIZ_PRUNE = PruneConfig(
    steps=3, n_train_pairs=8, n_test_pairs=8, batch_pairs=4, ablation="zero", target_loss=1e-6
)


@pytest.fixture(scope="session")
def viz_lm(circuit_model_dir) -> pipeline.LoadedModel:  # noqa: F811
    return pipeline.load_for_circuits(str(circuit_model_dir))


@pytest.fixture(scope="session")
def viz_circuit_dir(viz_lm, tmp_path_factory) -> Path:
    """circuit.json, masks.safetensors and analysis.json of a single_double_quote circuit.

    ``SPARSECIRCUITS_VIZ_CIRCUIT=DIR`` uses an existing analysed circuit instead (to time the
    dashboard on a real one, e.g. the demo's ``runs/demo/single_double_quote``)."""
    if os.environ.get("SPARSECIRCUITS_VIZ_CIRCUIT"):
        return Path(os.environ["SPARSECIRCUITS_VIZ_CIRCUIT"]).resolve()
    out = tmp_path_factory.mktemp("viz_circuit")
    doc, result, trials = pipeline.find_circuit(viz_lm, "single_double_quote", VIZ_PRUNE)
    save_prune_outputs(out, doc, result, trials)
    analyze(out, n_windows=VIZ_WINDOWS)
    return out


@pytest.fixture
def copy_circuit(viz_circuit_dir, tmp_path):
    """A function returning a fresh writable copy of the circuit directory."""

    def make(*, with_analysis: bool = True) -> Path:
        dest = tmp_path / f"circuit{len(list(tmp_path.iterdir()))}"
        shutil.copytree(viz_circuit_dir, dest)
        if not with_analysis:
            (dest / "analysis.json").unlink()
        return dest

    return make
