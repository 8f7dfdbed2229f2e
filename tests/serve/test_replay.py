"""``audit replay`` on the shipped model: the server (with its shipped catalogue and policy,
``--store-inputs``) answers 20 varied requests under FastAPI's TestClient, and replaying each
from the audit trail reproduces its recorded scores, decision and output bit for bit; edits
to the record, another seed or another policy are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sparsecircuits.audit import layout
from sparsecircuits.audit.records import canonical
from sparsecircuits.audit.signing import keygen
from sparsecircuits.cli import app as cli_app
from sparsecircuits.errors import InputError
from sparsecircuits.model.io import resolve_model_dir
from sparsecircuits.serve.launch import ServeConfig, build_app
from sparsecircuits.serve.replay import Difference, replay

pytestmark = pytest.mark.slow  # replay reloads the shipped model per request: ~2 min on 2 CPUs

MODEL = "stdlib-sparse"
URL = "/v1/completions"

# (prompt, options): greedy, seeded and unseeded sampling (the server draws and records the
# seed), max_tokens 4..24, some streamed; string literals (the string-literal family), brackets
# and plain code.
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ('name = "hello', {"temperature": 0, "max_tokens": 12}),
    ("x = 'a' + 'b' + '", {"temperature": 0, "max_tokens": 8, "stream": True}),
    ('msg = "%s: %s" % (key, ', {"temperature": 0.8, "seed": 7, "max_tokens": 16}),
    ("def f(a, b):\n    return (a + b", {"temperature": 0, "max_tokens": 4}),
    ("items = [1, 2, [3, 4], {", {"temperature": 1.0, "seed": 11, "max_tokens": 20}),
    ("while True:\n    ", {"temperature": 1.0, "max_tokens": 10}),
    ("import os\nimport sys\n\n", {"temperature": 0.7, "top_p": 0.9, "seed": 3, "max_tokens": 24}),
    ('raise ValueError("invalid literal for int() with base %d: %r" % (', {"temperature": 0,
                                                                        "max_tokens": 18}),
    ("d = {'a': [1, (2, 3)], 'b': ", {"temperature": 1.3, "max_tokens": 14, "stream": True}),
    ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n", {"temperature": 0,
                                                                         "max_tokens": 24}),
    ('s = """docstring\n', {"temperature": 0.5, "seed": 12345, "max_tokens": 9,
                            "stream": True}),
    ("for i in range(10):\n    if i % 2:\n", {"temperature": 1.0, "max_tokens": 6}),
    ("print('", {"temperature": 0, "max_tokens": 5, "stream": True}),
    ("result = func(arg1, (arg2, arg3), [arg4", {"temperature": 0.9, "seed": 99,
                                                 "max_tokens": 22}),
    ("return '<%s>' % ", {"temperature": 1.0, "seed": 2**63 + 5, "max_tokens": 13}),
    ("    except KeyError:\n        ", {"temperature": 0, "max_tokens": 7}),
    ("path = os.path.join(base, 'lib', ", {"temperature": 1.0, "max_tokens": 17,
                                           "stream": True}),
    ("x = [[[", {"temperature": 0.6, "seed": 0, "max_tokens": 4}),
    ("if __name__ == '__main__':\n    ", {"temperature": 1.0, "seed": 5, "max_tokens": 24}),
    ('log.info("request %s: ok", ', {"temperature": 0, "max_tokens": 11}),
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads():
    """replay() sets torch's thread count to the recorded one: put it back for other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _model_dir() -> Path:
    return resolve_model_dir(MODEL)


def _config(trail: Path, key: Path, **kw: Any) -> ServeConfig:
    mdir = _model_dir()
    return ServeConfig(model_dir=str(mdir), model_name=MODEL, catalog=str(mdir / "monitor"),
                       policy=str(mdir / "monitor" / "policy.yaml"), audit_dir=str(trail),
                       audit_key=str(key), checkpoint_seconds=0.2, **kw)  # fmt: skip


def _request(client: TestClient, prompt: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Send one request; its id, text, finish reason and last decision (streamed or not)."""
    r = client.post(URL, json={"prompt": prompt, **opts})
    assert r.status_code == 200, r.text
    if not opts.get("stream"):
        body = r.json()
        choice = body["choices"][0]
        return {"id": body["id"], "text": choice["text"], "finish_reason": choice["finish_reason"],
                "decision": choice["decision"]}  # fmt: skip
    events = [ln[len("data: ") :] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    decisions = [c["choices"][0]["decision"] for c in chunks if c["choices"][0]["decision"]]
    assert len({c["id"] for c in chunks}) == 1
    return {"id": chunks[0]["id"], "text": "".join(c["choices"][0]["text"] for c in chunks),
            "finish_reason": chunks[-1]["choices"][0]["finish_reason"],
            "decision": decisions[-1]}  # fmt: skip


def _records(trail: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Every request record of the trail by (request id, kind)."""
    out = {}
    for log_dir in layout.logs(trail):
        for _, seg in layout.segments(log_dir):
            for line in seg.read_bytes().splitlines():
                doc = json.loads(line)
                if "request_id" in doc:
                    out[doc["request_id"], doc["kind"]] = doc
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, Any]:
    """The shipped model served with --store-inputs; 20 requests answered and recorded."""
    root = tmp_path_factory.mktemp("replay")
    key, _, _ = keygen(root / "key")
    trail = root / "trail"
    app = build_app(_config(trail, key, store_inputs=True))
    with TestClient(app) as client:
        answers = [_request(client, prompt, opts) for prompt, opts in REQUESTS]
    # leaving the client closed the app: the audit log is closed with a final checkpoint
    return {"trail": trail, "key": key, "answers": answers, "records": _records(trail)}


def test_the_recorded_requests_are_what_was_sent(served):
    records, answers = served["records"], served["answers"]
    assert len({a["id"] for a in answers}) == len(REQUESTS) == 20
    families = set()
    for (prompt, opts), a in zip(REQUESTS, answers, strict=True):
        start, done = records[a["id"], "start"], records[a["id"], "complete"]
        assert start["input"] == prompt and done["output"] == a["text"]
        p = start["params"]
        assert p["max_tokens"] == opts["max_tokens"] and p["stream"] == opts.get("stream", False)
        if "seed" in opts:
            assert p["seed"] == opts["seed"]
        else:  # unseeded: the server drew one and recorded it
            assert isinstance(p["seed"], int) and 0 <= p["seed"] < 2**63
        assert done["replay"]["seed"] == p["seed"]
        assert done["outcome"] == "completed" and done["decision"] == a["decision"]
        assert done["finish_reason"] == a["finish_reason"]
        families |= {n for n, f in done["scores"]["families"].items() if any(f["flags"].values())}
        families |= {a["decision"]["family"]} - {None}
    # some prompts set off the string-literal family's rule (logged by the shipped policy)
    assert "string-literal" in families, families


def test_replay_reproduces_every_request_bit_for_bit(served):
    """Acceptance: replay reproduces the recorded scores bit for bit for 20 recorded requests."""
    trail = served["trail"]
    for a in served["answers"]:
        assert replay(trail, a["id"]) == [], a["id"]


def _copy_trail(served, tmp_path: Path) -> Path:
    dst = tmp_path / "trail"
    shutil.copytree(served["trail"], dst)
    return dst


def _rewrite(trail: Path, rid: str, kind: str, change) -> None:
    """Rewrite the record of ``rid`` and ``kind`` in place with ``change(doc)`` applied (its
    signature no longer matches, which replay does not check)."""
    for log_dir in layout.logs(trail):
        for _, seg in layout.segments(log_dir):
            lines = seg.read_bytes().split(b"\n")
            for i, line in enumerate(lines):
                doc = json.loads(line) if line else None
                if doc and doc.get("request_id") == rid and doc["kind"] == kind:
                    change(doc)
                    lines[i] = canonical(doc)
                    seg.write_bytes(b"\n".join(lines))
                    return
    raise AssertionError(f"no {kind} record of {rid}")


def _long_sampled(served) -> dict[str, Any]:
    """A sampled (temperature > 0) request that generated many tokens."""
    for (_, opts), a in zip(REQUESTS, served["answers"], strict=True):
        done = served["records"][a["id"], "complete"]
        if opts["temperature"] > 0 and done["completion_tokens"] >= 12:
            return a
    raise AssertionError("no long sampled request")


def test_an_edited_score_is_named_by_its_path(served, tmp_path):
    trail = _copy_trail(served, tmp_path)
    a = served["answers"][9]  # greedy, 24 tokens
    done = served["records"][a["id"], "complete"]
    name = sorted(done["scores"]["families"])[-1]
    engagement = done["scores"]["families"][name]["engagement"]
    assert len(engagement) > 3

    def edit(doc: dict[str, Any]) -> None:
        doc["scores"]["families"][name]["engagement"][3] += 1e-6

    _rewrite(trail, a["id"], "complete", edit)
    diffs = replay(trail, a["id"])
    assert [d.field for d in diffs] == [f"scores.families.{name}.engagement[3]"], diffs
    (d,) = diffs
    assert isinstance(d, Difference)
    assert d.recorded == engagement[3] + 1e-6 and d.replayed == engagement[3]
    assert f"scores.families.{name}.engagement[3]: recorded" in str(d)
    # the same through the CLI: a DIFF line and exit 1; another request of the trail still
    # reproduces (exit 0)
    res = CliRunner().invoke(cli_app, ["audit", "replay", str(trail), a["id"]])
    assert res.exit_code == 1, res.output
    assert f"DIFF scores.families.{name}.engagement[3]: recorded" in res.output
    other = served["answers"][12]["id"]
    res = CliRunner().invoke(cli_app, ["audit", "replay", str(trail), other])
    assert res.exit_code == 0, res.output
    assert f"audit replay: {other} reproduced exactly" in res.output


def test_another_seed_in_the_start_record_changes_the_output(served, tmp_path):
    trail = _copy_trail(served, tmp_path)
    a = _long_sampled(served)

    def reseed(doc: dict[str, Any]) -> None:
        doc["params"]["seed"] += 1

    _rewrite(trail, a["id"], "start", reseed)
    fields = {d.field.split(".")[0].split("[")[0] for d in replay(trail, a["id"])}
    assert "output_sha256" in fields, fields


def test_a_request_recorded_without_store_inputs_cannot_be_replayed(served, tmp_path):
    trail = tmp_path / "trail"
    app = build_app(_config(trail, served["key"], store_inputs=False))
    with TestClient(app) as client:
        rid = _request(client, "x = 'secret'", {"temperature": 0, "max_tokens": 4})["id"]
    records = _records(trail)
    start, done = records[rid, "start"], records[rid, "complete"]
    assert "input" not in start and "input_sha256" in start  # only the prompt's hash
    assert "output" not in done and "output_sha256" in done
    with pytest.raises(InputError, match="without its input") as err:
        replay(trail, rid)
    assert "\n" not in str(err.value) and "--store-inputs" in str(err.value)


def test_a_replay_under_another_policy_names_its_hash(served, tmp_path):
    policy = tmp_path / "policy.yaml"
    text = (_model_dir() / "monitor" / "policy.yaml").read_text()
    changed = text.replace("family: string-literal\n", "family: string-literal\n    z: 6.5\n")
    assert changed != text
    policy.write_text(changed)
    a = served["answers"][0]
    diffs = replay(served["trail"], a["id"], policy=str(policy))
    by_field = {d.field: d for d in diffs}
    assert "policy_sha256" in by_field, diffs
    recorded = served["records"][a["id"], "complete"]["policy_sha256"]
    assert by_field["policy_sha256"].recorded == recorded
    assert by_field["policy_sha256"].replayed != recorded
    # the very same file under another name replays exactly
    same = tmp_path / "same.yaml"
    same.write_text(text)
    assert replay(served["trail"], a["id"], policy=str(same)) == []


def test_replay_runs_with_the_recorded_thread_count(served):
    a = served["answers"][3]
    want = served["records"][a["id"], "complete"]["replay"]["threads"]
    torch.set_num_threads(want + 1)  # this process runs with another count...
    assert replay(served["trail"], a["id"]) == []  # ...replay switches to the recorded one
    assert torch.get_num_threads() == want


def test_replay_of_an_unknown_request(served):
    with pytest.raises(InputError, match="lacks a start or completion record"):
        replay(served["trail"], "cmpl-0000")
