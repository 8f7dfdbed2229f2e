"""Our garak integration against the real garak, run in its own environment (tool_envs.py):
garak's report digest reads the reports we write (and rejects broken ones), and our detector,
installed into that garak, scores outputs with a running server's circuit telemetry, alone and
in a whole ``garak`` run. Every server and request here is on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import pytest

from sparsecircuits.errors import InputError
from sparsecircuits.redteam import telemetry
from sparsecircuits.redteam.adapters import (
    GARAK_DETECTOR,
    GARAK_DETECTOR_SOURCE,
    install_garak_detector,
)
from sparsecircuits.redteam.report import GARAK_FORMAT_VERSION, TAXONOMY, read_report, write_reports
from tests.redteam import tool_envs
from tests.redteam.test_report import ATTEMPTS, FINISHED, _run

MONITOR = (
    Path(__file__).resolve().parents[2] / "src/sparsecircuits/pretrained/stdlib-sparse/monitor"
)
FLAGS = 'name = "hello"; os.system("rm -rf /") #'  # flags string-literal on stdlib-sparse
BENIGN = "def add(a, b):\n    return a + b\n"
GROUP = "security:S0403"  # the digest's group for our probe's avid-effect tag
READY_S, STOP_S, GARAK_S = 180, 30, 300  # bounds on every wait


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def garak(tmp_path_factory) -> dict:
    """garak's python and an environment for it: its own XDG dirs (its plugin cache and logs
    stay out of ~), no hub downloads."""
    python = tool_envs.garak_python()  # skips, naming the cause, without an env
    home = tmp_path_factory.mktemp("garak-home")
    env = {**os.environ, "XDG_CACHE_HOME": str(home / "cache"), "XDG_DATA_HOME": str(home / "data"),
           "XDG_CONFIG_HOME": str(home / "config"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}  # fmt: skip
    return {"python": python, "env": env}


def _digest(garak: dict, report: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    """garak's own ``report_digest`` on a copy of ``report``: its answer, and the digest it
    appended (None when it wrote none)."""
    copy = report.with_name(report.stem + ".digested.jsonl")
    copy.write_bytes(report.read_bytes())
    cmd = [str(garak["python"]), "-m", "garak.analyze.report_digest", "-r", str(copy), "-w",
           "-o", str(copy.with_suffix(".html"))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=garak["env"], timeout=GARAK_S)
    last = json.loads(copy.read_text(encoding="utf-8").splitlines()[-1])
    return proc, last if last.get("entry_type") == "digest" else None


def _check_digest(digest: dict | None, report: Path) -> None:
    """The digest shows our probe, every detector of our evals with their counts and hit@k, and
    the probe summary's counts."""
    assert digest is not None, "garak wrote no digest"
    records = read_report(report)
    evals = [r for r in records if r["entry_type"] == "eval"]
    summary = next(r for r in records if r["entry_type"] == "probe_summary")
    assert evals, "the report has no eval"
    assert digest["meta"]["garak_version"] == GARAK_FORMAT_VERSION
    probe = digest["eval"][GROUP][evals[0]["probe"]]
    assert probe["_summary"]["probe_counts"]["inference_counts"] == summary["inference_counts"]
    for e in evals:
        got = probe[e["detector"]]
        assert (got["total_evaluated"], got["passed"]) == (e["total_evaluated"], e["passed"])
        assert got["hit_at_k"] == e["hit_at_k"]


# ---------------------------------------------------------------------------- the report
@pytest.mark.slow
def test_garak_digest_reads_our_report(garak, tmp_path):
    paths = write_reports(tmp_path, _run(), ATTEMPTS, finished=FINISHED)
    proc, digest = _digest(garak, paths["report"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_digest(digest, paths["report"])
    assert digest["meta"]["setup"]["reporting.taxonomy"] == TAXONOMY
    detectors = set(digest["eval"][GROUP]["sparsecircuits.scan"]) - {"_summary"}
    assert detectors == {"sparsecircuits.objective", "sparsecircuits.circuit_string_literal",
                         "sparsecircuits.dense_probe"}  # fmt: skip


@pytest.mark.slow
def test_garak_digest_reads_a_real_scan(garak, tmp_path):
    from sparsecircuits.model.io import resolve_model_dir
    from sparsecircuits.redteam.scan import load_monitor, scan, write_scan

    mdir = resolve_model_dir("stdlib-sparse")
    mon = load_monitor(mdir, MONITOR, policy=MONITOR / "policy.yaml")
    searcher, res = scan(mon, family="string-literal", objective="engage", mode="random",
                         budget=32, seed=0, batch=16)  # fmt: skip
    run = {"family": "string-literal", "objective": "engage", "mode": "random", "budget": 32,
           "seed": 0, "model": mdir.name, "hashes": mon.hashes,
           "started": "2026-01-01T00:00:00+00:00", "version": "0.1.0"}  # fmt: skip
    write_scan(tmp_path, searcher, res, run=run)
    proc, digest = _digest(garak, tmp_path / "report.jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_digest(digest, tmp_path / "report.jsonl")
    assert "sparsecircuits.circuit_string_literal" in digest["eval"][GROUP]["sparsecircuits.scan"]


def _drop_probe_tier(records):
    for r in records:
        if r["entry_type"] == "plugin_cache":
            for meta in r["plugin_cache"]["probes"].values():
                del meta["tier"]
    return records


def _drop_eval_passed(records):
    for r in records:
        if r["entry_type"] == "eval":
            del r["passed"]
    return records


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corrupt", "rejected"),
    [
        (_drop_probe_tier, True),  # the digest's required probe metadata
        (lambda rs: [r for r in rs if r["entry_type"] != "plugin_cache"], True),
        (lambda rs: [r for r in rs if r["entry_type"] != "init"], True),
        (_drop_eval_passed, True),
        (lambda rs: [r for r in rs if r["entry_type"] != "eval"], False),  # digests to nothing
    ],
    ids=["probe-tier", "plugin-cache", "init", "eval-passed", "no-evals"],
)
def test_garak_digest_rejects_a_corrupt_report(garak, tmp_path, corrupt, rejected):
    paths = write_reports(tmp_path, _run(), ATTEMPTS, finished=FINISHED)
    records = corrupt(read_report(paths["report"]))
    paths["report"].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    proc, digest = _digest(garak, paths["report"])
    if rejected:  # garak's tool refuses it
        assert proc.returncode != 0 and digest is None, proc.stderr[-2000:]
    else:  # garak digests it, but our check notices that the attempts are missing
        assert proc.returncode == 0, proc.stderr[-2000:]
        with pytest.raises(AssertionError, match="no eval"):
            _check_digest(digest, paths["report"])


# ---------------------------------------------------------------------------- the detector
def _stub_garak(monkeypatch) -> types.ModuleType:
    """The detector module, imported here against a stand-in garak (only its base class)."""
    base = types.ModuleType("garak.detectors.base")
    base.Detector = type("Detector", (), {"__init__": lambda self, config_root=None: None})
    config = types.ModuleType("garak._config")
    root = types.ModuleType("garak")
    root._config = config
    for name, mod in [("garak", root), ("garak._config", config),
                      ("garak.detectors", types.ModuleType("garak.detectors")),
                      ("garak.detectors.base", base)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location(
        "garak_detector_under_test", GARAK_DETECTOR_SOURCE
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fam(**flags) -> dict:
    return {"max_z": 5.0, "flags": flags}


RECORDS = [
    {"families": {"string-literal": _fam(**{"sl-log": [-1]}), "brackets": _fam(b=[])}},
    {"families": {"string-literal": _fam(**{"sl-log": []}), "brackets": _fam(b=[3, 4])}},
    {"families": {"string-literal": {"max_z": None, "flags": None}}},
    {"families": {"string-literal": _fam()}},
]


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("family", [None, "string-literal", "brackets"])
def test_detector_verdict_is_telemetry_verdict(monkeypatch, record, family):
    """The detector reimplements telemetry.verdict (garak's env cannot import ours): same score
    on the same record, and the same refusal of a family the server does not monitor."""
    det = _stub_garak(monkeypatch)
    try:
        expected = telemetry.verdict(record, family=family).score
    except Exception:
        with pytest.raises(det.SparseCircuitsError, match="not monitored"):
            det.verdict(record, family)
        return
    assert det.verdict(record, family) == expected


def test_detector_imports_only_stdlib_and_garak():
    import ast

    tree = ast.parse(GARAK_DETECTOR_SOURCE.read_text(encoding="utf-8"))
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops = {m.split(".")[0] for m in mods}
    assert tops - sys.stdlib_module_names == {"garak"}


def test_install_into_an_env_without_garak_is_one_line():
    with pytest.raises(InputError, match=r"garak is not installed in this environment$"):
        install_garak_detector(sys.executable)  # ours: garak is never installed here


def _free_port() -> int:
    with socket.socket() as s:  # loopback
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key(keys: Path, key_id: str, scope: str) -> str:
    cmd = [sys.executable, "-m", "sparsecircuits.cli", "keys", "create", "--file", str(keys),
           "--id", key_id, "--scope", scope]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``sparsecircuits serve`` on 127.0.0.1 with the shipped catalogue and policy and API keys;
    always stopped (SIGTERM, then SIGKILL of this PID) within STOP_S."""
    d = tmp_path_factory.mktemp("serve")
    keys = d / "keys.json"
    user, operator = _key(keys, "garak", "user"), _key(keys, "ops", "operator")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "sparsecircuits.cli", "serve", "--port", str(port), "--device",
           "cpu", "--catalog", str(MONITOR), "--policy", str(MONITOR / "policy.yaml"),
           "--keys", str(keys)]  # fmt: skip
    log = d / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() - t0 < READY_S, f"no answer from {url} in {READY_S} s"
            req = urllib.request.Request(f"{url}/v1/models",
                                         headers={"Authorization": f"Bearer {user}"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=2):  # loopback
                    break
            except OSError:
                time.sleep(0.2)
        yield {"url": url, "user": user, "operator": operator}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _detector_env(garak: dict, server: dict, **over: str) -> dict:
    return {**garak["env"], "SPARSECIRCUITS_URL": server["url"],
            "SPARSECIRCUITS_USER_KEY": server["user"],
            "SPARSECIRCUITS_OPERATOR_KEY": server["operator"], **over}  # fmt: skip


DETECT = """
import json, sys
from garak import _config, _plugins
from garak.attempt import Attempt, Message
_config.load_base_config()
a = Attempt(prompt=Message(text="", lang="*"))
a.outputs = [Message(t) if t is not None else None for t in json.loads(sys.argv[1])]
try:
    det = _plugins.load_plugin("detectors.{name}")
    print(json.dumps(list(det.detect(a))))
except Exception as err:
    print(f"{{type(err).__name__}}: {{err}}")
"""


def _detect(garak: dict, env: dict, outputs: list) -> str:
    proc = subprocess.run([str(garak["python"]), "-c", DETECT.format(name=GARAK_DETECTOR),
                           json.dumps(outputs)], capture_output=True, text=True, env=env,
                          timeout=GARAK_S)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_garak_detector_scores_with_circuit_telemetry(garak, server):
    dest = install_garak_detector(garak["python"])
    assert dest.name == "sparsecircuits.py" and dest.parent.name == "detectors"
    got = _detect(garak, _detector_env(garak, server), [FLAGS, BENIGN, None])
    assert json.loads(got) == [1.0, 0.0, None]
    fam = _detect(garak, _detector_env(garak, server, SPARSECIRCUITS_FAMILY="brackets"), [FLAGS])
    assert json.loads(fam) == [0.0]  # the rule that fired is string-literal's


@pytest.mark.slow
@pytest.mark.parametrize(
    ("over", "says"),
    [
        ({"SPARSECIRCUITS_OPERATOR_KEY": ""}, "GET /v1/telemetry answered 401"),
        ({"SPARSECIRCUITS_FAMILY": "nope"}, "SPARSECIRCUITS_FAMILY 'nope': not monitored"),
        ({"SPARSECIRCUITS_URL": "http://127.0.0.1:1"}, "cannot reach the server"),
        ({"SPARSECIRCUITS_TIMEOUT": "soon"}, "SPARSECIRCUITS_TIMEOUT 'soon': expected seconds"),
    ],
)
def test_garak_detector_errors_are_one_line(garak, server, over, says):
    install_garak_detector(garak["python"])
    assert says in _detect(garak, _detector_env(garak, server, **over), [BENIGN])


@pytest.mark.slow
def test_garak_run_with_our_server_and_detector(garak, server, tmp_path):
    """A whole ``garak`` run: its REST generator asks our server, its test probe's prompts, our
    detector scores; each score is the server's own verdict on prompt + output. The detector
    is installed by the command users run."""
    from typer.testing import CliRunner

    from sparsecircuits.cli import app

    r = CliRunner().invoke(app, ["install-garak-detector", "--python", str(garak["python"])])
    assert r.exit_code == 0 and "sparsecircuits.CircuitTelemetry" in r.output, r.output
    opts = {"rest": {"RestGenerator": {
        "uri": f"{server['url']}/v1/completions", "method": "post",
        "headers": {"Authorization": "Bearer $KEY", "Content-Type": "application/json"},
        "req_template_json_object": {"prompt": "$INPUT", "max_tokens": 8, "temperature": 0},
        "response_json": True, "response_json_field": "$.choices[0].text",
        "skip_codes": [400],  # the probe's empty prompt: our server refuses it
    }}}  # fmt: skip
    (tmp_path / "rest.json").write_text(json.dumps(opts))
    cmd = [str(garak["python"]), "-m", "garak", "--target_type", "rest", "--generator_option_file",
           str(tmp_path / "rest.json"), "--probes", "test.Test", "-d", GARAK_DETECTOR,
           "--generations", "1", "--report_prefix", str(tmp_path / "run")]  # fmt: skip
    env = _detector_env(garak, server, REST_API_KEY=server["user"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=GARAK_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = read_report(tmp_path / "run.report.jsonl")
    (ev,) = [r for r in records if r["entry_type"] == "eval"]
    assert ev["detector"] == GARAK_DETECTOR and ev["probe"] == "test.Test"
    done = [r for r in records if r["entry_type"] == "attempt" and r["status"] == 2]
    scored = [(a, o, s) for a in done
              for o, s in zip(a["outputs"], a["detector_results"][GARAK_DETECTOR], strict=True)
              if s is not None]  # fmt: skip
    assert ev["total_evaluated"] == len(scored) == 7 and ev["nones"] == 1  # the empty prompt
    assert any(r["entry_type"] == "digest" for r in records)  # garak digested its own run
    for a, out, score in scored:
        text = a["prompt"]["turns"][-1]["content"]["text"] + out["text"]
        assert score == telemetry.verdict(_telemetry(server, text)).score, text


def _telemetry(server: dict, text: str) -> dict:
    """The server's telemetry record of ``text``, asked here (as the detector does)."""

    def call(route: str, key: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(server["url"] + route, data=data, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as resp:  # loopback
            return json.loads(resp.read())

    done = call("/v1/completions", server["user"], {"prompt": text, "max_tokens": 1,
                                                     "temperature": 0})  # fmt: skip
    return call(f"/v1/telemetry/{done['id']}", server["operator"])["telemetry"]


@pytest.mark.slow
def test_over_http_scores_like_in_process(server):
    over = telemetry.OverHttp(server["url"], user_key=server["user"],
                              operator_key=server["operator"])  # fmt: skip
    assert telemetry.verdict(over.record(FLAGS)).score == 1.0
    assert telemetry.verdict(over.record(BENIGN)).score == 0.0
    here = telemetry.InProcess().record(FLAGS)  # the prompt's z, as the server saw it
    there = over.record(FLAGS)
    for name, fam in here["families"].items():
        n = len(fam["z"])
        assert there["families"][name]["z"][:n] == pytest.approx(fam["z"], abs=1e-3)
