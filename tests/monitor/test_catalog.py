"""The catalogue admits a circuit only when sufficiency and necessity pass, lists the others
with the failing check, stores the union of admitted nodes, and refuses another model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsecircuits.circuits import testing as T
from sparsecircuits.circuits.pipeline import load_for_circuits
from sparsecircuits.errors import CheckpointError, ConfigError
from sparsecircuits.monitor.catalog import CATALOG_FILE, build_catalog, load_catalog
from sparsecircuits.monitor.families import load_families
from tests.monitor.conftest import TASK_B


def test_a_circuit_failing_necessity_is_excluded_with_the_reason(catalog):
    good, bad = catalog.circuits[T.TASK], catalog.circuits[TASK_B]
    assert good.admitted and good.reason == ""
    assert {k: c.verdict for k, c in good.checks.items()} == {
        "sufficiency": "PASS", "necessity": "PASS"}  # fmt: skip
    assert not bad.admitted
    assert bad.checks["sufficiency"].verdict == "PASS"  # the 10-nat target is met
    assert bad.checks["necessity"].verdict == "FAIL"
    assert bad.reason.startswith("necessity FAIL: ablating only the 8 circuit nodes")
    quotes = catalog.families["quotes"]
    assert quotes.admitted == [T.TASK] and quotes.rejected == [TASK_B]
    assert catalog.families["decoys"].n_nodes == 0 and catalog.monitored() == ["quotes"]


def test_family_nodes_are_the_union_of_admitted_circuits(catalog, planted):
    want: dict[str, list[int]] = {}
    for n in T.PLANTED:
        want.setdefault(n.site, []).append(n.index)
    quotes = catalog.families["quotes"]
    assert quotes.nodes == {s: sorted(v) for s, v in sorted(want.items())}
    assert quotes.n_nodes == len(T.PLANTED)
    for site, idx in quotes.nodes.items():
        assert len(quotes.scale[site]) == len(quotes.mean[site]) == len(idx)
        assert all(s > 0 for s in quotes.scale[site])
    assert catalog.weights_hash == planted.hash
    tok = planted.tokenizer
    assert catalog.circuits[T.TASK].answers in (
        (tok.encode("'")[0], tok.encode('"')[0]),
        (tok.encode('"')[0], tok.encode("'")[0]),
    )


def test_a_catalogue_for_another_model_is_refused(catalog_dir, tmp_path, planted):
    other = load_for_circuits(str(T.save_planted_model(tmp_path / "other", seed=1)))
    assert other.hash != planted.hash
    load_catalog(catalog_dir, planted.model)  # the right model loads
    with pytest.raises(CheckpointError, match="weights hash") as err:
        load_catalog(catalog_dir, other.model)
    assert "\n" not in str(err.value)


def test_reused_circuits_must_match_task_and_model(planted, families_file, circuit_dirs, tmp_path):
    fams = load_families(families_file)
    swapped = {T.TASK: circuit_dirs[TASK_B], TASK_B: circuit_dirs[TASK_B]}
    with pytest.raises(ConfigError, match="not of 'planted_quote'"):
        build_catalog(planted, families=fams, out=tmp_path, reuse=swapped)
    with pytest.raises(ConfigError, match="no family lists"):
        build_catalog(planted, families=fams, out=tmp_path, reuse={"with_as": tmp_path})
    assert not (tmp_path / CATALOG_FILE).exists()


def test_load_catalog_errors_are_one_line(tmp_path: Path, catalog_dir: Path):
    with pytest.raises(CheckpointError, match="no such monitor catalogue"):
        load_catalog(tmp_path)
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"schema": "something.else"}))
    with pytest.raises(CheckpointError, match="not a monitor catalogue"):
        load_catalog(bad)
    data = json.loads((catalog_dir / CATALOG_FILE).read_text())
    data["families"]["quotes"]["nodes"] = "all"
    bad.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"families\.quotes\.nodes"):
        load_catalog(bad)


@pytest.mark.parametrize(
    ("results", "admitted", "reason"),
    [
        ([{"name": "sufficiency", "verdict": "PASS", "summary": "s"},
          {"name": "necessity", "verdict": "PASS", "summary": "n"}], True, ""),
        ([{"name": "sufficiency", "verdict": "PASS", "summary": "s", "uncertain": True},
          {"name": "necessity", "verdict": "PASS", "summary": "n"}], False,
         "sufficiency PASS (uncertain): s"),
        ([{"name": "sufficiency", "verdict": "FAIL", "summary": "s"},
          {"name": "necessity", "verdict": "PASS", "summary": "n"}], False, "sufficiency FAIL: s"),
        ([{"name": "sufficiency", "verdict": "PASS", "summary": "s"},
          {"name": "necessity", "verdict": "N/A", "summary": "n"}], False, "necessity N/A: n"),
    ],
)  # fmt: skip
def test_admission_needs_two_passes_and_strict_ones_certain_passes(results, admitted, reason):
    from sparsecircuits.monitor.catalog import admit

    assert admit(results, strict=True) == (admitted, reason)
    uncertain_only = any(r.get("uncertain") for r in results) and all(
        r["verdict"] == "PASS" for r in results
    )
    assert admit(results) == ((True, "") if uncertain_only else (admitted, reason))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["families"]["quotes"]["admitted"].append(TASK_B), "is not an admitted"),
        (lambda d: d["families"]["quotes"]["nodes"].update({"7.attn.q": [0]}) or
         d["families"]["quotes"]["scale"].update({"7.attn.q": [1.0]}) or
         d["families"]["quotes"]["mean"].update({"7.attn.q": [0.0]}), "not a node site"),
        (lambda d: d["families"]["quotes"]["nodes"].update(
            {k: [*v[:-1], 10_000] for k, v in list(d["families"]["quotes"]["nodes"].items())[:1]}),
         "outside"),
        (lambda d: d["families"]["quotes"]["scale"].update(
            {k: v[:-1] for k, v in list(d["families"]["quotes"]["scale"].items())[:1]}),
         "other numbers of scales"),
    ],
)  # fmt: skip
def test_an_edited_or_stale_catalogue_is_refused_on_load(catalog_dir, tmp_path, planted, edit,
                                                        message):  # fmt: skip
    data = json.loads((catalog_dir / CATALOG_FILE).read_text())
    edit(data)
    (tmp_path / CATALOG_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message) as err:
        load_catalog(tmp_path, planted.model)
    assert "\n" not in str(err.value)
