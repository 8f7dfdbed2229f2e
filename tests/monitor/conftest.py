"""Fixtures of the monitor tests: the planted-circuit model, a second task with the same
templates (so one family can hold an admitted and a rejected circuit), and a catalogue built
from hand-made circuit files (no pruning: the tests stay fast and the verdicts are known)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsecircuits import tasks
from sparsecircuits.circuits import testing as T
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.pipeline import LoadedModel, load_for_circuits
from sparsecircuits.circuits.prune import PruneConfig
from sparsecircuits.circuits.schema import save_circuit
from sparsecircuits.monitor.catalog import CatalogDoc, build_catalog
from sparsecircuits.monitor.families import load_families

TASK_B = "planted_quote_b"  # planted_quote under another name
CFG = PruneConfig(frozen_norms=True)  # as tests/circuits/test_planted.py
FAMILIES_YAML = f"""\
version: 1
families:
  quotes:
    description: the planted quote circuit, and a decoy of it
    tasks: [{T.TASK}, {TASK_B}]
  decoys:
    tasks: [{TASK_B}]
"""


@pytest.fixture(scope="package", autouse=True)
def _planted_tasks(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSECIRCUITS_CACHE", str(tmp_path_factory.mktemp("cache")))
        T.register_planted_task()
        base = T.planted_task()
        tasks.register(type(base)(name=TASK_B, description=base.description,
                                  train=base.train, test=base.test))  # fmt: skip
        yield
        tasks.unregister(TASK_B)
        T.unregister_planted_task()


@pytest.fixture(scope="package")
def planted(tmp_path_factory) -> LoadedModel:
    return load_for_circuits(str(T.save_planted_model(tmp_path_factory.mktemp("planted"))))


@pytest.fixture(scope="package")
def families_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fam") / "families.yaml"
    path.write_text(FAMILIES_YAML)
    return path


@pytest.fixture(scope="package")
def circuit_dirs(tmp_path_factory, planted: LoadedModel) -> dict[str, Path]:
    """The planted circuit of planted_quote (passes both admission checks), and the decoy node
    set as a circuit of planted_quote_b with a 10-nat target: sufficient by that target, but
    ablating it leaves the model's answer intact, so necessity FAILs."""
    space = NodeSpace(planted.model.config)
    root = tmp_path_factory.mktemp("circuits")
    good = T.circuit_for_nodes(planted, T.TASK, T.planted_flat(space), CFG)
    decoy = T.circuit_for_nodes(
        planted, TASK_B, T.planted_flat(space, T.DECOYS), CFG.replace(target_loss=10.0)
    )
    out = {}
    for task, doc in ((T.TASK, good), (TASK_B, decoy)):
        out[task] = root / task
        save_circuit(doc, out[task])
    return out


@pytest.fixture(scope="package")
def catalog_dir(tmp_path_factory, planted, families_file, circuit_dirs) -> Path:
    out = tmp_path_factory.mktemp("catalog")
    build_catalog(planted, families=load_families(families_file), out=out, reuse=circuit_dirs,
                  scale_windows=4)  # fmt: skip
    return out


@pytest.fixture(scope="package")
def catalog(catalog_dir: Path) -> CatalogDoc:
    from sparsecircuits.monitor.catalog import load_catalog

    return load_catalog(catalog_dir)
