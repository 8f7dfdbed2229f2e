"""The scan's garak-format report, hitlog and summaries (sparsecircuits.redteam.report)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sparsecircuits.errors import InputError
from sparsecircuits.redteam.report import (
    GARAK_FORMAT_VERSION,
    OBJECTIVE_DETECTOR,
    TAXONOMY,
    Attempt,
    RunInfo,
    detector_name,
    read_report,
    write_reports,
)

RUN_ID = "6f1c2a0e-3b7d-4c59-9a8e-2d4f5b6c7d8e"
FINISHED = "2026-01-01T00:01:00+00:00"
CIRCUIT, DENSE = "circuit.string-literal", "dense_probe"


def _run(**over) -> RunInfo:
    fields = dict(
        run_id=RUN_ID,
        started="2026-01-01T00:00:00+00:00",
        seed=1234,
        family="string-literal",
        objective="evade",
        mode="gcg",
        budget=512,
        model="tiny-sparse",
        hashes={"weights_hash": "w" * 64, "catalog_sha256": "c" * 64},
        template={"prefix": "x = '", "suffix": "'\n", "span_tokens": 4, "python": True},
        version="0.1.0",
    )
    return RunInfo(**{**fields, **over})


def _attempt(seq: int, span: str, *, hit: bool, circuit: float, dense: float, **over) -> Attempt:
    fields = dict(
        seq=seq,
        prompt=f"x = '{span}'\n",
        span=span,
        outputs=[f"out {seq}"],
        scores={CIRCUIT: circuit, DENSE: dense},
        objective_value=-circuit,
        hit=hit,
        constraints={"python_valid": True, "forbidden_tokens": True, "fluency": True},
    )
    return Attempt(**{**fields, **over})


ATTEMPTS = [
    _attempt(0, "<script>alert(1)</script>", hit=True, circuit=0.1, dense=0.7),
    _attempt(1, "abc", hit=False, circuit=0.93, dense=0.2),
    _attempt(2, "a```b & c", hit=True, circuit=0.05, dense=0.5),
    _attempt(3, "zzz", hit=False, circuit=0.5, dense=0.49),
]


@pytest.fixture
def written(tmp_path: Path) -> dict[str, Path]:
    return write_reports(tmp_path / "out", _run(), ATTEMPTS, finished=FINISHED)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _complete(records: list[dict]) -> list[dict]:
    return [r for r in records if r["entry_type"] == "attempt" and r["status"] == 2]


def test_paths_and_no_temp_files_left(written):
    assert set(written) == {"report", "hitlog", "markdown", "html"}
    names = sorted(p.name for p in written["report"].parent.iterdir())
    assert names == ["hitlog.jsonl", "report.jsonl", "summary.html", "summary.md"]


def test_round_trip(written):
    records = read_report(written["report"])
    assert records == _lines(written["report"])
    complete = _complete(records)
    assert [r["seq"] for r in complete] == [a.seq for a in ATTEMPTS]
    for rec, a in zip(complete, ATTEMPTS, strict=True):
        assert rec["prompt"]["turns"][0]["content"]["text"] == a.prompt
        assert [o["text"] for o in rec["outputs"]] == a.outputs
        assert rec["notes"]["span"] == a.span
        assert rec["notes"]["scores"] == a.scores
        assert rec["notes"]["hit"] is a.hit
        assert rec["notes"]["objective_value"] == a.objective_value
        assert rec["notes"]["constraints"] == a.constraints
        assert rec["detector_results"][detector_name(CIRCUIT)] == [a.scores[CIRCUIT]]
        assert rec["detector_results"][OBJECTIVE_DETECTOR] == [1.0 if a.hit else 0.0]


def test_entry_types_in_garak_order(written):
    kinds = [r["entry_type"] for r in read_report(written["report"])]
    code = {"start_run setup": "S", "init": "I", "plugin_cache": "P", "attempt": "A",
            "eval": "E", "probe_summary": "R", "completion": "C"}  # fmt: skip
    assert re.fullmatch("SIPA+E+RC", "".join(code[k] for k in kinds))
    attempts = [r for r in read_report(written["report"]) if r["entry_type"] == "attempt"]
    # garak logs every attempt when generated (status 1), then again once detected (status 2)
    assert [r["status"] for r in attempts] == [1] * len(ATTEMPTS) + [2] * len(ATTEMPTS)
    assert all(r["detector_results"] == {} for r in attempts[: len(ATTEMPTS)])
    assert [r["uuid"] for r in attempts[: len(ATTEMPTS)]] == [r["uuid"] for r in attempts[4:]]
    assert len({r["uuid"] for r in attempts}) == len(ATTEMPTS)


def test_eval_counts_match_the_attempts(written):
    evals = {r["detector"]: r for r in read_report(written["report"]) if r["entry_type"] == "eval"}
    assert list(evals) == sorted(evals)  # garak's evaluator walks detectors in sorted order
    assert set(evals) == {OBJECTIVE_DETECTOR, detector_name(CIRCUIT), detector_name(DENSE)}
    for key in (CIRCUIT, DENSE):
        e = evals[detector_name(key)]
        passed = sum(a.scores[key] < 0.5 for a in ATTEMPTS)
        assert (e["passed"], e["fails"], e["nones"]) == (passed, len(ATTEMPTS) - passed, 0)
        assert e["total_evaluated"] == e["total_processed"] == e["total"] == len(ATTEMPTS)
        assert e["probe"] == "sparsecircuits.scan"
        # garak's hit@k: one output per attempt, so k = 1 is also each attempt's own count
        assert e["hit_at_k"] == {"1": {"score": e["fails"] / len(ATTEMPTS), "prompts": 4}}
    hits = sum(a.hit for a in ATTEMPTS)
    assert evals[OBJECTIVE_DETECTOR]["fails"] == hits
    assert evals[OBJECTIVE_DETECTOR]["passed"] == len(ATTEMPTS) - hits


def test_threshold_decides_pass(tmp_path):
    paths = write_reports(tmp_path, _run(), ATTEMPTS, threshold=0.95, finished=FINISHED)
    evals = {r["detector"]: r for r in read_report(paths["report"]) if r["entry_type"] == "eval"}
    assert evals[detector_name(CIRCUIT)]["passed"] == len(ATTEMPTS)
    assert evals[OBJECTIVE_DETECTOR]["fails"] == sum(a.hit for a in ATTEMPTS)


def test_hitlog_holds_exactly_the_hits(written):
    lines = _lines(written["hitlog"])
    assert [h["attempt_seq"] for h in lines] == [a.seq for a in ATTEMPTS if a.hit]
    uuids = {r["seq"]: r["uuid"] for r in _complete(read_report(written["report"]))}
    for h in lines:
        # the fields garak.evaluators.base.Evaluator._evaluate_one_detector writes
        assert set(h) >= {"goal", "prompt", "output", "triggers", "score", "run_id",
                          "attempt_id", "attempt_seq", "attempt_idx", "generator", "probe",
                          "detector", "generations_per_prompt"}  # fmt: skip
        assert h["attempt_id"] == uuids[h["attempt_seq"]]
        assert h["run_id"] == RUN_ID and h["detector"] == OBJECTIVE_DETECTOR
        assert h["prompt"]["turns"][0]["content"]["text"] == ATTEMPTS[h["attempt_seq"]].prompt


def test_no_hits_gives_an_empty_hitlog(tmp_path):
    misses = [_attempt(0, "q", hit=False, circuit=0.9, dense=0.9)]
    paths = write_reports(tmp_path, _run(objective="engage"), misses, finished=FINISHED)
    assert paths["hitlog"].read_bytes() == b""
    assert "No hits." in paths["markdown"].read_text(encoding="utf-8")


def test_setup_records_hashes_seed_and_run(written):
    records = read_report(written["report"])
    setup, init = records[0], records[1]
    assert setup["run.seed"] == 1234
    assert setup["sparsecircuits.hashes"] == _run().hashes
    assert setup["sparsecircuits.template"] == _run().template
    assert setup["transient.run_id"] == init["run"] == RUN_ID == records[-1]["run"]
    assert setup["plugins.target_name"] == "tiny-sparse"
    assert setup["_config.version"] == init["garak_version"] == GARAK_FORMAT_VERSION
    # garak 0.17.1 writes the probe selection as run.spec (plugins.probe_spec is deprecated)
    assert setup["run.spec"] == {"include": ["probes.sparsecircuits.scan"], "exclude": []}
    assert "plugins.probe_spec" not in setup
    assert setup["sparsecircuits.family"] == "string-literal"
    assert setup["sparsecircuits.objective"] == "evade"
    assert setup["sparsecircuits.detectors"] == {detector_name(k): k for k in (CIRCUIT, DENSE)}
    assert records[-1]["end_time"] == FINISHED


def test_same_inputs_give_the_same_bytes(tmp_path):
    a = write_reports(tmp_path / "a", _run(), ATTEMPTS, finished=FINISHED)
    b = write_reports(tmp_path / "b", _run(), ATTEMPTS, finished=FINISHED)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name


def test_summaries_name_the_run_and_list_the_hits(written):
    md = written["markdown"].read_text(encoding="utf-8")
    page = written["html"].read_text(encoding="utf-8")
    for text in (md, page):
        assert "string-literal" in text and "evade" in text
        assert "2/4 (50.0%)" in text  # the hit rate
        assert "Hit 0" in text and "Hit 2" in text and "Hit 1" not in text
        assert "w" * 64 in text and "1234" in text
    assert ATTEMPTS[0].prompt in md and "````\nx = 'a```b & c'\n\n````" in md
    assert "<script>" not in page  # prompts are escaped, never raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a```b &amp; c" in page


def test_outputs_align_with_detector_results(tmp_path):
    attempts = [
        _attempt(0, "a", hit=True, circuit=0.1, dense=0.1, outputs=["o1", "o2"]),
        _attempt(1, "b", hit=False, circuit=0.9, dense=0.1, outputs=[]),
    ]
    paths = write_reports(tmp_path, _run(), attempts, finished=FINISHED)
    records = read_report(paths["report"])
    complete = _complete(records)
    for rec in complete:
        assert all(len(v) == len(rec["outputs"]) for v in rec["detector_results"].values())
        assert len(rec["conversations"]) == len(rec["outputs"])
    assert complete[1]["outputs"] == [None]  # scored once, against a null output
    evals = {r["detector"]: r for r in records if r["entry_type"] == "eval"}
    assert evals[detector_name(CIRCUIT)]["total_evaluated"] == 3
    assert [h["attempt_idx"] for h in _lines(paths["hitlog"])] == [0, 1]
    assert records[0]["run.generations"] == 2
    # output counts 2 and 1 (the null output): garak keys the own-count bucket "n"
    at_k = {"score": 0.5, "prompts": 2}  # attempt 0 fires the objective, attempt 1 does not
    assert evals[OBJECTIVE_DETECTOR]["hit_at_k"] == {"1": at_k, "n": at_k}


def test_detectors_may_differ_between_attempts(tmp_path):
    attempts = [
        _attempt(0, "a", hit=True, circuit=0.1, dense=0.1),
        _attempt(1, "b", hit=False, circuit=0.9, dense=0.1, scores={CIRCUIT: 0.9}),
    ]
    paths = write_reports(tmp_path, _run(), attempts, finished=FINISHED)
    evals = {r["detector"]: r for r in read_report(paths["report"]) if r["entry_type"] == "eval"}
    assert evals[detector_name(DENSE)]["total_evaluated"] == 1
    assert evals[detector_name(CIRCUIT)]["total_evaluated"] == 2


# What garak's report-digest tooling reads, in garak 0.17.1 (GARAK_FORMAT_VERSION; the digest
# itself runs on our reports in test_garak_real.py): garak/analyze/report_digest.py
# `_parse_report`, `_report_header_content`, `_init_populate_result_db`, `_get_probe_info`,
# `_get_probe_detector_details`; the `__main__` block reads "reporting.taxonomy" from the setup;
# garak/analyze/analyze_log.py and qual_review.py read the attempt fields;
# garak/analyze/tbsa.py parses garak_version as x.y.z.
DIGEST_INIT_FIELDS = {"garak_version", "start_time", "run"}
DIGEST_SETUP_FIELDS = {"transient.active_probes", "plugins.target_type", "plugins.target_name",
                       "reporting.taxonomy"}  # fmt: skip
DIGEST_EVAL_FIELDS = {"probe", "detector", "passed", "total_evaluated"}
GARAK_EVAL_FIELDS = DIGEST_EVAL_FIELDS | {"fails", "nones", "total_processed", "hit_at_k"}
DIGEST_PROBE_META = {"description", "tags", "tier"}  # _get_probe_info's required_fields
DIGEST_DETECTOR_META = {"description"}  # _get_probe_detector_details's required_fields
DIGEST_PROBE_SUMMARY = {"probe", "inference_counts", "detection_counts"}
# garak/attempt.py Attempt.as_dict and its Message dataclass
ATTEMPT_FIELDS = {"uuid", "seq", "status", "probe_classname", "probe_params", "targets",
                  "prompt", "outputs", "detector_results", "notes", "goal", "conversations",
                  "reverse_translation_outputs", "intent"}  # fmt: skip
MESSAGE_FIELDS = {"text", "lang", "data_path", "data_type", "data_checksum", "notes"}
# garak/data/tags.misp.tsv: the digest titles a taxonomy group by its tag from this list
MISP_TAG = "avid-effect:security:S0403"


def test_records_carry_every_field_garak_digest_reads(written):
    records = read_report(written["report"])
    by_type: dict[str, list[dict]] = {}
    for r in records:
        by_type.setdefault(r["entry_type"], []).append(r)
    setup, init = by_type["start_run setup"][0], by_type["init"][0]
    assert set(setup) >= DIGEST_SETUP_FIELDS and set(init) >= DIGEST_INIT_FIELDS
    assert setup["reporting.taxonomy"] == TAXONOMY
    assert [int(x) for x in init["garak_version"].split(".")[:2]] >= [0, 15]
    cache: dict = {}
    for entry in by_type["plugin_cache"]:  # merged as _parse_report does
        for category, entries in entry["plugin_cache"].items():
            if category == "version":
                cache["version"] = entries
            else:
                cache.setdefault(category, {}).update(entries)
    assert "version" in cache
    for e in by_type["eval"]:
        assert set(e) >= GARAK_EVAL_FIELDS
        probe = e["probe"].replace("probes.", "")
        pm, pc = probe.split(".")  # the digest unpacks exactly two parts
        meta = cache["probes"][f"probes.{pm}.{pc}"]
        assert set(meta) >= DIGEST_PROBE_META
        assert all(meta[k] is not None for k in DIGEST_PROBE_META)  # _resolve_plugin_info
        groups = [t for t in meta["tags"] if t.split(":")[0] == setup["reporting.taxonomy"]]
        assert groups == [MISP_TAG]
        detector = re.sub(r"[^0-9A-Za-z_.]", "", e["detector"].replace("detector.", ""))
        assert detector == e["detector"]  # the digest's sanitising leaves our names alone
        dm, dc = detector.split(".")
        assert set(cache["detectors"][f"detectors.{dm}.{dc}"]) >= DIGEST_DETECTOR_META
    for s in by_type["probe_summary"]:
        assert set(s) >= DIGEST_PROBE_SUMMARY and s["probe"] in {
            e["probe"] for e in by_type["eval"]
        }
    for a in by_type["attempt"]:
        assert set(a) >= ATTEMPT_FIELDS and a["probe_classname"] == "sparsecircuits.scan"
        assert set(a["prompt"]["turns"][0]["content"]) == MESSAGE_FIELDS
        assert all(set(o) == MESSAGE_FIELDS for o in a["outputs"])
    assert set(by_type["completion"][0]) == {"entry_type", "end_time", "run"}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"entry_type": "init"}\nnot json\n', ":2: not valid JSON"),
        ('{"entry_type": "init"}\n\n[1, 2]\n', ":3: expected a JSON object, got list"),
        ('{"entry_type": "init"}\n{"probe": "x"}\n', ':2: no "entry_type"'),
        (b"\xff\xfe\n", "cannot read"),
    ],
)
def test_read_report_bad_input_is_one_line(tmp_path, text, says):
    path = tmp_path / "report.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError) as err:
        read_report(path)
    assert str(path) + says in str(err.value) if says.startswith(":") else says in str(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_report_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_report(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    ("run", "attempts", "probe", "says"),
    [
        (_run(objective="explode"), ATTEMPTS, "sparsecircuits.scan", "objective 'explode'"),
        (_run(run_id="run-1"), ATTEMPTS, "sparsecircuits.scan", "not a UUID"),
        (_run(), ATTEMPTS, "sparsecircuits", "module.Class"),
        (_run(), ATTEMPTS, "a.b.c", "module.Class"),
        (_run(), [_attempt(0, "a", hit=True, circuit=1.5, dense=0.0)], "x.y", "not in [0, 1]"),
        (
            _run(),
            [_attempt(0, "a", hit=True, circuit=0.1, dense=0.0, objective_value=float("nan"))],
            "x.y",
            "not finite",
        ),
        (
            _run(),
            [_attempt(0, "a", hit=True, circuit=0.1, dense=0.0, scores={"a-b": 0.1, "a.b": 0.2})],
            "x.y",
            "share garak name",
        ),
        (
            _run(),
            [_attempt(0, "a", hit=True, circuit=0.1, dense=0.0, scores={"objective": 0.1})],
            "x.y",
            "share garak name",
        ),
    ],
)
def test_write_reports_bad_input_is_one_line(tmp_path, run, attempts, probe, says):
    with pytest.raises(InputError, match=re.escape(says)) as err:
        write_reports(tmp_path / "out", run, attempts, probe=probe)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_threshold(tmp_path):
    with pytest.raises(InputError, match="threshold"):
        write_reports(tmp_path, _run(), ATTEMPTS, threshold=0.0)
