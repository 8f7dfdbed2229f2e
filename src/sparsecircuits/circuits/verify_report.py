"""``sparsecircuits validate``: run the faithfulness checks of ``verify.py`` on a circuit file
and write ``report.json`` + ``report.md`` (failing checks are reported, never hidden)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
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
    results = run_checks(ctx, list(checks))
    n_pass = sum(r["passed"] for r in results)
    report = {
        "circuit": str(path),
        "model": lm.spec,
        "model_hash": lm.hash,
        "task": doc.task,
        "n_nodes": doc.n_nodes,
        "target_loss": doc.target_loss,
        "ablation": doc.ablation,
        "options": dataclasses.asdict(options),
        "checks": results,
        "passed": n_pass,
        "failed": len(results) - n_pass,
        "seconds": round(time.perf_counter() - start, 1),
    }
    report = clean_json(report)
    write_report(Path(out) if out is not None else path.parent, report)
    return report


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


def _details(check: dict[str, Any]) -> list[str]:
    lines = [f"### {check['name']}: {'PASS' if check['passed'] else 'FAIL'}", ""]
    lines += [f"Criterion: {check['criterion']}.", "", check["summary"], ""]
    for key, v in check.items():
        if key in ("name", "passed", "criterion", "summary"):
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
    lines = [
        f"# Circuit validation: {report['task']}",
        "",
        f"Circuit `{report['circuit']}` ({report['n_nodes']} nodes, target loss "
        f"{report['target_loss']} nats per prompt, {report['ablation']} ablation) in model "
        f"`{report['model']}`. Losses are per-prompt mean two-token cross-entropy (nats) on the "
        "held-out test templates unless stated; chance is ln 2 = 0.693.",
        "",
        "| check | verdict | summary |",
        "|---|---|---|",
    ]
    for c in report["checks"]:
        verdict = "PASS" if c["passed"] else "FAIL"
        lines.append(f"| {c['name']} | {verdict} | {cell(c['summary'])} |")
    lines += [
        "",
        f"**{report['passed']} passed, {report['failed']} failed** in {report['seconds']} s"
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
        verdict = Text("PASS", style="bold green") if c["passed"] else Text("FAIL", "bold red")
        table.add_row(c["name"], verdict, Text(c["summary"]))
    console = Console()
    console.print(table)
    console.print(f"{report['passed']} passed, {report['failed']} failed in {report['seconds']} s")
