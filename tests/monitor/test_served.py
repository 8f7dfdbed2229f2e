"""The server with real circuit telemetry: the CLI's factory from a catalogue, its baseline and
a policy, behind the app. A request's operator record names the monitored families with
per-token scores; the user's response carries the decision and nothing numeric."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from sparsecircuits.errors import CheckpointError, ConfigError
from sparsecircuits.interop.download import file_sha256
from sparsecircuits.monitor.calibrate import calibrate, save_baseline
from sparsecircuits.monitor.catalog import CATALOG_FILE
from sparsecircuits.serve.app import create_app
from sparsecircuits.serve.launch import monitor_factory


@pytest.fixture(scope="module")
def served(planted, catalog, catalog_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    sha = file_sha256(catalog_dir / CATALOG_FILE)
    save_baseline(calibrate(planted.model, planted.tokenizer, catalog, catalog_sha256=sha,
                            windows=3), d / "baseline.json")  # fmt: skip
    family = catalog.monitored()[0]
    policy = d / "policy.yaml"
    # the lowest threshold on every token: the rule fires as soon as engagement tops the median
    policy.write_text(
        f"version: 1\nrules:\n  - family: {family}\n    action: log\n    z: 0.000001\n"
        "    k: 1\n    n: 1\n"
    )
    factory = monitor_factory(planted.model, catalog=catalog_dir, policy=policy,
                               baseline=d / "baseline.json")  # fmt: skip
    app = create_app(planted.model, planted.tokenizer, factory=factory, model_name="planted")
    with TestClient(app) as client:
        yield client, family, file_sha256(policy)


def test_a_request_gets_the_policy_decision_and_the_operator_its_scores(served):
    client, family, policy_sha = served
    r = client.post("/v1/completions", json={"prompt": 'x = "ab', "max_tokens": 4,
                                             "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    decision = body["choices"][0]["decision"]
    assert decision["policy_sha256"] == policy_sha
    assert decision["action"] == "log", decision  # z ~ 0 on one token: it fires
    assert decision["family"] == family
    record = client.get(f"/v1/telemetry/{body['id']}").json()
    assert family in json.dumps(record)
    health = client.get("/healthz").json()
    assert health["monitor"]["policy_sha256"] == policy_sha


def test_mismatched_files_are_refused(planted, catalog_dir, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - family: no-such-family\n    action: log\n")
    with pytest.raises((ConfigError, CheckpointError)):
        monitor_factory(planted.model, catalog=catalog_dir, policy=policy, baseline=None)
