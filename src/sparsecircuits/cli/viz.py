"""Viewing commands: ``sparsecircuits analyze | export-html | viz`` (registered on the main
app).

One function per command; heavy imports happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from sparsecircuits.cli.common import Device

CircuitDir = Annotated[Path, typer.Argument(help="directory holding circuit.json")]
ModelOpt = Annotated[
    str | None, typer.Option(help="model directory (default: the one named in circuit.json)")
]


def _analyze(app: typer.Typer) -> None:
    @app.command("analyze")
    def analyze_cmd(
        circuit_dir: CircuitDir,
        model: ModelOpt = None,
        windows: Annotated[int, typer.Option(help="pretraining windows (block_size tokens)")] = 64,
        force: Annotated[bool, typer.Option("--force", help="recompute an existing file")] = False,
        device: Device = "cpu",
    ) -> None:
        """Compute the dashboard's cached analysis (writes analysis.json beside circuit.json)."""
        from sparsecircuits.errors import InputError
        from sparsecircuits.train.distributed import resolve_device
        from sparsecircuits.viz.analysis import analyze

        if windows < 1:
            raise InputError(f"--windows must be >= 1, got {windows}")
        t0 = time.perf_counter()
        doc, path, reused = analyze(
            circuit_dir, model=model, n_windows=windows, force=force,
            device=resolve_device(device),
        )  # fmt: skip
        how = "reused (use --force to recompute)" if reused else "written"
        typer.echo(
            f"{path}: {how}; {len(doc.nodes)} nodes, {len(doc.attention)} heads, "
            f"{doc.n_windows} windows, {path.stat().st_size / 1e6:.2f} MB in "
            f"{time.perf_counter() - t0:.1f} s"
        )


def _export_html(app: typer.Typer) -> None:
    @app.command("export-html")
    def export_html_cmd(
        circuit_dir: CircuitDir,
        out: Annotated[Path | None, typer.Option(help="default: CIRCUIT_DIR/circuit.html")] = None,
        model: ModelOpt = None,
        device: Device = "cpu",
    ) -> None:
        """Write a self-contained offline HTML page of the circuit (runs analyze if needed)."""
        from sparsecircuits.train.distributed import resolve_device
        from sparsecircuits.viz.export_html import export_html

        path = export_html(circuit_dir, out=out, model=model, device=resolve_device(device))
        typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _viz(app: typer.Typer) -> None:
    @app.command("viz")
    def viz_cmd(
        target: Annotated[
            str | None,
            typer.Argument(
                help="a circuit directory, a directory of prune runs, or a model (shipped name "
                "or directory) whose circuits are RUNS_DIR/<model>/*/*/ (default stdlib-sparse)",
            ),
        ] = None,
        port: Annotated[int, typer.Option(help="port to serve on")] = 8501,
        host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
        headless: Annotated[bool, typer.Option("--headless", help="do not open a browser")] = False,
        runs_dir: Annotated[Path, typer.Option(help="root of the prune outputs")] = Path("runs"),
        model: ModelOpt = None,
        server: Annotated[
            str | None,
            typer.Option(
                help="the Monitor page reads request telemetry from this model server "
                "(`sparsecircuits serve`), e.g. http://127.0.0.1:8000"
            ),
        ] = None,
        catalog: Annotated[
            Path | None,
            typer.Option(
                help="the monitor catalogue, for the Monitor page's links from a family "
                "to its circuits (default: the one the --server loaded)"
            ),
        ] = None,
    ) -> None:
        """Start the interactive circuit dashboard (Streamlit) and print its URL."""
        from sparsecircuits.viz import launch
        from sparsecircuits.viz.app_data import require_circuits

        launch.check_installed()
        if server is not None:
            from sparsecircuits.viz.monitor_view import server_base

            server = server_base(server)  # a one-line error now, not on the page
        if target is not None and Path(target).exists():
            target = str(Path(target).resolve())
        if model is not None and Path(model).exists():
            model = str(Path(model).resolve())
        entries = require_circuits(target, runs_dir=runs_dir)
        cmd = launch.streamlit_command(
            port=port,
            host=host,
            target=target,
            runs_dir=runs_dir,
            model=model,
            server=server,
            catalog=catalog,
        )
        base = launch.url(host, port)
        tasks = sorted({e.task for e in entries})
        typer.echo(
            f"viz: {len(entries)} circuit(s) ({', '.join(tasks)}) at {base}  (Ctrl+C to stop)"
        )
        raise typer.Exit(launch.run(cmd, base=base, open_browser=not headless))


def register(app: typer.Typer) -> None:
    """Add the viewing commands to ``app``."""
    _analyze(app)
    _export_html(app)
    _viz(app)
