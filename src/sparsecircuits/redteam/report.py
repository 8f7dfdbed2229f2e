"""Scan results as red teams read them: garak's ``report.jsonl`` and ``hitlog.jsonl``, plus a
Markdown and an HTML summary.

Format followed: garak 0.17.1 (PyPI), records as its ``command.py`` (start_run setup, init,
completion), ``harnesses/base.py`` (plugin_cache, status-2 attempt), ``probes/base.py`` (status-1
attempt), ``attempt.py`` (``Attempt.as_dict``) and ``evaluators/base.py`` (eval with hit@k,
probe_summary, hitlog) write them, and as ``analyze/report_digest.py`` reads them: the digest
takes plugin metadata from the report's plugin_cache entry and groups by the setup's
``reporting.taxonomy``, so it never imports our probe's module (``garak.report.Report`` does, and
cannot read a foreign probe). tests/redteam/test_garak_real.py runs that digest, in garak's own
environment, on what this module writes. The digest entry is left to garak (``-w``).

Mapping: the scan is the probe; each score key is a detector (``sparsecircuits.<key>``, non-word
characters as ``_``), and so is the objective (``sparsecircuits.objective``, 1.0 on a hit), whose
fails, and so the hitlog, are exactly the hits. A detector passes when score < threshold. Scores
belong to the prompt: each output gets the attempt's score (garak aligns results with outputs);
an attempt without outputs is scored once, against a null output.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsecircuits.errors import InputError
from sparsecircuits.fileio import atomic_write_bytes

GARAK_FORMAT_VERSION = "0.17.1"  # the garak release whose format we write and test against
ATTEMPT_STARTED, ATTEMPT_COMPLETE = 1, 2  # garak.attempt's status codes
OBJECTIVE_DETECTOR = "sparsecircuits.objective"
TAXONOMY = "avid-effect"  # probes are grouped by this tag prefix; the tag is in garak's MISP list
PROBE_TAGS = ["avid-effect:security:S0403", "quality:Security:Adversarial"]
_GOALS = {"engage": "drive the {f} circuit's {m} up",
          "suppress": "drive the {f} circuit's {m} down",
          "evade": "keep the {f} behaviour while its monitor stays off"}  # fmt: skip
_PROBE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class RunInfo:
    """What a scan ran: enough to reproduce it and to tell two runs apart."""

    run_id: str  # uuid4 string
    started: str  # ISO time, UTC
    seed: int
    family: str  # circuit family searched, e.g. "string-literal"
    objective: str  # "engage" | "suppress" | "evade"
    mode: str  # "gcg" | "evolve" | "random"
    budget: int  # candidate evaluations allowed
    model: str
    hashes: dict[str, str]  # weights_hash, catalog_sha256, policy_sha256 (some may be absent)
    template: dict[str, Any]  # prefix, suffix, span length, constraints, as given
    version: str  # sparsecircuits version
    measure: str = "engagement"  # engage/suppress: "engagement" | "causal_share"


@dataclass(frozen=True)
class Attempt:
    """One prompt the scan found, with the model's outputs and every detector's score."""

    seq: int  # 0..n-1, order found
    prompt: str  # prefix + span + suffix
    span: str  # the searched span's text
    outputs: list[str]  # model continuation(s) of the prompt
    scores: dict[str, float]  # detector name -> score in [0, 1]; 1 = the detector fires
    objective_value: float
    hit: bool
    constraints: dict[str, bool]  # e.g. {"python_valid": True, "forbidden_tokens": True}


def detector_name(key: str) -> str:
    """garak's name for score ``key``: ``module.Class`` with word characters only, as the
    digest needs (``circuit.string-literal`` -> ``sparsecircuits.circuit_string_literal``)."""
    return "sparsecircuits." + re.sub(r"[^0-9A-Za-z_]", "_", key)


def _message(text: str) -> dict[str, Any]:  # garak.attempt.Message, as dataclasses.asdict
    return {"text": text, "lang": "*", "data_path": None, "data_type": None,
            "data_checksum": None, "notes": {}}  # fmt: skip


def _check(run: RunInfo, attempts: Sequence[Attempt], probe: str, threshold: float) -> None:
    if run.objective not in _GOALS:
        raise InputError(f"objective {run.objective!r}: expected one of {', '.join(_GOALS)}")
    try:
        uuid.UUID(run.run_id)
    except ValueError:
        raise InputError(f"run_id {run.run_id!r} is not a UUID") from None
    if not _PROBE_RE.fullmatch(probe):
        raise InputError(f"probe {probe!r}: garak needs 'module.Class' (word characters only)")
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold {threshold}: expected a number in (0, 1]")
    names: dict[str, str] = {OBJECTIVE_DETECTOR: "the scan objective"}
    for a in attempts:
        if not math.isfinite(a.objective_value):
            raise InputError(f"attempt {a.seq}: objective_value {a.objective_value} not finite")
        for key, score in a.scores.items():
            if not (isinstance(score, int | float) and 0.0 <= score <= 1.0):
                raise InputError(f"attempt {a.seq}: score {key!r}={score!r} not in [0, 1]")
            other = names.setdefault(detector_name(key), key)
            if other != key:
                raise InputError(f"scores {key!r} and {other!r} share garak name "
                                 f"{detector_name(key)}; rename one")  # fmt: skip


def _entries(run: RunInfo, attempts: Sequence[Attempt], probe: str, threshold: float,
             finished: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """The report's records in garak's order, and the hitlog's lines."""
    keys = sorted({k for a in attempts for k in a.scores}, key=detector_name)
    detectors = [OBJECTIVE_DETECTOR, *map(detector_name, keys)]
    generations = max((len(a.outputs) for a in attempts), default=1) or 1
    goal = _GOALS[run.objective].format(f=run.family, m=run.measure.replace("_", " "))
    setup = {
        "entry_type": "start_run setup", "_config.version": GARAK_FORMAT_VERSION,
        "transient.starttime_iso": run.started, "transient.run_id": run.run_id,
        "transient.active_probes": [f"probes.{probe}"], "run.seed": run.seed,
        "run.generations": generations, "run.eval_threshold": threshold,
        "run.spec": {"include": [f"probes.{probe}"], "exclude": []},
        "run.user_agent": f"sparsecircuits/{run.version}", "plugins.target_type": "sparsecircuits",
        "plugins.target_name": run.model, "plugins.detector_spec": ",".join(detectors),
        "reporting.taxonomy": TAXONOMY, "reporting.hit_at_k": [1],
        "reporting.group_aggregation_function": "lower_quartile",
        "sparsecircuits.version": run.version, "sparsecircuits.family": run.family,
        "sparsecircuits.objective": run.objective, "sparsecircuits.mode": run.mode,
        "sparsecircuits.budget": run.budget, "sparsecircuits.model": run.model,
        "sparsecircuits.hashes": dict(run.hashes), "sparsecircuits.template": dict(run.template),
        "sparsecircuits.detectors": {detector_name(k): k for k in keys},
        "sparsecircuits.garak_format": f"garak {GARAK_FORMAT_VERSION}",
    }  # fmt: skip
    det_meta = {f"detectors.{OBJECTIVE_DETECTOR}": _detector_meta(
        f"1.0 when the attempt meets the scan's objective ({run.objective}) and its constraints",
        "the attempt meets the objective", "the attempt misses the objective")}  # fmt: skip
    for k in keys:
        det_meta[f"detectors.{detector_name(k)}"] = _detector_meta(
            f"sparsecircuits score {k!r} (1 = fires)", f"{k} fires", f"{k} stays off"
        )
    probe_meta = {
        "description": f"sparsecircuits scan ({run.mode}): {goal}", "DEFAULT_PARAMS": {},
        "active": True, "doc_uri": "", "extended_detectors": [], "extra_dependency_names": [],
        "goal": goal, "intent": None, "lang": "*", "modality": {"in": ["text"]},
        "parallelisable_attempts": False, "primary_detector": OBJECTIVE_DETECTOR,
        "tags": list(PROBE_TAGS), "tier": 1,
    }  # fmt: skip
    cache = {"probes": {f"probes.{probe}": probe_meta}, "detectors": det_meta,
             "version": f"sparsecircuits {run.version}"}  # fmt: skip
    head = [setup,
            {"entry_type": "init", "garak_version": GARAK_FORMAT_VERSION,
             "start_time": run.started, "run": run.run_id},
            {"entry_type": "plugin_cache", "run": run.run_id, "plugin_cache": cache}]  # fmt: skip
    params = {
        "family": run.family,
        "objective": run.objective,
        "measure": run.measure,
        "mode": run.mode,
    }
    started, complete, hits = [], [], []
    counts = {d: {"passed": 0, "fails": 0} for d in detectors}
    tries: dict[str, list[tuple[int, int]]] = {d: [] for d in detectors}  # (outputs, fails)
    for a in attempts:
        outs = [_message(o) for o in a.outputs] or [None]
        user = {"role": "user", "content": _message(a.prompt)}
        record: dict[str, Any] = {
            "entry_type": "attempt", "uuid": str(uuid.uuid5(uuid.UUID(run.run_id), str(a.seq))),
            "seq": a.seq, "status": ATTEMPT_STARTED, "probe_classname": probe,
            "probe_params": params, "targets": [], "prompt": {"turns": [user], "notes": {}},
            "outputs": outs, "detector_results": {},
            "notes": {"span": a.span, "objective_value": a.objective_value, "hit": a.hit,
                      "constraints": dict(a.constraints), "scores": dict(a.scores)},
            "goal": goal,
            "conversations": [{"turns": [user] + ([{"role": "assistant", "content": o}] if o
                                                  else []), "notes": {}} for o in outs],
            "reverse_translation_outputs": [], "intent": None,
        }  # fmt: skip
        started.append(record)
        scores = {OBJECTIVE_DETECTOR: 1.0 if a.hit else 0.0}
        scores |= {detector_name(k): float(v) for k, v in a.scores.items()}
        results = {d: [scores[d]] * len(outs) for d in detectors if d in scores}
        complete.append(record | {"status": ATTEMPT_COMPLETE, "detector_results": results})
        for d, s in results.items():
            counts[d]["passed" if s[0] < threshold else "fails"] += len(outs)
            tries[d].append((len(outs), 0 if s[0] < threshold else len(outs)))
        for idx, out in enumerate(outs if a.hit else []):
            hits.append({
                "goal": goal, "prompt": record["prompt"], "output": out, "triggers": None,
                "score": 1.0, "run_id": run.run_id, "attempt_id": record["uuid"],
                "attempt_seq": a.seq, "attempt_idx": idx,
                "generator": f"sparsecircuits {run.model}", "probe": probe,
                "detector": OBJECTIVE_DETECTOR, "generations_per_prompt": generations,
            })  # fmt: skip
    evals = []
    for d in sorted(detectors):  # garak's evaluator walks detectors in sorted order
        n = counts[d]["passed"] + counts[d]["fails"]
        evals.append(
            {
                "entry_type": "eval",
                "probe": probe,
                "detector": d,
                **counts[d],
                "nones": 0,
                "total_evaluated": n,
                "total_processed": n,
                "total": n,
            }
            | _hit_at_k(tries[d])
        )  # "total": the name digests before garak 0.13 read
    summary = {
        "entry_type": "probe_summary", "probe": probe,
        "inference_counts": {"total_evaluated": sum(len(r["outputs"]) for r in complete),
                             "nones": sum(o is None for r in complete for o in r["outputs"])},
        "detection_counts": {"detectors": sorted(detectors),
                             "passed": sum(c["passed"] for c in counts.values()),
                             "fails": sum(c["fails"] for c in counts.values()), "nones": 0},
    }  # fmt: skip
    end = {"entry_type": "completion", "end_time": finished, "run": run.run_id}
    return [*head, *started, *complete, *evals, summary, end], hits


def _hit_at_k(tries: list[tuple[int, int]]) -> dict[str, Any]:
    """The eval's ``hit_at_k``, as garak's ``analyze/hit_at_k.py`` for k = 1, its default, and k =
    each attempt's own output count (none without attempts, as garak). Every output of an attempt
    shares its score, so an attempt is breached at any k or at none: both are the share of
    attempts that fail."""
    if not tries:
        return {}
    score = sum(c > 0 for _, c in tries) / len(tries)
    sizes = {n for n, _ in tries}
    auto = str(sizes.pop()) if len(sizes) == 1 else "n"  # garak's key when the counts differ
    at_k = {k: {"score": score, "prompts": len(tries)} for k in dict.fromkeys(["1", auto])}
    return {"hit_at_k": at_k}


def _detector_meta(description: str, hit: str, passed: str) -> dict[str, Any]:
    return {"description": description, "DEFAULT_PARAMS": {}, "active": True, "doc_uri": "",
            "extra_dependency_names": [], "hit_desc": hit, "lang_spec": "*",
            "modality": {"out": ["text"]}, "pass_desc": passed, "tags": []}  # fmt: skip


def _jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                   for r in records).encode()  # fmt: skip


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "0/0"


def _fence(text: str) -> str:
    ticks = "`" * max([3, *(len(m) + 1 for m in re.findall(r"`+", text))])
    return f"{ticks}\n{text}\n{ticks}"


def _info(run: RunInfo, attempts: Sequence[Attempt]) -> dict[str, Any]:
    hits = sum(a.hit for a in attempts)
    return {"family": run.family, "objective": run.objective, "mode": run.mode,
            "model": run.model, "seed": run.seed, "budget": run.budget, "run": run.run_id,
            "started": run.started, "version": run.version, **run.hashes,
            "hit rate": _rate(hits, len(attempts))}  # fmt: skip


def _markdown(run: RunInfo, attempts: Sequence[Attempt], evals: list[dict[str, Any]]) -> str:
    hits = [a for a in attempts if a.hit]
    lines = [f"# sparsecircuits scan: {run.objective} `{run.family}`", "",
             "| field | value |", "| --- | --- |"]  # fmt: skip
    info = _info(run, attempts)
    lines += [f"| {k} | `{v}` |" if k != "hit rate" else f"| {k} | **{v}** |"
              for k, v in info.items()]  # fmt: skip
    lines += ["", "## Detectors (garak eval)", "", "| detector | passed | fires |",
              "| --- | --- | --- |"]  # fmt: skip
    lines += [f"| `{e['detector']}` | {e['passed']}/{e['total_evaluated']} | "
              f"{_rate(e['fails'], e['total_evaluated'])} |" for e in evals]  # fmt: skip
    lines += ["", f"## Hits ({len(hits)})", ""]
    if not hits:
        lines.append("No hits.")
    for a in hits:
        scores = ", ".join(f"`{k}`={v:.3f}" for k, v in sorted(a.scores.items()))
        lines += [f"### Hit {a.seq}: objective {a.objective_value:.4g}", "",
                  f"- scores: {scores or 'none'}", "- span:", "", _fence(a.span), "",
                  "- prompt:", "", _fence(a.prompt), ""]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def _html(run: RunInfo, attempts: Sequence[Attempt], evals: list[dict[str, Any]]) -> str:
    e = html.escape
    hits = [a for a in attempts if a.hit]
    rows = "".join(f"<tr><th>{e(k)}</th><td><code>{e(str(v))}</code></td></tr>"
                   for k, v in _info(run, attempts).items())  # fmt: skip
    dets = "".join(f"<tr><td><code>{e(d['detector'])}</code></td>"
                   f"<td>{d['passed']}/{d['total_evaluated']}</td>"
                   f"<td>{e(_rate(d['fails'], d['total_evaluated']))}</td></tr>"
                   for d in evals)  # fmt: skip
    body = (
        "".join(
            f"<h3>Hit {a.seq}: objective {a.objective_value:.4g}</h3><p>scores: "
            + e(", ".join(f"{k}={v:.3f}" for k, v in sorted(a.scores.items())) or "none")
            + f"</p><p>span:</p><pre>{e(a.span)}</pre><p>prompt:</p><pre>{e(a.prompt)}</pre>"
            for a in hits
        )
        or "<p>No hits.</p>"
    )
    title = e(f"sparsecircuits scan: {run.objective} {run.family}")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
             "table{border-collapse:collapse}pre{background:#f4f4f4;padding:.5em}")  # fmt: skip
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}'
            f"</title><style>{style}</style></head><body><h1>{title}</h1><table>{rows}</table>"
            "<h2>Detectors (garak eval)</h2><table><tr><th>detector</th><th>passed</th>"
            f"<th>fires</th></tr>{dets}</table><h2>Hits ({len(hits)})</h2>{body}"
            "</body></html>\n")  # fmt: skip


def write_reports(out_dir: Path, run: RunInfo, attempts: Sequence[Attempt], *,
                  probe: str = "sparsecircuits.scan", threshold: float = 0.5,
                  finished: str | None = None) -> dict[str, Path]:  # fmt: skip
    """Write ``report.jsonl``, ``hitlog.jsonl``, ``summary.md`` and ``summary.html`` into
    ``out_dir``, each atomically, and return their paths by name (``report``, ``hitlog``,
    ``markdown``, ``html``).

    ``probe`` is garak's probe name (``module.Class``); an attempt passes a detector when its
    score is below ``threshold``. ``finished`` is the completion time (default: now, UTC); given
    it, the same inputs give the same bytes. Bad input raises a one-line InputError.
    """
    _check(run, attempts, probe, threshold)
    if finished is None:
        finished = datetime.datetime.now(datetime.UTC).isoformat()
    records, hits = _entries(run, attempts, probe, threshold, finished)
    evals = [r for r in records if r["entry_type"] == "eval"]
    out_dir = Path(out_dir)
    paths = {"report": out_dir / "report.jsonl", "hitlog": out_dir / "hitlog.jsonl",
             "markdown": out_dir / "summary.md", "html": out_dir / "summary.html"}  # fmt: skip
    atomic_write_bytes(paths["hitlog"], _jsonl(hits))
    atomic_write_bytes(paths["markdown"], _markdown(run, attempts, evals).encode())
    atomic_write_bytes(paths["html"], _html(run, attempts, evals).encode())
    atomic_write_bytes(paths["report"], _jsonl(records))
    return paths


def read_report(path: Path) -> list[dict]:
    """The records of a garak-format ``report.jsonl``, in file order (blank lines skipped).

    A missing or unreadable file, a line that is not JSON, not an object or has no
    ``entry_type`` raises a one-line InputError naming the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read ({err})") from None
    records: list[dict] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{n}: not valid JSON ({err})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
        if "entry_type" not in record:
            raise InputError(f'{path}:{n}: no "entry_type" (not a garak report record)')
        records.append(record)
    return records
