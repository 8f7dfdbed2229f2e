"""``sparsecircuits validate``: run the faithfulness checks of ``verify.py`` on a circuit file
and write ``report.json`` + ``report.md`` (failing checks are reported, never hidden)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sparsecircuits.circuits.pipeline import load_for_circuits
from sparsecircuits.circuits.schema import CIRCUIT_FILE, check_model, load_circuit
from sparsecircuits.circuits.verify import CHECKS, VerifyOptions, build_context, run_checks
from sparsecircuits.errors import CheckpointError, InputError, SparseCircuitsError
from sparsecircuits.fileio import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def validate(
    circuit: str | Path,
    *,
    model: str | None = None,
    out: str | Path | None = None,
    options: VerifyOptions | None = None,
    checks: Sequence[str] = CHECKS,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Check the circuit in ``circuit`` (a circuit.json or its directory) against ``model``
    (default: the model named in the file) and write the reports into ``out`` (default: the
    circuit's directory). Returns the report; ``seconds`` is wall time.

    Raises CheckpointError for a missing/invalid circuit file or a model whose weights differ,
    InputError for unknown check names or fewer than 2 seeds.
    """
    start = time.perf_counter()
    options = options or VerifyOptions()
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out}: not a directory (the reports go into a folder)")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise InputError(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    if options.seeds < 2:
        raise InputError(f"seed stability needs >= 2 seeds, got {options.seeds}")
    path = Path(circuit)
    path = path / CIRCUIT_FILE if path.is_dir() else path
    doc = load_circuit(path)
    try:
        lm = load_for_circuits(model or doc.model.id, device=device)
    except SparseCircuitsError as err:
        if model is not None:
            raise
        raise CheckpointError(f"{err} (the model recorded in {path}; pass --model)") from None
    check_model(doc, lm.model, source=str(path))
    log.info("validating %s: %s, %d nodes, target %.3f", path, doc.task, doc.n_nodes,
             doc.target_loss)  # fmt: skip
    ctx = build_context(doc, lm, options)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    results = [{**r, "run": stamp} for r in run_checks(ctx, list(checks))]
    dest = Path(out) if out is not None else path.parent
    if list(checks) != list(CHECKS):  # a subset updates an earlier report, never replaces it
        results = _merge(dest / REPORT_JSON, results, model_hash=lm.hash, circuit=str(path))
    report = {
        "circuit": str(path),
        "model": lm.spec,
        "model_hash": lm.hash,
        "task": doc.task,
        "n_nodes": doc.n_nodes,
        "target_loss": doc.target_loss,
        "ablation": doc.ablation,
        "calibration": doc.calibration.model_dump() if doc.calibration else None,
        "options": dataclasses.asdict(options),
        "checks": results,
        **tally(results),
        "seconds": round(time.perf_counter() - start, 1),
    }
    report = clean_json(report)
    write_report(dest, report)
    return report


def tally(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Counts of each verdict: passed, failed, not_applicable, info, uncertain."""
    v = [r["verdict"] for r in results]
    return {"passed": v.count("PASS"), "failed": v.count("FAIL"),
            "not_applicable": v.count("N/A"), "info": v.count("INFO"),
            "uncertain": sum(bool(r.get("uncertain")) for r in results)}  # fmt: skip


def _merge(
    path: Path, results: list[dict[str, Any]], *, model_hash: str, circuit: str
) -> list[dict[str, Any]]:
    """The checks of an earlier report at ``path`` (same circuit and model) with ``results``
    replacing those of the same name; report order kept. Unreadable or foreign: just
    ``results``."""
    try:
        old = json.loads(path.read_text())
        same = old.get("model_hash") == model_hash and old.get("circuit") == circuit
        earlier = old.get("checks", []) if same else []
    except (OSError, ValueError, AttributeError):
        earlier = []
    by_name = {c["name"]: c for c in earlier if isinstance(c, dict) and "verdict" in c}
    by_name.update({r["name"]: r for r in results})
    return [by_name[n] for n in CHECKS if n in by_name]


def clean_json(obj: Any) -> Any:
    """``obj`` with tuples as lists and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_report(directory: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``directory`` atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / REPORT_JSON, directory / REPORT_MD
    atomic_write_json(json_path, report)
    text = markdown(report)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return json_path, md_path


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "n/a"
    return str(v)


def _value(v: Any) -> str:
    """One line for a check's value: numbers to 4 significant digits, short lists inline."""
    if isinstance(v, list) and all(isinstance(x, int | float) for x in v):
        shown = ", ".join(_num(x) for x in v[:12])
        return f"[{shown}{', ...' if len(v) > 12 else ''}] ({len(v)} values)"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items())
    return _num(v)


def shown_verdict(check: dict[str, Any]) -> str:
    """``PASS``, ``FAIL``, ``N/A`` or ``INFO``, with ``(uncertain)`` when the verdict's 95%
    interval straddles its threshold."""
    return check["verdict"] + (" (uncertain)" if check.get("uncertain") else "")


def _details(check: dict[str, Any]) -> list[str]:
    lines = [f"### {check['name']}: {shown_verdict(check)}", ""]
    lines += [f"Criterion: {check['criterion']}.", "", check["summary"], ""]
    for key, v in check.items():
        if key in ("name", "verdict", "passed", "uncertain", "criterion", "summary"):
            continue
        if isinstance(v, list) and v and isinstance(v[0], dict):  # runs, curve points
            lines.append(f"- {key}:")
            lines += [f"  - {_value(item)}" for item in v]
        elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            lines.append(f"- {key}:")
            lines += [f"  - {k}: {_value(item)}" for k, item in v.items()]
        else:
            lines.append(f"- {key}: {_value(v)}")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: a verdict table, then each check's numbers."""
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    cal = report.get("calibration")
    cal_s = (
        f"a logit calibration fitted by pruning (scale {cal['scale']:.4g}, shift "
        f"{cal['shift']:.4g}) is applied where the circuit is judged against the target"
        if cal
        else "no logit calibration is used"
    )
    lines = [
        f"# Circuit validation: {report['task']}",
        "",
        f"Circuit `{report['circuit']}` ({report['n_nodes']} nodes, target loss "
        f"{report['target_loss']} nats per prompt, {report['ablation']} ablation) in model "
        f"`{report['model']}`. Losses are per-prompt mean two-token cross-entropy (nats) on the "
        f"held-out test templates unless stated; chance is ln 2 = 0.693; {cal_s}. Intervals "
        "are 95% bootstrap intervals over the held-out prompts; a verdict whose interval "
        "straddles its threshold is marked uncertain.",
        "",
        "| check | verdict | summary |",
        "|---|---|---|",
    ]
    for c in report["checks"]:
        lines.append(f"| {c['name']} | {shown_verdict(c)} | {cell(c['summary'])} |")
    lines += [
        "",
        f"**{report['passed']} passed, {report['failed']} failed, {report['not_applicable']} not "
        f"applicable, {report['info']} informational ({report['uncertain']} uncertain)** in "
        f"{report['seconds']} s"
        + (" (quick settings: a smoke test, not a verdict)" if report["options"]["quick"] else "")
        + ".",
        "",
        "## Details",
        "",
    ]  # fmt: skip
    for c in report["checks"]:
        lines += _details(c)
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    """A rich table of the checks' verdicts and summaries."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"validate {report['task']} ({report['n_nodes']} nodes)", show_lines=True)
    table.add_column("check")
    table.add_column("verdict")
    table.add_column("summary")
    for c in report["checks"]:
        style = {"PASS": "bold green", "FAIL": "bold red"}.get(c["verdict"], "bold yellow")
        table.add_row(c["name"], Text(shown_verdict(c), style=style), Text(c["summary"]))
    console = Console()
    console.print(table)
    console.print(
        f"{report['passed']} passed, {report['failed']} failed, {report['not_applicable']} not "
        f"applicable, {report['info']} informational ({report['uncertain']} uncertain) in "
        f"{report['seconds']} s"
    )
