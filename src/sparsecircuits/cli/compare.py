"""``sparsecircuits compare``: circuit sizes of a weight-sparse model and dense baselines, as the
paper ran it (registered on the main app; the work is in ``circuits/compare.py``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sparsecircuits.cli.circuits import prune_config
from sparsecircuits.cli.common import DEFAULT_MODEL, Device
from sparsecircuits.errors import InputError

KIND_LABELS = {"sparse": "sparse", "dense": "dense", "dense_matched": "matched"}


def parse_targets(text: str | None) -> tuple[float, ...]:
    """``"0.1,0.15,0.3"`` -> (0.1, 0.15, 0.3); None -> (). Empty lists and non-numbers are
    one-line errors."""
    if text is None:
        return ()
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise InputError(f"--targets {text!r}: give target losses, e.g. --targets 0.1,0.15,0.3")
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"--targets {text!r}: not a comma-separated list of numbers") from None


def register(app: typer.Typer) -> None:
    """Add ``compare`` to ``app``."""

    @app.command("compare")
    def compare_cmd(
        sparse: Annotated[str, typer.Option(help="weight-sparse model")] = DEFAULT_MODEL,
        dense: Annotated[str, typer.Option(help="dense baseline")] = "stdlib-dense",
        task: Annotated[list[str], typer.Option("--task", help="tasks (default: all 20)")] = [],  # noqa: B006
        target: Annotated[
            float | None, typer.Option(help="primary target loss per prompt (masks trained at it)")
        ] = None,
        targets: Annotated[
            str | None, typer.Option(help="more targets, comma-separated, e.g. 0.1,0.15,0.3")
        ] = None,
        steps: Annotated[int | None, typer.Option(help="mask steps of the centre config")] = None,
        set_: Annotated[list[str], typer.Option("--set", help="KEY=VALUE PruneConfig field")] = [],  # noqa: B006
        trials: Annotated[int, typer.Option(help="search trials per model and task")] = 6,
        budget_per_model: Annotated[
            float, typer.Option(help="search seconds per model, split evenly over the tasks")
        ] = 3600.0,
        eval_windows: Annotated[
            int | None, typer.Option(help="held-out windows for pretraining losses (0: skip)")
        ] = None,
        eval_corpus: Annotated[
            str | None, typer.Option(help="corpus of the pretraining losses (default: sparse's)")
        ] = None,
        dense_matched: Annotated[
            str | None, typer.Option(help="dense model at the sparse model's held-out loss")
        ] = None,
        allow_different_tokenizers: Annotated[
            bool, typer.Option("--allow-different-tokenizers", help="compare losses anyway")
        ] = False,
        out: Annotated[
            Path | None, typer.Option(help="compare.json + circuits (resumable)")
        ] = None,
        json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
        device: Device = "auto",
        cache_dir: Annotated[
            Path | None, typer.Option(help="token cache (held-out losses)")
        ] = None,
    ) -> None:
        """Prune every task on the sparse and dense models under one search budget per model;
        judge circuits on held-out templates; report weight edges and geometric-mean ratios."""
        from sparsecircuits import tasks as task_registry
        from sparsecircuits.circuits.compare import CompareOptions, compare_models
        from sparsecircuits.train.distributed import resolve_device

        names = list(task) or task_registry.names(include_controls=False)
        for n in names:
            task_registry.get(n)  # unknown names fail before any work
        cfg = prune_config(dict(target_loss=target, steps=steps), set_)
        options = CompareOptions(
            targets=parse_targets(targets),
            trials=trials,
            budget_per_model_s=budget_per_model,
            eval_windows=eval_windows,
            eval_corpus=eval_corpus,
            dense_matched=dense_matched,
            allow_different_tokenizers=allow_different_tokenizers,
            cache_dir=cache_dir,
        )
        result = compare_models(
            sparse,
            dense,
            names,
            cfg,
            options=options,
            device=resolve_device(device),
            out=out,
            on_task=_progress,
        )
        if json_out:
            typer.echo(json.dumps(result, indent=2))
        else:
            print_comparison(result)


def _progress(task: str, result: dict[str, Any]) -> None:
    from rich.console import Console

    row = result["tasks"][task]
    parts = [
        f"{KIND_LABELS[k]} {r['n_nodes']} nodes / {r['n_weight_edges']} edges, "
        f"test {r['loss_test']:.3f}{'' if r['reached'] else ' (missed)'}"
        for k, r in row.items()
    ]
    done = len(result["tasks"])
    Console(stderr=True).print(f"[{done}] {task}: " + "; ".join(parts))


def _times(ratio: float | None) -> str:
    """A ratio as ``12.14x`` / ``0.0476x``, ``-`` when undefined."""
    if ratio is None or math.isnan(ratio):
        return "-"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3g}x"


def print_comparison(result: dict[str, Any]) -> None:
    """The comparison as rich tables: one row per task at the primary target, then the search
    budget, the pretraining losses and the ratios at every target with what each leaves out."""
    from rich.console import Console
    from rich.table import Table

    from sparsecircuits.circuits.compare_stats import target_key

    console = Console(width=None if sys.stdout.isatty() else 160)
    kinds = list(result["models"])
    primary = target_key(result["target_loss"])
    t = Table(
        title=f"circuits at target {primary} nats per prompt, reached = loss on the held-out "
        "test templates <= target"
    )
    t.add_column("task")
    for k in kinds:
        lab = KIND_LABELS[k]
        for col in (f"{lab} nodes", f"{lab} edges", f"{lab} train/test"):
            t.add_column(col, justify="right")
    for b in kinds[1:]:
        t.add_column(f"{KIND_LABELS[b]}/sparse", justify="right")
    flagged: list[str] = []
    for name, row in result["tasks"].items():
        cells = [name]
        outside = [KIND_LABELS[k] for k in kinds if row[k]["decided_outside"]]
        if outside:
            flagged.append(f"{name} ({', '.join(outside)})")
        for k in kinds:
            r = row[k]
            mark = ("" if r["reached"] else " ✗") + (" *" if r["decided_outside"] else "")
            cells += [f"{r['n_nodes']:,}", f"{r['n_weight_edges']:,}",
                      f"{r['loss_train']:.3f}/{r['loss_test']:.3f}{mark}"]  # fmt: skip
        for b in kinds[1:]:
            ratio = result["ratios"][b][primary]["all"]["ratios"].get(name)
            cells.append(_times(ratio))
        t.add_row(*cells)
    console.print(t)
    console.print(
        "train/test = circuit loss per prompt on the train / held-out test templates; ✗ = missed "
        "on test; edges = weight edges (nonzero weights between kept nodes); * = the empty "
        "circuit (every node ablated) reaches the target"
    )
    if flagged:
        console.print("decided outside the node space (bigram table, biases, token embedding): "
                      + ", ".join(flagged))  # fmt: skip
    _print_search(console, result)
    _print_pretrain(console, result)
    _print_ratios(console, result)


def _print_search(console: Any, result: dict[str, Any]) -> None:
    s = result["search"]
    console.print(
        f"\nsearch: the same centre config for every model ({s['trials_per_task']} trials per "
        f"task, centre first), budget {s['budget_per_model_s']:g} s per model = "
        f"{s['budget_per_task_s']:.1f} s per task; masks trained at target "
        f"{result['masks_trained_at']:g} and re-cut at the other targets"
    )
    for kind, m in result["models"].items():
        reused = f", {m['tasks_reused']} task(s) reused from --out" if m["tasks_reused"] else ""
        if m["search_s"] > s["budget_per_model_s"]:
            reused += " (over budget: each task's first trial always runs)"
        console.print(
            f"  {KIND_LABELS[kind]:8s} {m['spec']}: {m['trials']} trials, search "
            f"{m['search_s']:.0f} s, wall {m['wall_s']:.0f} s{reused}"
        )


def _print_pretrain(console: Any, result: dict[str, Any]) -> None:
    p = result["pretrain_loss"]
    if p is None or "skipped" in p:
        console.print("pretraining losses: not measured (--eval-windows 0)")
        return
    console.print(
        f"pretraining loss on the held-out files of {p['corpus']} ({p['val_files']} files, "
        f"val_fraction {p['val_fraction']:g}), nats/token:"
        + ("" if p["same_tokenizer"] else " [different tokenizers: not comparable per token]")
    )
    for kind, m in p["models"].items():
        console.print(
            f"  {KIND_LABELS[kind]:8s} {m['val_loss']:.4f} over {m['windows']} of "
            f"{m['windows_available']} windows ({m['tokens']:,} tokens)"
        )


def _print_ratios(console: Any, result: dict[str, Any]) -> None:
    losses = (result["pretrain_loss"] or {}).get("models", {})
    for b, per_target in result["ratios"].items():
        vs = ""
        if "sparse" in losses and b in losses:
            vs = (f" (pretraining loss {KIND_LABELS[b]} {losses[b]['val_loss']:.3f} vs sparse "
                  f"{losses['sparse']['val_loss']:.3f})")  # fmt: skip
        console.print(f"\ngeometric-mean ratio {KIND_LABELS[b]} / sparse weight edges{vs}:")
        for key, both in per_target.items():
            a, w = both["all"], both["without_flagged"]
            console.print(
                f"  target {key}: {_times(a['geomean'])} over all {a['n_tasks']} task(s) "
                f"reached on test by both; {_times(w['geomean'])} over {w['n_tasks']} "
                "without tasks decided outside the node space"
            )
            if a["excluded"]:
                left = ", ".join(f"{t} ({why})" for t, why in a["excluded"].items())
                console.print(f"    not in either ratio: {left}")
            more = {t: why for t, why in w["excluded"].items() if t not in a["excluded"]}
            if more:
                left = ", ".join(f"{t} ({why})" for t, why in more.items())
                console.print(f"    also not in the second: {left}")
