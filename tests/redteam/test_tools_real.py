"""The adapters under the real tools: promptfoo's CLI evaluating our provider, and PyRIT's own
scoring API running our scorer. Each tool lives in a cached environment (tool_envs.py) created
on first use; without one (no network, a resolver conflict) the test skips with the reason.

Nothing leaves this machine: promptfoo's usage telemetry, update check and sharing are off, its
config, cache and logs go to a temporary directory, and both tools run with HOME there and
every HTTP(S) proxy set to a closed loopback port. (promptfoo 0.121.20 still posts one "telemetry
disabled" event with telemetry off; the dead proxy is what stops it.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.redteam.tool_envs import (
    PROMPTFOO_VERSION,
    PYRIT_VERSION,
    REPO,
    creation_info,
    promptfoo_entrypoint,
    pyrit_python,
)

pytestmark = pytest.mark.slow

FLAGGING = 'name = "hello"; os.system("rm -rf /") #"'
BENIGN = "def add(a, b):\n    return a + b\n"
PROVIDER = REPO / "src" / "sparsecircuits" / "redteam" / "adapters" / "promptfoo_provider.py"
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a request fails at once
RUN_TIMEOUT_S = 600  # a cold start loads torch and the model in a fresh worker


def _sealed_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment a tool runs in: HOME in ``tmp``, no route out but loopback."""
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env[var] = DEAD_PROXY
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", HOME=str(home))
    env.pop("XDG_DATA_HOME", None)  # PyRIT's data dir follows HOME then
    env.update(extra)
    return env


def test_promptfoo_eval_runs_our_provider_and_keeps_its_metadata(tmp_path: Path) -> None:
    entry = promptfoo_entrypoint()
    info = creation_info("promptfoo", PROMPTFOO_VERSION)
    print(f"promptfoo {PROMPTFOO_VERSION} env: created in {info['seconds']} s")
    flagged = "context.metadata && context.metadata.circuit_flagged === {}"
    config = {
        "description": "sparsecircuits circuit telemetry",
        "prompts": ["{{code}}"],
        "providers": [{"id": f"file://{PROVIDER}", "label": "sparsecircuits",
                       "config": {"model": "stdlib-sparse", "max_tokens": 8}}],
        "tests": [
            {"vars": {"code": FLAGGING},
             "assert": [{"type": "javascript", "value": flagged.format("true")}]},
            {"vars": {"code": BENIGN},
             "assert": [{"type": "javascript", "value": flagged.format("false")}]},
        ],
    }  # fmt: skip
    cfg = tmp_path / "promptfooconfig.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out.json"
    pf = tmp_path / "promptfoo"
    env = _sealed_env(
        tmp_path,
        PROMPTFOO_PYTHON=sys.executable,  # our interpreter: sparsecircuits imports there
        PROMPTFOO_PYTHON_WORKERS="1",
        PROMPTFOO_CONFIG_DIR=str(pf / "config"),
        PROMPTFOO_CACHE_PATH=str(pf / "cache"),
        PROMPTFOO_LOG_DIR=str(pf / "logs"),
        PROMPTFOO_DISABLE_TELEMETRY="1",
        PROMPTFOO_DISABLE_UPDATE="1",
        PROMPTFOO_DISABLE_SHARING="1",
        PROMPTFOO_DISABLE_REMOTE_GENERATION="1",
    )
    cmd = ["node", str(entry), "eval", "-c", str(cfg), "--no-cache", "--no-share", "--no-write",
           "--no-table", "--no-progress-bar", "-j", "1", "-o", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    report = json.loads(out.read_text())
    rows = {r["vars"]["code"]: r for r in report["results"]["results"]}
    assert set(rows) == {FLAGGING, BENIGN}
    for code, want in ((FLAGGING, True), (BENIGN, False)):
        row = rows[code]
        assert not row.get("error"), row["error"]
        meta = row["response"]["metadata"]
        assert meta["circuit_flagged"] is want
        assert meta["circuit_action"] == ("log" if want else "allow")
        assert set(meta["circuit_max_z_by_family"]) == {"string-literal", "brackets",
                                                        "control-flow"}  # fmt: skip
        assert row["response"]["tokenUsage"]["completion"] == 8
        assert row["success"] is True  # the JavaScript assertion read our metadata
    assert rows[FLAGGING]["response"]["metadata"]["circuit_rules_fired"] == {
        "string-literal-log": [-1]
    }
    assert rows[BENIGN]["response"]["metadata"]["circuit_rules_fired"] == {}
    assert not report.get("shareableUrl")
    assert not (tmp_path / "home" / ".promptfoo").exists()  # config went to the temp dir


PYRIT_SCRIPT = r"""
import asyncio, json, sys
from pyrit.memory import CentralMemory
from pyrit.models import Message, MessagePiece
from pyrit.setup import IN_MEMORY, initialize_pyrit_async
from sparsecircuits.redteam.adapters.pyrit_scorer import CircuitTelemetryScorer

FLAGGING, BENIGN = sys.argv[1], sys.argv[2]


def row(score):
    return {"value": score.get_value(), "type": score.score_type, "id": str(score.id),
            "metadata": score.score_metadata, "rationale": score.score_rationale,
            "category": score.score_category}


async def main():
    await initialize_pyrit_async(memory_db_type=IN_MEMORY, load_defaults=False, silent=True)
    scorer = CircuitTelemetryScorer()
    out = {"scorer_type": scorer.scorer_type}
    out["text"] = {name: [row(s) for s in await scorer.score_text_async(text)]
                   for name, text in (("flagging", FLAGGING), ("benign", BENIGN))}
    reply = Message(message_pieces=[MessagePiece(role="assistant", original_value=FLAGGING)])
    out["message"] = [row(s) for s in await scorer.score_message_async(message=reply)]
    ids = [r["id"] for rows in out["text"].values() for r in rows]
    stored = CentralMemory.get_memory_instance().get_scores(score_ids=ids)
    out["stored"] = {str(s.id): s.score_metadata for s in stored}
    one = CircuitTelemetryScorer(family="brackets")
    out["brackets"] = [row(s) for s in await one.score_text_async(FLAGGING)]
    try:
        CircuitTelemetryScorer(family="nope")
        out["unknown_family"] = None
    except Exception as err:
        out["unknown_family"] = f"{type(err).__name__}: {err}"
    print("RESULT " + json.dumps(out))


asyncio.run(main())
"""


def test_pyrit_scores_through_its_own_api_with_our_scorer(tmp_path: Path) -> None:
    python = pyrit_python()
    info = creation_info("pyrit", PYRIT_VERSION)
    print(f"PyRIT {PYRIT_VERSION} env: created in {info['seconds']} s")
    env = _sealed_env(tmp_path, PYTHONPATH=str(REPO / "src"))  # the code under test, not a copy
    res = subprocess.run([str(python), "-c", PYRIT_SCRIPT, FLAGGING, BENIGN], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=RUN_TIMEOUT_S)  # fmt: skip
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, (res.stdout + res.stderr)[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["scorer_type"] == "true_false"
    [flag], [benign] = out["text"]["flagging"], out["text"]["benign"]
    assert flag["value"] is True and benign["value"] is False
    assert flag["type"] == benign["type"] == "true_false"
    assert flag["metadata"]["circuit_flagged"] == 1 and benign["metadata"]["circuit_flagged"] == 0
    assert json.loads(flag["metadata"]["circuit_rules_fired"]) == {"string-literal-log": [-1]}
    assert flag["metadata"]["circuit_action"] == "log"
    assert flag["metadata"]["circuit_max_z"] > 4.0
    assert "string-literal-log" in flag["rationale"] and flag["category"] == ["circuit-telemetry"]
    assert [m["value"] for m in out["message"]] == [True]
    # PyRIT persisted both scores in its memory, metadata intact
    assert out["stored"] == {r["id"]: r["metadata"] for r in (flag, benign)}
    assert [b["value"] for b in out["brackets"]] == [False]  # one family looked at
    assert out["unknown_family"] == (
        "InputError: family 'nope': not monitored here "
        "(monitored: brackets, control-flow, string-literal)"
    )


def test_npm_tool_env_is_atomic_and_swept(tmp_path: Path, monkeypatch) -> None:
    """Offline, on a local package: a failed install leaves only the lock; a killed creation's
    temp dir, or an entry without its ready mark, is swept; the result moves intact."""
    from tests.redteam import tool_envs

    if not (shutil.which("npm") and shutil.which("node")):
        pytest.skip("needs node and npm on PATH")
    root = tmp_path / "envs"
    monkeypatch.setattr(tool_envs, "CACHE_ROOT", root)
    with pytest.raises(tool_envs.ToolEnvError, match=r"^npm install .* failed: npm error") as e:
        tool_envs.npm_tool_env("t", "1", [str(tmp_path / "missing.tgz")])
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == [".t-1.lock"]
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "package.json").write_text('{"name": "sc-probe", "version": "1.0.0"}')
    (pkg / "index.js").write_text("module.exports = 42;\n")
    # a tarball installs as a copy (a directory would be a symlink, moving with no checks)
    subprocess.run(["npm", "pack", "--pack-destination", str(tmp_path), "--cache",
                    str(tmp_path / "npm-cache")], cwd=pkg, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    tgz = str(tmp_path / "sc-probe-1.0.0.tgz")
    (root / ".t-1.tmp-killed").mkdir()  # as a killed creation leaves it
    (root / "t-1").mkdir()  # an entry without the ready mark
    prefix = tool_envs.npm_tool_env("t", "1", [tgz], then=lambda p: [])
    assert prefix == root / "t-1"
    assert sorted(p.name for p in root.iterdir()) == [".t-1.lock", "t-1"]
    probe = subprocess.run(["node", "-p", "require('sc-probe')"], cwd=prefix, text=True,
                           capture_output=True, timeout=60)  # fmt: skip
    assert probe.stdout.strip() == "42", probe.stderr
    assert not (prefix / ".npm-cache").exists()
    assert not (prefix / "node_modules" / "sc-probe").is_symlink()
    assert tool_envs.creation_info("t", "1")["packages"] == [tgz]
