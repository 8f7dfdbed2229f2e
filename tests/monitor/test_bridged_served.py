"""Bridged monitoring behind the server and the CLI: ``monitor calibrate --bridge`` writes a
bridged baseline beside the bridges, ``build_app`` from a config with ``bridge`` serves on a
loopback socket (uvicorn in a thread, every wait bounded) with the bridge's site and fidelity in
the decision and the operator's record, and ``serve`` refuses incomplete options in one line."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from sparsecircuits.cli import app as cli_app
from sparsecircuits.errors import InputError
from sparsecircuits.serve.launch import ServeConfig, build_app
from tests.monitor.test_bridged import identity, write_bridges


@pytest.fixture(scope="module")
def bridge_dir(planted, catalog_dir, tmp_path_factory):
    """Identity bridges and their fidelity, with a baseline made by the CLI."""
    d = tmp_path_factory.mktemp("cli-bridges")
    write_bridges(d, identity(planted), planted)
    res = CliRunner().invoke(cli_app, ["monitor", "calibrate", "--catalog", str(catalog_dir),
                                       "--bridge", str(d), "--dense", str(planted.directory),
                                       "--windows", "2", "--device", "cpu"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return d


def test_calibrate_with_bridge_writes_a_bound_baseline_beside_the_bridges(bridge_dir, planted,
                                                                          catalog_dir):  # fmt: skip
    base = json.loads((bridge_dir / "baseline.json").read_text())
    assert base["bridge"]["sites"] == {"quotes": "0.resid_in"}
    assert base["bridge"]["dense_weights_hash"] == planted.hash
    assert not (catalog_dir / "baseline.json").exists()  # not where the sparse model's goes
    res = CliRunner().invoke(cli_app, ["monitor", "calibrate", "--catalog", str(catalog_dir),
                                       "--bridge", str(bridge_dir)])  # fmt: skip
    assert isinstance(res.exception, InputError) and "go together" in str(res.exception)


def test_serve_refuses_bridge_options_without_a_catalogue_in_one_line(bridge_dir):
    run = CliRunner().invoke
    res = run(cli_app, ["serve", "--bridge", str(bridge_dir), "--device", "cpu"])
    assert isinstance(res.exception, InputError) and "--catalog and --policy" in str(res.exception)
    res = run(cli_app, ["serve", "--companion", "x", "--catalog", "c", "--policy", "p"])
    assert isinstance(res.exception, InputError) and "needs --bridge" in str(res.exception)


def _wait_healthy(base: str, timeout: float) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            r = httpx.get(f"{base}/healthz", timeout=1)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no answer from {base} within {timeout} s")


def test_a_bridged_server_on_loopback(planted, catalog_dir, bridge_dir, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - {family: quotes, action: block, z: 10, k: 1, "
                      "n: 1}\n")  # fmt: skip
    pdir = str(planted.directory)
    cfg = ServeConfig(model_dir=pdir, model_name="dense", catalog=str(catalog_dir),
                      policy=str(policy), bridge=str(bridge_dir), companion_dir=pdir)  # fmt: skip
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(cfg), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        health = _wait_healthy(base, timeout=20)
        assert health["monitor"]["monitoring"] == "bridged"
        assert health["monitor"]["bridge"]["companion"] == planted.directory.name
        body = {"prompt": "x = 'abc", "max_tokens": 3, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=20)
        assert r.status_code == 200, r.text
        out = r.json()
        decision = out["choices"][0]["decision"]
        assert decision["action"] == "block" and decision["bridge"]["site"] == "0.resid_in"
        assert out["choices"][0]["finish_reason"] == "content_filter"
        record = httpx.get(f"{base}/v1/telemetry/{out['id']}", timeout=10).json()
        fam = json.dumps(record)
        assert '"mode": "bridged"' in fam and '"enc_nmse": 0.01' in fam
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive()
