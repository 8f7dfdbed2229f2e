"""Rich terminal output for the CLI: the training progress bar and the model summary table."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


@contextlib.contextmanager
def train_progress(*, total: int, enabled: bool = True) -> Iterator[Callable[[dict], None]]:
    """A progress bar fed by the trainer's metrics records (step, loss, L0, tokens/s, ETA)."""
    if not enabled:
        yield lambda rec: None
        return
    console = Console(stderr=True)
    if not console.is_terminal:  # a log file: one plain line per evaluation instead of a bar
        yield lambda rec: _log_line(console, rec, total) if "val_loss" in rec else None
        return
    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]}  val {task.fields[val]}  L0 {task.fields[l0]}  "
            "{task.fields[tps]} tok/s"
        ),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        task = progress.add_task("train", total=total, loss="-", val="-", l0="-", tps="-")

        def update(rec: dict[str, Any]) -> None:
            fields = {
                "loss": f"{rec['train_loss']:.3f}",
                "l0": f"{rec['l0_frac']:.4f}",
                "tps": f"{rec['tokens_per_s']:,.0f}",
            }
            if "val_loss" in rec and not math.isnan(rec["val_loss"]):
                fields["val"] = f"{rec['val_loss']:.3f}"
            progress.update(task, completed=rec["step"], **fields)

        yield update


@contextlib.contextmanager
def prune_progress(task: str, *, total: int) -> Iterator[Callable[[int, dict], None]]:
    """A progress bar for mask training (task loss and active nodes); silent when piped."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda step, rec: None
        return
    progress = Progress(
        TextColumn(f"[bold]prune {task}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("task loss {task.fields[loss]}  active nodes {task.fields[active]}"),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        bar = progress.add_task("prune", total=total, loss="-", active="-")

        def update(step: int, rec: dict) -> None:
            progress.update(
                bar,
                advance=1,
                loss=f"{rec['task_loss']:.3f}",
                active=f"{rec['n_active']:,.0f}",
            )

        yield update


def _log_line(console: Console, rec: dict[str, Any], total: int) -> None:
    console.print(
        f"step {rec['step']}/{total}  tokens {rec['tokens']:,}  train {rec['train_loss']:.4f}  "
        f"val {rec['val_loss']:.4f}  L0 {rec['l0_frac']:.4f}  {rec['tokens_per_s']:,.0f} tok/s  "
        f"dead neurons {rec['dead_neurons']}  {rec['elapsed_s']:.0f} s",
        highlight=False,
        soft_wrap=True,
    )


def print_summary(summary: dict[str, Any]) -> None:
    """Print a model summary (from ``model_summary``) as two tables."""
    # Parameter names are long; when piped (no terminal width) do not squeeze them.
    console = Console(width=None if sys.stdout.isatty() else 140)
    cfg = Table(title="config", show_header=False)
    for k, v in summary["config"].items():
        cfg.add_row(k, str(v))
    console.print(cfg)
    t = Table(title="parameters")
    for col in ("name", "shape", "numel", "nonzero", "budget", "density", "min/row", "sparse"):
        t.add_column(col, justify="left" if col == "name" else "right", no_wrap=col == "name")
    for r in summary["parameters"]:
        t.add_row(
            r["name"],
            "x".join(map(str, r["shape"])),
            f"{r['numel']:,}",
            f"{r['nonzero']:,}",
            "-" if r["budget"] is None else f"{r['budget']:,}",
            f"{r['density']:.4f}",
            "-" if r["min_row_nonzero"] is None else str(r["min_row_nonzero"]),
            "yes" if r["sparse"] else "",
        )
    console.print(t)
    sp, nz = summary["sparse_params"], summary["sparse_nonzero"]
    console.print(
        f"total parameters {summary['total_params']:,}; nonzero {summary['nonzero_params']:,}; "
        f"sparse matrices {nz:,}/{sp:,} nonzero ({nz / max(sp, 1):.4f}); "
        f"buffers: {', '.join(f'{k} {v}' for k, v in summary['buffers'].items())}"
    )


def print_task_table(model: str, table: dict[str, dict[str, dict[str, float]]]) -> None:
    """Per-task loss (two-token contrast CE, mean per prompt) and accuracy, train and test."""
    console = Console(width=None if sys.stdout.isatty() else 120)
    t = Table(
        title=f"tasks: {model}  (loss = two-token contrast CE, mean per prompt; "
        "the paper's stored numbers are 2x)"
    )
    for col in ("task", "train loss", "train acc", "test loss", "test acc"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for name, r in table.items():
        t.add_row(
            name,
            f"{r['train']['loss']:.3f}",
            f"{r['train']['acc']:.2f}",
            f"{r['test']['loss']:.3f}",
            f"{r['test']['acc']:.2f}",
        )
    console.print(t)
    accs = [r["test"]["acc"] for r in table.values()]
    if accs:
        console.print(
            f"test accuracy >= 0.80 on {sum(a >= 0.8 for a in accs)} of {len(accs)} tasks"
        )


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with ``message`` while a step of unknown length runs; silent when piped."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield
