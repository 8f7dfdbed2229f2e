"""The server on a real loopback socket: uvicorn in a thread, and ``sparsecircuits serve`` as a
process. Every wait is bounded."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from sparsecircuits.cli import app as cli_app
from sparsecircuits.errors import InputError
from sparsecircuits.model.io import save_model
from sparsecircuits.serve.app import create_app

SECRET = "zebra_secret = 1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(base: str, *, timeout: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"no answer from {base} within {timeout} s")


def test_uvicorn_on_loopback(model, tokenizer):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(model, tokenizer), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, timeout=10)
        body = {"prompt": "def f():\n", "max_tokens": 4, "seed": 5}
        whole = httpx.post(f"{base}/v1/completions", json=body, timeout=10).json()
        with httpx.stream(
            "POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=10
        ) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        rec = httpx.get(f"{base}/v1/telemetry/{whole['id']}", timeout=5).json()
        assert rec["decision"]["action"] == "allow"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive()


def test_cli_refuses_a_catalog_without_a_policy():
    res = CliRunner().invoke(cli_app, ["serve", "--catalog", "cat", "--device", "cpu"])
    assert isinstance(res.exception, InputError)
    assert "--catalog and --policy go together" in str(res.exception)


@pytest.mark.slow
def test_sparsecircuits_serve_process(tmp_path: Path, model, tokenizer):
    """``sparsecircuits serve DIR`` binds 127.0.0.1, answers a completion, stops on SIGTERM."""
    save_model(model, tmp_path)
    tokenizer.save(tmp_path)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsecircuits.cli", "serve", str(tmp_path), "--port", str(port),
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, timeout=90, proc=proc)
        r = httpx.post(
            f"{base}/v1/completions", json={"prompt": SECRET, "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 200 and r.json()["model"] == tmp_path.name
        bad = httpx.post(f"{base}/v1/completions", json={"prompt": 1}, timeout=30)
        assert bad.status_code == 400 and "prompt" in bad.json()["error"]["message"]
    finally:
        proc.terminate()  # the server this test started, by its own handle
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=10)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert proc.returncode in (0, -15) and "Application shutdown complete" in err, err
    assert "completion_tokens=3" in err and SECRET not in err  # ids and counts, no prompt


def test_cli_refuses_to_expose_operator_routes_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSECIRCUITS_OPERATOR_KEY", raising=False)
    res = CliRunner().invoke(cli_app, ["serve", "--host", "0.0.0.0", "--device", "cpu"])
    assert isinstance(res.exception, InputError) and "operator" in str(res.exception)
    short = tmp_path / "key"
    short.write_text("abc")
    res = CliRunner().invoke(cli_app, ["serve", "--operator-key-file", str(short)])
    assert isinstance(res.exception, InputError) and "16 characters" in str(res.exception)
