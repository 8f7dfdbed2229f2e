"""Run-carrying commands: ``sparsecircuits checkpoint pack | unpack`` (registered on the main
app): move a long training run between machines as a few megabytes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

checkpoint_app = typer.Typer(
    no_args_is_help=True, help="Pack a run's newest checkpoint small; unpack it to resume."
)


@checkpoint_app.command("pack")
def pack_cmd(
    run: Annotated[Path, typer.Argument(help="training run directory")],
    out: Annotated[Path, typer.Option(help="directory to write (replaced atomically)")],
) -> None:
    """Keep the newest checkpoint's nonzero weights, their Adam moments, the RNG, the run's
    files and its snapshots (docs/training.md: what a packed run loses)."""
    from sparsecircuits.train.carry import pack_run

    s = pack_run(run, out)
    typer.echo(
        f"packed step {s['step']} ({s['tokens']:,} tokens) of {run} into {out}: "
        f"{s['bytes'] / 1e6:.1f} MB"
    )


@checkpoint_app.command("unpack")
def unpack_cmd(
    packed: Annotated[Path, typer.Argument(help="a directory written by checkpoint pack")],
    out: Annotated[Path, typer.Option(help="new run directory; then train --out it --resume")],
    cache_dir: Annotated[Path | None, typer.Option(help="tokenizer/token cache")] = None,
) -> None:
    """Rebuild a run directory with one checkpoint (the bigram table recomputed from the data
    and checked), ready for ``sparsecircuits train --out OUT --resume``."""
    from sparsecircuits.train.carry import unpack_run

    state = unpack_run(packed, out, cache_dir=cache_dir)
    typer.echo(
        f"unpacked step {state.step} ({state.tokens:,} tokens) into {out}; continue with: "
        f"sparsecircuits train --out {out} --resume"
    )


def register(app: typer.Typer) -> None:
    """Add the ``checkpoint`` command group to the main app."""
    app.add_typer(checkpoint_app, name="checkpoint")
