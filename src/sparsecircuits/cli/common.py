"""What the command modules share: option types, the default model, and the ``--set`` parser.
Nothing outside ``sparsecircuits.cli`` imports this package (library code never depends on the
command line)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from sparsecircuits.errors import SparseCircuitsError

Device = Annotated[str, typer.Option(help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1...")]
ModelArg = Annotated[
    str,
    typer.Argument(help="model directory (ours or official), a training run, or a shipped name"),
]
DEFAULT_MODEL = "stdlib-sparse"  # shipped with the package


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.n_layer=4", "optim.lr=0.01"]`` -> nested dict; values parsed as JSON if they can
    be (numbers, booleans, null, lists), else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SparseCircuitsError(f"--set '{item}': expected KEY=VALUE, e.g. optim.lr=0.01")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SparseCircuitsError(f"--set '{item}': '{p}' was already set to a value")
        node[leaf] = value
    return out


def run_trainer(trainer, *, steps: int, saved: str = "") -> None:
    """Run a ``Trainer`` with the progress bar, shut its process group down whatever happens,
    and report on the main rank (``saved``: more to say about what was written)."""
    from sparsecircuits.console import train_progress
    from sparsecircuits.train.distributed import shutdown

    try:
        with train_progress(total=steps, enabled=trainer.dist.is_main) as on_record:
            result = trainer.run(on_record=on_record)
    finally:
        shutdown(trainer.dist)
    if trainer.dist.is_main:
        typer.echo(
            f"trained {result.steps} steps ({result.tokens:,} tokens) in {result.seconds:.0f} s; "
            f"validation loss {result.val_loss:.4f} nats/token; model saved to "
            f"{result.model_dir}{saved}"
        )
