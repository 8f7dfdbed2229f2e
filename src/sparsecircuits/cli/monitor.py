"""Monitor commands: ``sparsecircuits monitor catalog | calibrate | policy-check``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparsecircuits.cli.common import DEFAULT_MODEL, Device
from sparsecircuits.errors import InputError

monitor_app = typer.Typer(
    no_args_is_help=True,
    help="Circuit telemetry: build a catalogue of verified circuits, calibrate, check policies.",
)


def _reuse(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise InputError(f"--reuse '{item}': expected TASK=CIRCUIT_DIR")
        out[task] = Path(path)
    return out


def _progress():
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)  # fmt: skip


@monitor_app.command("catalog")
def catalog_cmd(
    out: Annotated[Path, typer.Option(help="catalogue directory (catalog.json, circuits/)")],
    model: Annotated[str, typer.Option(help="model dir, run or shipped name")] = DEFAULT_MODEL,
    families: Annotated[Path | None, typer.Option(help="families YAML (default: shipped)")] = None,
    reuse: Annotated[
        list[str], typer.Option("--reuse", help="TASK=CIRCUIT_DIR: take this circuit, no prune")
    ] = [],  # noqa: B006
    target: Annotated[float | None, typer.Option(help="pruning target loss per prompt")] = None,
    steps: Annotated[int | None, typer.Option(help="mask-training steps")] = None,
    windows: Annotated[int, typer.Option(help="benign windows for node scales")] = 8,
    strict: Annotated[
        bool, typer.Option(help="refuse an uncertain PASS (interval straddling its threshold)")
    ] = False,
    device: Device = "auto",
) -> None:
    """Prune (or reuse) each family task's circuit, admit those passing sufficiency and
    necessity, and write catalog.json."""
    from sparsecircuits.circuits.pipeline import load_for_circuits
    from sparsecircuits.circuits.prune import PruneConfig
    from sparsecircuits.monitor.catalog import build_catalog
    from sparsecircuits.monitor.families import load_families
    from sparsecircuits.train.distributed import resolve_device

    fams = load_families(families)
    given = {k: v for k, v in dict(target_loss=target, steps=steps).items() if v is not None}
    cfg = PruneConfig.from_dict(given, source="catalog options")
    lm = load_for_circuits(model, device=resolve_device(device))
    with _progress() as progress:
        bar = progress.add_task("catalogue", total=None)

        def on_task(task: str, stage: str) -> None:
            verb = "pruning" if stage == "prune" else "checking"
            progress.update(bar, description=f"{verb} {task}")

        doc = build_catalog(lm, families=fams, out=out, reuse=_reuse(reuse), prune_config=cfg,
                            scale_windows=windows, on_task=on_task, strict=strict)  # fmt: skip
    for name, f in doc.families.items():
        typer.echo(f"{name}: {len(f.admitted)} admitted ({', '.join(f.admitted) or '-'}), "
                   f"{f.n_nodes} nodes")  # fmt: skip
        for t in f.admitted:
            shaky = [k for k, c in doc.circuits[t].checks.items() if c.uncertain]
            if shaky:
                typer.echo(f"  admitted {t} with an uncertain PASS: {', '.join(shaky)}")
        for t in f.rejected:
            typer.echo(f"  rejected {t}: {doc.circuits[t].reason}")
    typer.echo(f"catalogue written to {Path(out) / 'catalog.json'}")


@monitor_app.command("calibrate")
def calibrate_cmd(
    catalog: Annotated[Path, typer.Option(help="catalogue directory or catalog.json")],
    model: Annotated[str | None, typer.Option(help="default: the catalogue's model")] = None,
    out: Annotated[Path | None, typer.Option(help="baseline.json (default: beside it)")] = None,
    windows: Annotated[int, typer.Option(help="benign windows of block_size tokens")] = 16,
    corpus: Annotated[str, typer.Option(help="corpus whose held-out files are benign")] = "stdlib",
    z: Annotated[float, typer.Option(help="default flag: robust z threshold")] = 4.0,
    k: Annotated[int, typer.Option(help="default flag: k of the last n tokens")] = 3,
    n: Annotated[int, typer.Option(help="default flag: window of n tokens")] = 8,
    bridge: Annotated[
        Path | None,
        typer.Option(
            help="bridges (a directory, or stdlib-bridges): calibrate the dense model (--dense) "
            "through them (written beside the bridges by default)"
        ),
    ] = None,
    dense: Annotated[
        str | None, typer.Option(help="with --bridge: the dense model to be served")
    ] = None,
    device: Device = "auto",
) -> None:
    """Fit per-family engagement baselines (median, MAD, quantiles) on benign text."""
    from sparsecircuits.circuits.pipeline import load_for_circuits
    from sparsecircuits.console import status
    from sparsecircuits.interop.download import file_sha256
    from sparsecircuits.monitor.calibrate import FlagRule, calibrate, save_baseline
    from sparsecircuits.monitor.catalog import catalog_path, load_catalog
    from sparsecircuits.train.distributed import resolve_device

    if windows < 1:
        raise InputError(f"--windows must be >= 1, got {windows}")
    if (bridge is None) != (dense is None):
        raise InputError("--bridge and --dense go together")
    if bridge is not None:  # a directory or the name of shipped bridges
        from sparsecircuits.bridges.fit import resolve_bridges_dir

        bridge = resolve_bridges_dir(bridge)
    path = catalog_path(catalog)
    doc = load_catalog(path)
    lm = load_for_circuits(model or doc.model_id, device=resolve_device(device))
    doc = load_catalog(path, lm.model)  # refuses another model
    flag = _flag(FlagRule, z, k, n)
    with status(f"calibrating on {windows} windows"):
        if bridge is None:
            base = calibrate(lm.model, lm.tokenizer, doc, catalog_sha256=file_sha256(path),
                             windows=windows, corpus=corpus, flag=flag)  # fmt: skip
        else:
            base = _calibrate_bridged(lm, doc, bridge, dense, catalog_sha256=file_sha256(path),
                                      windows=windows, corpus=corpus, flag=flag)  # fmt: skip
    # a bridged baseline goes beside the bridges: beside the catalogue it would replace the
    # sparse model's own, which direct monitoring needs
    if out is None and bridge is not None:
        from sparsecircuits.bridges.fit import is_shipped

        if is_shipped(bridge):  # the package's own baseline is not rewritten by a user's run
            raise InputError("--bridge names shipped bridges: give --out for the baseline")
    dest = save_baseline(base, out or (path.parent if bridge is None else bridge))
    for name, b in base.families.items():
        typer.echo(f"{name}: median {b.median:.3f} MAD {b.mad:.3f} p99 {b.p99:.3f} "
                   f"p99.9 {b.p99_9:.3f} over {b.n_tokens} tokens")  # fmt: skip
    typer.echo(f"baseline written to {dest}")


def _calibrate_bridged(lm, doc, bridge: Path, dense: str, **kw):
    """``monitor.bridged.calibrate_bridged`` with the dense model and bridges loaded (each
    refused in one line when made for other models)."""
    from sparsecircuits.bridges.fit import load_bridges, load_meta
    from sparsecircuits.model.io import load_model, resolve_model_dir, weights_hash
    from sparsecircuits.monitor.bridged import calibrate_bridged, same_tokenizer

    ddir = resolve_model_dir(dense)
    same_tokenizer(ddir, lm.directory)
    d = load_model(ddir, device=next(lm.model.parameters()).device).eval()
    dh = weights_hash(d)
    b = load_bridges(bridge, hashes={"sparse": lm.hash, "dense": dh})
    return calibrate_bridged(d, lm.model, b, lm.tokenizer, doc, dense_hash=dh,
                             bridges_sha256=load_meta(bridge).weights_sha256, **kw)  # fmt: skip


def _flag(cls, z: float, k: int, n: int):
    from pydantic import ValidationError

    from sparsecircuits.model.config import format_validation_error

    try:
        return cls(z=z, k=k, n=n)
    except ValidationError as err:
        raise InputError(format_validation_error(err, source="flag options")) from None


@monitor_app.command("policy-check")
def policy_check_cmd(
    policy: Annotated[Path, typer.Argument(help="policy YAML")],
    catalog: Annotated[Path, typer.Option(help="catalogue directory or catalog.json")],
    model: Annotated[str | None, typer.Option(help="default: the catalogue's model")] = None,
    pairs: Annotated[int, typer.Option(help="test pairs per task")] = 20,
    windows: Annotated[int, typer.Option(help="held-out windows for the loss")] = 4,
    task: Annotated[
        list[str], typer.Option("--task", help="tasks to evaluate (default: every task)")
    ] = [],  # noqa: B006
    device: Device = "auto",
) -> None:
    """Side effects of each dampen rule: every task's accuracy and held-out loss with the
    family dampened for the whole pass."""
    from rich.console import Console
    from rich.table import Table

    from sparsecircuits.circuits.pipeline import load_for_circuits
    from sparsecircuits.console import status
    from sparsecircuits.monitor.catalog import load_catalog
    from sparsecircuits.monitor.policy import load_policy
    from sparsecircuits.monitor.policy_check import policy_check
    from sparsecircuits.train.distributed import resolve_device

    doc = load_catalog(catalog)
    pol = load_policy(policy, families=doc.monitored())
    lm = load_for_circuits(model or doc.model_id, device=resolve_device(device))
    doc = load_catalog(catalog, lm.model)
    with status("evaluating dampen rules"):
        records = policy_check(lm.model, lm.tokenizer, doc, pol, n_pairs=pairs,
                               loss_windows=windows, task_names=list(task) or None)  # fmt: skip
    if not records:
        typer.echo(f"{policy}: no dampen rules (policy sha256 {pol.sha256[:12]}...)")
        return
    console = Console()
    for r in records:
        table = Table(title=f"{r['rule']}: dampen {r['family']} ({r['dampen']})")
        for col in ("task", "own", "acc", "acc dampened", "delta acc"):
            table.add_column(col)
        for own, rows in ((True, r["own_tasks"]), (False, r["other_tasks"])):
            for t, v in rows.items():
                table.add_row(t, "yes" if own else "", f"{v['acc']:.3f}",
                              f"{v['acc_dampened']:.3f}", f"{v['delta_acc']:+.3f}")  # fmt: skip
        console.print(table)
        h = r["heldout_loss"]
        console.print(f"held-out loss {h['plain']:.4f} -> {h['dampened']:.4f} nats/token "
                      f"({h['delta']:+.4f}; {r['loss_windows']} windows)")  # fmt: skip
    typer.echo(f"policy sha256 {pol.sha256}")


def register(app: typer.Typer) -> None:
    """Add the ``monitor`` command group to ``app``."""
    app.add_typer(monitor_app, name="monitor")
