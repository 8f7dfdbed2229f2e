"""Command line: ``sparsecircuits`` and its command groups, one module each (``model``,
``tasks``, ``circuits``, ``compare``, ``data``, ``checkpoint``, ``viz``, ``interop``,
``monitor``, ``serve``, ``audit`` with ``keys``, ``redteam``: ``scan``).

Library code never imports this package. Heavy imports happen inside commands so ``--help`` is
instant and the allocator tweak lands before torch allocates.
"""

from __future__ import annotations

import logging
import sys

import typer

from sparsecircuits._alloc import tune_allocator
from sparsecircuits.cli import (
    audit,
    bridge,
    checkpoint,
    circuits,
    compare,
    data,
    interop,
    model,
    monitor,
    redteam,
    serve,
    tasks,
    viz,
)
from sparsecircuits.errors import SparseCircuitsError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train, inspect and run weight-sparse transformers.",
)
for group in (
    model,
    tasks,
    circuits,
    compare,
    checkpoint,
    data,
    viz,
    interop,
    monitor,
    redteam,
    serve,
    audit,
    bridge,
):
    group.register(app)


def main() -> None:
    """Console entry point: one-line errors for bad input, exit status 2."""
    tune_allocator()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SparseCircuitsError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


__all__ = ["app", "main"]
