"""Interop commands: ``sparsecircuits pull | import-viz | export-hf`` (registered on the main
app).

``pull`` is the only command that uses the network, and only when called. Heavy imports happen
inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from sparsecircuits.cli.common import Device, ModelArg


@contextlib.contextmanager
def _download_bars() -> Iterator[Callable[[str, int, int | None], None]]:
    """A rich progress bar per file (bytes, speed, time left); silent when not a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda name, done, total: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        bars: dict[str, int] = {}

        def update(name: str, done: int, total: int | None) -> None:
            if name not in bars:
                bars[name] = progress.add_task(name, total=total)
            progress.update(bars[name], completed=done, total=total)

        yield update


def _pull(app: typer.Typer) -> None:
    @app.command("pull")
    def pull_cmd(
        name: Annotated[
            str,
            typer.Argument(
                help="csp_yolo1 | csp_yolo2 | tinypython | blob:models/NAME | blob:PATH/FILE | "
                "hub:openai/circuit-sparsity"
            ),
        ],
        cache: Annotated[
            Path | None, typer.Option(help="download root (default: the cache's pull/)")
        ] = None,
        base_url: Annotated[
            str | None,
            typer.Option(help="blob store URL (default: $SPARSECIRCUITS_BLOB_URL or OpenAI's)"),
        ] = None,
        sha256: Annotated[
            str | None, typer.Option(help="expected SHA-256 of a single-file blob:PATH")
        ] = None,
        force: Annotated[bool, typer.Option("--force", help="download again")] = False,
        timeout: Annotated[float, typer.Option(help="seconds to connect / between reads")] = 30.0,
    ) -> None:
        """Fetch OpenAI's published circuit-sparsity models and circuits into the cache
        (resumable; checked against pinned sizes and SHA-256 where known)."""
        from sparsecircuits.errors import InputError
        from sparsecircuits.interop.pull import pull

        if timeout <= 0:
            raise InputError(f"--timeout must be > 0 seconds, got {timeout}")
        with _download_bars() as progress:
            path = pull(name, cache=cache, url=base_url, sha256=sha256, force=force,
                        timeout=timeout, progress=progress)  # fmt: skip
        typer.echo(f"{name}: {path}")


def _import_viz(app: typer.Typer) -> None:
    @app.command("import-viz")
    def import_viz_cmd(
        viz_data: Annotated[Path, typer.Argument(help="an official viz_data.pt")],
        model: Annotated[
            str, typer.Option(help="the official model directory the circuit was pruned in")
        ],
        out: Annotated[Path, typer.Option(help="circuit directory to write")],
        task: Annotated[
            str | None,
            typer.Option(help="our task name (default: from the viz/<model>/<task>/... path)"),
        ] = None,
        analyze: Annotated[
            bool, typer.Option(help="also write the dashboard's analysis.json")
        ] = True,
        windows: Annotated[int, typer.Option(help="pretraining windows for the analysis")] = 64,
        force: Annotated[bool, typer.Option("--force", help="replace a non-empty --out")] = False,
        device: Device = "cpu",
    ) -> None:
        """Turn an official circuit (viz_data.pt) into circuit.json for our dashboard."""
        from sparsecircuits.errors import InputError
        from sparsecircuits.interop.viz_import import import_viz
        from sparsecircuits.train.distributed import resolve_device
        from sparsecircuits.viz.analysis import analysis_writer

        if windows < 1:
            raise InputError(f"--windows must be >= 1, got {windows}")
        writer = analysis_writer(n_windows=windows) if analyze else None
        res = import_viz(viz_data, model=model, out=out, task=task, analyze=writer,
                         force=force, device=resolve_device(device))  # fmt: skip
        d = res.doc
        extra = "with analysis.json" if res.analysed else f"no analysis.json: {res.note}"
        typer.echo(
            f"{out}: {d.task}, {d.n_nodes} nodes, {d.n_weight_edges} weight edges, loss full "
            f"{d.loss.full:.3f} circuit {d.loss.circuit:.3f} (per-prompt means, halved from the "
            f"file); {extra}; open with `sparsecircuits viz {out}`"
        )


def export_hf(
    model: ModelArg,
    out: Annotated[Path, typer.Argument(help="directory to write (replaced whole with --force)")],
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer.json or its directory; default: the model's")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(help="load the export with transformers and compare it to the model"),
    ] = True,
    force: Annotated[bool, typer.Option(help="replace an existing OUT")] = False,
) -> None:
    """Write MODEL as a directory that transformers loads offline:
    ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` and
    ``AutoTokenizer.from_pretrained(OUT)``. The export is loaded back and compared to MODEL:
    logits (to 1e-5 + 1.3e-6 x the position's largest |logit|, given the same AbsTopK
    selections), its own AbsTopK selections (equal up to float32 near-ties), greedy generation,
    left-padded batches and the tokenizer; on a mismatch nothing is written."""
    from sparsecircuits.interop.export_hf import export_hf as run_export

    target = run_export(model, out, tokenizer=tokenizer, check=check, overwrite=force)
    checked = "; checked against sparsecircuits" if check else " (not checked)"
    typer.echo(f"exported {model} to {target}{checked}")


def register(app: typer.Typer) -> None:
    """Add the interop commands to ``app``."""
    _pull(app)
    _import_viz(app)
    app.command("export-hf")(export_hf)
