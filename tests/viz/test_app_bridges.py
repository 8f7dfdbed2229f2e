"""The dashboard's Bridges page, run headless (``streamlit.testing``) on files written by the
real code on tiny models: bridges fitted for one step, their fidelity (``bridges.evaluate.
fidelity``) and two steering experiments (``bridges.steer_run.run_steering``), stamped as
``bridge eval`` and ``bridge steer`` stamp them. Checks: the fidelity table (every site and the
sparse model alone), the steering table and chart (each scale, the four arms, their numbers),
and one line, never a traceback, for another bridges' fidelity, a malformed steering file, a
missing directory or steering folder."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from sparsecircuits.bridges.evaluate import FIDELITY_FILE, fidelity
from sparsecircuits.bridges.fit import FitConfig, fit, load_bridges, load_meta
from sparsecircuits.bridges.steer import parse_node
from sparsecircuits.bridges.steer_run import run_steering
from sparsecircuits.data import stdlib_dir, train_tokenizer
from sparsecircuits.model.io import save_model, weights_hash
from sparsecircuits.viz import bridges_data as bd
from tests.bridges.test_fit import Windows
from tests.circuits.conftest import _FILES, circuit_model

TASK = "single_double_quote"
SIDE_TASKS = ["bracket_counting", "while_return_true"]
TIMEOUT = 60  # the first run imports torch (bridges.json is validated by bridges.fit)


def _steer(s, d, b, tok, node: str, scales, *, side: list[str], windows, meta, fid) -> dict:
    """A steering result as ``bridge steer --json`` writes it (run_steering + the stamps)."""
    doc = run_steering(s, d, b, tok, task=TASK, node=parse_node(node, s), src="a", dst="b",
                       scales=scales, seeds=[0, 1], n_pairs=12, side_pairs=4 if side else 0,
                       side_tasks=side, windows=windows)  # fmt: skip
    doc["bridges_sha256"] = meta.weights_sha256
    doc["site_fidelity"] = {r["site"]: r for r in fid["sites"]}.get(doc["site"])
    return doc


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """``bridges/`` (fitted, evaluated, two experiments), ``other/`` (bridges of another fit,
    not evaluated) and the saved models ``sparse/`` and ``dense/`` with their tokenizer."""
    root = tmp_path_factory.mktemp("bridges_page")
    tok = train_tokenizer([(stdlib_dir() / n).read_text(encoding="utf-8") for n in _FILES],
                          vocab_size=512)  # fmt: skip
    s = circuit_model(tok.vocab_size, seed=0, block_size=128)
    d = circuit_model(tok.vocab_size, seed=1, block_size=128)
    hashes = {"sparse": weights_hash(s), "dense": weights_hash(d)}
    for seed, name in ((0, "bridges"), (1, "other")):
        cfg = FitConfig(steps=1, batch=2, seq_len=8, init_tokens=256, seed=seed)
        fit(s, d, Windows(tok.vocab_size), root / name, cfg, hashes=hashes)
    out = root / "bridges"
    b, meta = load_bridges(out, hashes=hashes), load_meta(out)
    windows = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    fid = fidelity(s, d, b, windows, batch=2)
    fid["weights_sha256"] = meta.weights_sha256  # as `bridge eval` stamps it
    (out / FIDELITY_FILE).write_text(json.dumps(fid))
    docs = {
        "a_attn": _steer(s, d, b, tok, "1.attn_out.23", [30.0, 300.0], side=SIDE_TASKS,
                         windows=windows, meta=meta, fid=fid),
        "b_mlp": _steer(s, d, b, tok, "0.mlp_neuron.23", [300.0], side=[], windows=None,
                        meta=meta, fid=fid),
    }  # fmt: skip
    (out / bd.STEERING_DIR).mkdir()
    for name, doc in docs.items():
        (out / bd.STEERING_DIR / f"{name}.json").write_text(json.dumps(doc))
    for m, name in ((s, "sparse"), (d, "dense")):
        save_model(m, root / name)
        tok.save(root / name)
    return {"root": root, "dir": out, "fid": fid, "docs": docs, "meta": meta}


def _page() -> None:
    # AppTest runs this function's source as the script: imports live inside.
    from sparsecircuits.viz.app_bridges import bridges_view

    bridges_view()


def _run(directory: Path | None) -> AppTest:
    at = AppTest.from_function(_page, default_timeout=TIMEOUT)
    if directory is not None:
        at.session_state["bridges_dir"] = str(directory)
    return at.run()


def _copy(made: dict, tmp_path: Path) -> Path:
    dest = tmp_path / "bridges"
    shutil.copytree(made["dir"], dest)
    return dest


def _frame(at: AppTest, column: str):
    """The dataframe holding ``column`` (pandas)."""
    frames = [f.value for f in at.dataframe if column in f.value.columns]
    assert len(frames) == 1, [list(f.value.columns) for f in at.dataframe]
    return frames[0]


def _chart(at: AppTest, trace: str) -> dict[str, dict]:
    """Traces by name of the plotly chart having a trace called ``trace``."""
    for el in at.get("plotly_chart"):
        data = {t.get("name"): t for t in json.loads(el.proto.spec)["data"]}
        if trace in data:
            return data
    raise AssertionError(f"no chart with a trace {trace!r}")


def _clean(at: AppTest) -> None:
    assert not at.exception and not at.error and not at.warning, (at.error, at.warning)


def _same(a, b) -> bool:
    """Equal, NaN and None (an empty cell) counting as one."""
    na = a is None or (isinstance(a, float) and math.isnan(a))
    nb = b is None or (isinstance(b, float) and math.isnan(b))
    return (na and nb) or (not na and not nb and a == pytest.approx(b))


def test_fidelity_table_has_every_site_and_the_sparse_model_alone(made):
    at = _run(made["dir"])
    _clean(at)
    fid, meta = made["fid"], made["meta"]
    df = _frame(at, "KL d→s")
    assert list(df["site"]) == [*meta.sites, "sparse model alone"]
    for i, r in enumerate(fid["sites"]):
        assert df["enc NMSE"][i] == pytest.approx(r["enc_nmse"])
        assert df["dec NMSE"][i] == pytest.approx(r["dec_nmse"])
        assert (df["KL d→s"][i], df["KL s→d"][i]) == pytest.approx((r["kl_d2s"], r["kl_s2d"]))
        assert df["agree s→d"][i] == pytest.approx(r["agree_s2d"])
    alone = df.iloc[-1]
    assert (alone["KL d→s"], alone["agree d→s"]) == pytest.approx(
        (fid["sparse_alone"]["kl"], fid["sparse_alone"]["agree"]))  # fmt: skip
    assert math.isnan(alone["enc NMSE"])  # no map: no NMSE
    chart = _chart(at, "sparse model alone")
    assert chart["KL s→d hybrid"]["y"] == pytest.approx([r["kl_s2d"] for r in fid["sites"]])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["sparse model"] == meta.hashes["sparse"][: bd.SHORT]
    assert metrics["dense model"] == meta.hashes["dense"][: bd.SHORT] and metrics["steps"] == "1"
    assert metrics["sites"] == str(len(meta.sites))
    assert any("not a bound" in m.value for m in at.markdown)


def test_steering_table_has_each_scale_and_the_four_arms(made):
    at = _run(made["dir"])
    _clean(at)
    doc = made["docs"]["a_attn"]  # the first file by name is shown first
    df = _frame(at, "bridged flip")
    assert list(df["scale"]) == [30.0, 300.0]
    for i, r in enumerate(doc["rows"]):
        got = df.iloc[i]
        pairs = [(got["bridged flip"], r["bridged"]["flip"]),
                 (got["random flip (mean)"], r["random"]["flip_mean"]),
                 (got["random flip (max)"], r["random"]["flip_max"]),
                 (got["dense class-mean flip"], r["dense_class_mean"]["flip"]),
                 (got["sparse steered flip"], r["sparse"]["flip"]),
                 (got["Δ logit (bridged)"], r["bridged"]["dlogit"]),
                 (got["|Δh| bridged"], r["delta_norm"])]  # fmt: skip
        assert all(_same(a, b) for a, b in pairs), (i, pairs)
        se = r["side_effects"]
        d_acc = sum(t["after"] - t["before"] for t in se["tasks"].values()) / len(SIDE_TASKS)
        assert got["Δ accuracy, other tasks"] == pytest.approx(d_acc)
        ho = se["heldout_loss"]
        assert got["held-out loss"] == f"{ho['before']:.3f} → {ho['after']:.3f}"
    assert doc["rows"][-1]["random"]["flip_max"] > 0  # the numbers checked are not all zero
    chart = _chart(at, bd.ARMS["bridged"][0])
    for arm, key in (("bridged", "flip"), ("dense_class_mean", "flip"), ("sparse", "flip")):
        want = [r[arm][key] for r in doc["rows"]]
        assert all(_same(a, b) for a, b in zip(chart[bd.ARMS[arm][0]]["y"], want, strict=True))
    rand = [r["random"]["flip_mean"] for r in doc["rows"]]
    assert chart[bd.ARMS["random"][0]]["y"] == pytest.approx(rand)
    if "side_pairs" in doc:  # results written since bridge steer records the sizes
        want = "Side effects measured on 4 test pairs per other task and 2 held-out windows."
        assert any(c.value == want for c in at.caption)
    side = _frame(at, "task")
    assert len(side) == 2 * len(SIDE_TASKS) and set(side["task"]) == set(SIDE_TASKS)
    node, site = doc["node"], doc["site"]
    head = f"**node** `{node}` · **task** `{TASK}` · **class** a → b · **site** `{site}`"
    assert any(m.value.startswith(head) for m in at.markdown)
    assert any(f"a {doc['value_from']:+.3f} → b {doc['value_to']:+.3f}" in c.value
               for c in at.caption)  # fmt: skip
    assert any(f"Fidelity at site {doc['site']}" in c.value and "of these bridges" in c.value
               for c in at.caption)  # fmt: skip

    at.selectbox(key="bridges_steer_pick").set_value("b_mlp").run()  # the other experiment
    _clean(at)
    df = _frame(at, "bridged flip")
    other = made["docs"]["b_mlp"]["rows"][0]
    assert list(df["scale"]) == [300.0] and _same(df["bridged flip"][0], other["bridged"]["flip"])
    assert df["held-out loss"][0] == "—" and _same(df["Δ accuracy, other tasks"][0], None)


def test_fidelity_of_other_bridges_warns_and_shows_no_table(made, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(made["root"] / "other", other)
    shutil.copy(made["dir"] / FIDELITY_FILE, other / FIDELITY_FILE)  # a refit after an eval
    at = _run(other)
    assert not at.exception and not at.error
    assert [w.value.split(" (")[0] for w in at.warning] == ["fidelity.json measured other bridges"]
    assert all("KL d→s" not in f.value.columns for f in at.dataframe)
    assert not at.get("plotly_chart") and any("No steering" in i.value for i in at.info)
    # An experiment run through the first bridges, put beside the second: said so, and its
    # recorded site fidelity is labelled unchecked.
    shutil.copytree(made["dir"] / "steering", other / "steering")
    at = _run(other)
    assert not at.exception and not at.error
    assert [w.value.split(" (")[0] for w in at.warning] == [
        "fidelity.json measured other bridges",
        "This experiment steered through other bridges",
    ]
    assert any("as recorded with the result, not checked" in c.value for c in at.caption)
    assert all("KL d→s" not in f.value.columns for f in at.dataframe)


def test_a_flip_share_over_no_prompts_is_an_empty_cell(made):
    raw = json.loads(json.dumps(made["docs"]["a_attn"]))
    raw["rows"][0]["bridged"] = {"n": 0, "flip": float("nan"), "dlogit": 0.0}  # flips() on none
    doc = bd.SteeringDoc.model_validate(raw)
    assert bd.steering_rows(doc)[0]["bridged flip"] is None
    assert bd.flip_figure(doc).data[0].y[0] is None


def test_a_malformed_steering_file_is_one_line_and_the_rest_renders(made, tmp_path):
    d = _copy(made, tmp_path)
    (d / "steering" / "a_broken.json").write_text("{not json")
    partial = dict(made["docs"]["a_attn"])
    del partial["rows"]
    (d / "steering" / "a_partial.json").write_text(json.dumps(partial))
    at = _run(d)
    assert not at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert "a_broken.json: not valid JSON" in errors[0]
    assert "a_partial.json: missing required field 'rows'" in errors[1]
    assert list(at.selectbox(key="bridges_steer_pick").options) == [
        "a_attn: 1.attn_out.23 on single_double_quote",
        "b_mlp: 0.mlp_neuron.23 on single_double_quote",
    ]
    assert len(_frame(at, "KL d→s")) == len(made["meta"].sites) + 1
    assert list(_frame(at, "bridged flip")["scale"]) == [30.0, 300.0]


def test_no_steering_folder_says_none_were_run_and_how(made, tmp_path):
    d = _copy(made, tmp_path)
    shutil.rmtree(d / "steering")
    at = _run(d)
    _clean(at)
    assert [i.value.split(" (")[0] for i in at.info] == [
        "No steering experiments were run for these bridges"
    ]
    assert f"bridge steer {d} --node" in at.code[0].value
    assert f"--json {d}/steering/TASK.json" in at.code[0].value


def test_missing_or_broken_directories_are_one_line(made, tmp_path, monkeypatch):
    at = _run(tmp_path / "nope")
    assert not at.exception and not at.metric and not at.dataframe
    assert len(at.error) == 1 and "nope: no such directory" in at.error[0].value
    d = _copy(made, tmp_path)
    (d / "bridges.json").write_text('{"format": "sparsecircuits.bridges"}')
    at = _run(d)
    assert not at.exception and len(at.error) == 1 and "\n" not in at.error[0].value
    assert "bridges.json: missing required field" in at.error[0].value
    (d / FIDELITY_FILE).write_text("[]")  # with bridges.json whole again: only this line
    shutil.copy(made["dir"] / "bridges.json", d / "bridges.json")
    at = _run(d)
    assert [e.value for e in at.error] == [f"{d / FIDELITY_FILE}: expected a JSON object, got list"]
    assert _frame(at, "bridged flip") is not None  # the steering part still renders
    # A shipped name, as the bridge commands take it
    shutil.copytree(made["dir"], tmp_path / "pretrained" / "mine")
    monkeypatch.setattr(bd, "PRETRAINED", tmp_path / "pretrained")
    at = _run(Path("mine"))
    _clean(at)
    assert len(_frame(at, "KL d→s")) == len(made["meta"].sites) + 1
    # The default directory, before the shipped bridges exist: an info line, no error.
    monkeypatch.setattr(bd, "DEFAULT_BRIDGES_DIR", tmp_path / "not-shipped")
    at = _run(None)
    assert not at.exception and not at.error and len(at.info) == 1
    assert "shipped bridges are not installed" in at.info[0].value


def test_the_page_is_in_the_dashboards_navigation(made, viz_circuit_dir, monkeypatch):
    app = Path(__file__).resolve().parents[2] / "src" / "sparsecircuits" / "viz" / "app.py"
    monkeypatch.setattr(sys, "argv", ["app.py", str(viz_circuit_dir)])  # the app reads argv
    at = AppTest.from_file(app, default_timeout=TIMEOUT)
    at.session_state["bridges_dir"] = str(made["dir"])
    at.run()
    assert "Bridges" in at.sidebar.radio(key="page").options
    at.sidebar.radio(key="page").set_value("Bridges").run()
    assert not at.exception and not at.error
    assert len(_frame(at, "KL d→s")) == len(made["meta"].sites) + 1


def test_the_page_imports_without_torch():
    code = ("import sys, sparsecircuits.viz.app_bridges, sparsecircuits.viz.bridges_data; "
            "print('torch' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert bd.FIDELITY_FILE == FIDELITY_FILE  # the torch-free copy of the name


def test_bridge_steer_records_no_fidelity_measured_on_other_bridges(made, tmp_path):
    from typer.testing import CliRunner

    from sparsecircuits.cli import app

    other = tmp_path / "other"
    shutil.copytree(made["root"] / "other", other)
    shutil.copy(made["dir"] / FIDELITY_FILE, other / FIDELITY_FILE)  # stale: other bridges'
    out = tmp_path / "steer.json"
    args = ["bridge", "steer", str(other), "--node", "1.attn_out.23", "--prompts", TASK,
            "--sparse", str(made["root"] / "sparse"), "--dense", str(made["root"] / "dense"),
            "--pairs", "4", "--side-pairs", "0", "--heldout-windows", "0", "--seeds", "1",
            "--json", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text()).get("site_fidelity") is None
