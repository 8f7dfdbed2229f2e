"""Task commands: ``sparsecircuits tasks list | show`` and ``sparsecircuits eval``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sparsecircuits.cli.common import DEFAULT_MODEL, Device
from sparsecircuits.errors import SparseCircuitsError

tasks_app = typer.Typer(no_args_is_help=True, help="The 20-task suite and its controls.")


@tasks_app.command("list")
def tasks_list(
    controls: Annotated[bool, typer.Option(help="also list the negative controls")] = True,
) -> None:
    """Every registered task with its one-line description."""
    from sparsecircuits import tasks

    for name in tasks.names(include_controls=controls):
        task = tasks.get(name)
        tag = "  [control]" if task.control else ""
        typer.echo(f"{name:34s} {task.description}{tag}")


@tasks_app.command("show")
def tasks_show(
    name: Annotated[str, typer.Argument(help="task name, e.g. bracket_counting")],
    model: Annotated[str, typer.Option("--model", help="whose tokenizer resolves targets")] = (
        DEFAULT_MODEL
    ),
    split: Annotated[str, typer.Option(help="train | test")] = "test",
    n: Annotated[int, typer.Option(help="pairs to print")] = 3,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Sample pairs with their resolved target tokens under the model's tokenizer."""
    from sparsecircuits import tasks
    from sparsecircuits.data import Tokenizer
    from sparsecircuits.model.io import read_config, resolve_model_dir

    mdir = resolve_model_dir(model)
    task = tasks.get(name)
    if split not in tasks.SPLITS:
        raise SparseCircuitsError(f"--split {split!r}: expected one of {', '.join(tasks.SPLITS)}")
    batch = task.build(
        Tokenizer.load(mdir),
        split=split,
        n=max(n, 50),
        seed=seed,
        max_len=read_config(mdir).block_size,
    )
    typer.echo(f"{task.name}: {task.description}{'  [control]' if task.control else ''}")
    typer.echo(f"resolved contrasts over {batch.n} {split} pairs (tokenizer of {model}):")
    for line in batch.describe():
        typer.echo(f"  {line}")
    for text, count in batch.moved_counts():
        typer.echo(f"  shared first token {text!r} moved into both prompts in {count} pairs")
    for i, raw in enumerate(batch.raw[:n]):
        typer.echo(f"--- pair {i} (A -> {batch.tokens_a[i]!r}, B -> {batch.tokens_b[i]!r})")
        typer.echo(f"[A] {raw.prompt_a}")
        typer.echo(f"[B] {raw.prompt_b}")


def eval_tasks(
    model: Annotated[str, typer.Option("--model", help="model dir, run, or shipped name")] = (
        DEFAULT_MODEL
    ),
    tasks: Annotated[list[str], typer.Option("--tasks", help="task names (default: all 20)")] = [],  # noqa: B006
    n_pairs: Annotated[int, typer.Option(help="prompt pairs per task and split")] = 50,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    device: Device = "auto",
) -> None:
    """Per-task contrast loss (mean per prompt) and accuracy on train and test splits."""
    from sparsecircuits.console import print_task_table
    from sparsecircuits.data import Tokenizer
    from sparsecircuits.model.io import load_model, resolve_model_dir
    from sparsecircuits.tasks import evaluate_tasks
    from sparsecircuits.train.distributed import resolve_device

    mdir = resolve_model_dir(model)
    m = load_model(mdir, device=resolve_device(device))
    names = [n for item in tasks for n in item.split(",") if n] or None
    table = evaluate_tasks(m, Tokenizer.load(mdir), names=names, n_pairs=n_pairs, seed=seed)
    if json_out:
        typer.echo(json.dumps({"model": str(model), "tasks": table}, indent=2))
    else:
        print_task_table(str(model), table)


def register(app: typer.Typer) -> None:
    """Add the task commands to ``app``."""
    app.add_typer(tasks_app, name="tasks")
    app.command("eval")(eval_tasks)
