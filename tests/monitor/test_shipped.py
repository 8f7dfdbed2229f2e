"""The catalogue, baseline and log-only policy shipped with stdlib-sparse load together, pin
that model, and serve a request (``sparsecircuits serve --catalog shipped``)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from sparsecircuits.cli.serve import MONITOR_DIR
from sparsecircuits.data import Tokenizer
from sparsecircuits.interop.download import file_sha256
from sparsecircuits.model.io import load_model, resolve_model_dir
from sparsecircuits.serve.app import create_app
from sparsecircuits.serve.launch import monitor_factory


@pytest.fixture(scope="module")
def shipped():
    mdir = resolve_model_dir("stdlib-sparse")
    return load_model(mdir), Tokenizer.load(mdir), mdir / MONITOR_DIR


def test_the_shipped_catalogue_serves_with_its_baseline_and_policy(shipped):
    model, tok, cat = shipped
    base = json.loads((cat / "baseline.json").read_text())
    assert base["catalog_sha256"] == file_sha256(cat / "catalog.json")
    factory = monitor_factory(model, catalog=cat, policy=cat / "policy.yaml", baseline=None)
    assert factory.describe()["families"] == ["string-literal", "brackets", "control-flow"]
    for family in json.loads((cat / "catalog.json").read_text())["families"].values():
        for task in family["admitted"]:  # the admitted circuits ship for the dashboard's links
            assert (cat / "circuits" / task / "circuit.json").is_file()
    app = create_app(model, tok, factory=factory, model_name="stdlib-sparse")
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": 'x = "a', "max_tokens": 3,
                                            "temperature": 0})  # fmt: skip
        assert r.status_code == 200
        assert r.json()["choices"][0]["decision"]["action"] in ("allow", "log")
        record = c.get(f"/v1/telemetry/{r.json()['id']}").json()
        assert "string-literal" in json.dumps(record)  # the operator sees the family scores
