"""The Monitor page's pure parts: telemetry parsing with one-line errors naming the field, token
labels, flags, the catalogue's family -> circuit links, the heatmap, fetching from a server
(a loopback HTTP server in a thread), and the page's torch-free import."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sparsecircuits.errors import InputError
from sparsecircuits.viz import monitor_view as mv

SHA = "ab" * 32


def _record() -> dict:
    """A server record: 3 prompt + 2 generated tokens, one family flagged at g1."""
    telemetry = {
        "request_id": "cmpl-1",
        "n_prompt_tokens": 3,
        "n_generated_tokens": 2,
        "families": {
            "quotes": {
                "engagement": [0.5, 1.0, 2.0, 3.0, 4.0],
                "z": [-1, 0, 1, 5, 6],
                "max_z": 6.0,
                "flags": {"quotes-log": [1], "quotes-review": []},
                "dampened": False,
            },
            "brackets": {
                "engagement": [1, 1, 1, 1, 1],
                "z": [0, 0, 0, 0, 0],
                "max_z": 0.0,
                "flags": {"b": [-1]},
                "dampened": True,
            },
        },
        "decision": {
            "action": "log",
            "family": "quotes",
            "rule": "quotes-log",
            "at_token": 1,
            "reason": "quotes: z > 4",
            "policy_sha256": SHA,
        },
    }
    return {"request_id": "cmpl-1", "model": "planted", "outcome": "completed",
            "finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 2,
            "decision": telemetry["decision"], "telemetry": telemetry}  # fmt: skip


def test_parse_a_server_record_and_a_bare_telemetry():
    view = mv.parse_telemetry(_record())
    assert (view.request_id, view.n_prompt, view.n_generated, view.n_tokens) == ("cmpl-1", 3, 2, 5)
    assert view.model == "planted" and view.finish_reason == "length"
    assert [f.name for f in view.families] == ["quotes", "brackets"]
    assert view.families[0].z == [-1.0, 0.0, 1.0, 5.0, 6.0]
    assert view.decision["action"] == "log" and view.decision["policy_sha256"] == SHA
    bare = mv.parse_telemetry_text(json.dumps(_record()["telemetry"]))
    assert bare.families == view.families and bare.model is None


def test_no_catalogue_record_has_no_families():
    rec = {"request_id": "x", "prompt_tokens": 4, "completion_tokens": 1,
           "telemetry": {"request_id": "x", "families": {},
                         "decision": {"action": "allow", "policy_sha256": "0" * 64}}}  # fmt: skip
    view = mv.parse_telemetry(rec)
    assert view.families == [] and (view.n_prompt, view.n_generated) == (4, 1)


def _broken(path: list, value, *, delete: bool = False) -> dict:
    rec = copy.deepcopy(_record())
    obj = rec["telemetry"]
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    rec.pop("decision")  # so that the telemetry's decision is the one read
    return rec


@pytest.mark.parametrize(
    ("path", "value", "delete", "field"),
    [
        (["families", "quotes", "engagement"], [1.0, 2.0], False, "families.quotes.engagement"),
        (["families", "quotes", "z"], [0, 0, "a", 0, 0], False, "families.quotes.z[2]"),
        (["families", "quotes", "flags", "quotes-log"], [2], False, "flags.quotes-log"),
        (["families", "quotes", "dampened"], None, True, "families.quotes.dampened"),
        (["n_prompt_tokens"], "3", False, "n_prompt_tokens"),
        (["n_generated_tokens"], True, False, "n_generated_tokens"),
        (["decision", "action"], "explode", False, "decision.action"),
        (["decision", "policy_sha256"], None, True, "decision.policy_sha256"),
        (["request_id"], 7, False, "request_id"),
    ],
)
def test_bad_fields_are_one_line_errors_naming_the_field(path, value, delete, field):
    with pytest.raises(InputError) as info:
        mv.parse_telemetry(_broken(path, value, delete=delete))
    message = str(info.value)
    assert field in message and "\n" not in message


def test_not_json_and_not_an_object():
    with pytest.raises(InputError, match="not JSON"):
        mv.parse_telemetry_text("{nope")
    with pytest.raises(InputError, match="expected a JSON object"):
        mv.parse_telemetry_text("[1, 2]")


def test_token_labels_from_indices_or_supplied_pieces():
    view = mv.parse_telemetry(_record())
    assert mv.token_labels(view) == (["p0", "p1", "p2", "g0", "g1"], None)
    labels, note = mv.token_labels(view, ["x", " =", ' "'], ["ab", '"'])
    assert labels == ["x", " =", ' "', "ab", '"'] and note is None
    labels, note = mv.token_labels(view, ["x"], None)  # wrong count: indices, and a note
    assert labels[:3] == ["p0", "p1", "p2"] and "prompt is 1 tokens here, 3" in note


def test_a_blocked_token_is_labelled_as_such():
    rec = _record()
    rec["decision"] = {**rec["decision"], "action": "block"}
    view = mv.parse_telemetry(rec)  # 2 generated tokens observed, 1 sent
    labels, note = mv.token_labels(view, None, ["ab"])
    assert labels[3:] == ["ab", "[blocked]"] and note is None


def test_flag_rows_and_positions():
    view = mv.parse_telemetry(_record())
    labels, _ = mv.token_labels(view)
    rows = mv.flag_rows(view, labels)
    assert rows == [
        {"family": "quotes", "rule": "quotes-log", "fired at": "g1", "times": 1},
        {"family": "brackets", "rule": "b", "fired at": "prompt", "times": 1},
    ]
    texts, _ = mv.token_labels(view, None, ["ab", '"'])
    assert mv.flag_rows(view, texts)[0]["fired at"] == "g1 '\"'"
    assert mv.position(view, 1) == 4 and mv.position(view, mv.PROMPT) == 2


def test_engagement_figure_rows_markers_and_colours():
    view = mv.parse_telemetry(_record())
    labels, _ = mv.token_labels(view)
    fig = mv.engagement_figure(view, labels)
    heat, marks = fig.data
    assert [list(r) for r in heat.z] == [[0.5, 1.0, 2.0, 3.0, 4.0], [1.0] * 5]
    assert heat.zmin == 0.0 and heat.zmax == 4.0
    assert list(fig.layout.yaxis.ticktext) == ["quotes", "brackets (dampened)"]
    assert sorted(zip(marks.x, marks.y, strict=True)) == [(2, 1), (4, 0)]
    zfig = mv.engagement_figure(view, labels, colour="z")
    assert zfig.data[0].zmin == -6.0 and zfig.data[0].zmax == 6.0
    assert any(s.type == "line" for s in fig.layout.shapes)  # the prompt | generated line


def test_family_circuits_from_a_catalogue(tmp_path):
    doc = {
        "circuits": {"a": {"path": "/c/a"}, "b": {"path": "/c/b"}},
        "families": {"f": {"tasks": ["b", "a"], "admitted": ["a"]}, "g": {"tasks": [],
                                                                           "admitted": []}},
    }  # fmt: skip
    (tmp_path / "catalog.json").write_text(json.dumps(doc))
    links = mv.family_circuits(tmp_path)
    assert links["f"] == [mv.CircuitLink("a", "/c/a", True), mv.CircuitLink("b", "/c/b", False)]
    assert links["g"] == []
    assert mv.family_circuits(tmp_path / "catalog.json") == links  # the file, as /healthz has it
    with pytest.raises(InputError, match="cannot read"):
        mv.family_circuits(tmp_path / "missing")
    (tmp_path / "catalog.json").write_text("{}")
    with pytest.raises(InputError, match="not a monitor catalogue"):
        mv.family_circuits(tmp_path)


@pytest.fixture
def fake_server():
    """A loopback HTTP server answering the telemetry and health routes like the real one."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if self.path == "/v1/telemetry/cmpl-1":
                status, body = 200, _record()
            elif self.path == "/healthz":
                status, body = 200, {"monitor": {"catalog": "/cat"}}
            else:
                status, body = 404, {"error": {"message": "no telemetry for request"}}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_fetch_from_a_server(fake_server):
    base, seen = fake_server
    view = mv.fetch_telemetry(base + "/", " cmpl-1 ")
    assert view.request_id == "cmpl-1" and len(view.families) == 2
    assert mv.fetch_catalog_dir(base) == "/cat"
    with pytest.raises(InputError, match="HTTP 404: no telemetry for request"):
        mv.fetch_telemetry(base, "cmpl-2")
    mv_err = pytest.raises(InputError, match="HTTP 404")
    with mv_err:  # an id with a slash stays one path segment
        mv.fetch_telemetry(base, "../healthz")
    assert seen[-1] == "/v1/telemetry/..%2Fhealthz"
    with pytest.raises(InputError, match="empty"):
        mv.fetch_telemetry(base, "  ")


def test_bad_server_urls_and_no_answer():
    with pytest.raises(InputError, match="expected http://HOST:PORT"):
        mv.server_base("file:///etc/passwd")
    with pytest.raises(InputError, match="no answer"):
        mv.fetch_telemetry("http://127.0.0.1:9", "cmpl-1", timeout=2)  # discard port: refused


def test_the_page_imports_without_torch():
    code = ("import sys, sparsecircuits.viz.app_monitor, sparsecircuits.viz.monitor_view; "
            "print('torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_dashboard_passes_server_and_catalog_to_the_app(tmp_path):
    from sparsecircuits.viz import app_state, launch

    cmd = launch.streamlit_command(port=1, target="t", server="http://127.0.0.1:8000",
                                   catalog=tmp_path)  # fmt: skip
    app_args = cmd[cmd.index("--") + 1 :]
    args = app_state.parse_args(app_args)
    assert (args.target, args.server, args.catalog) == ("t", "http://127.0.0.1:8000",
                                                        str(tmp_path.resolve()))  # fmt: skip
    assert app_state.parse_args([]).server is None  # no server unless asked
