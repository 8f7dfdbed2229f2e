"""Circuit commands: ``sparsecircuits prune | validate`` (registered on the main app)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from sparsecircuits.circuits.schema import model_label
from sparsecircuits.cli.common import DEFAULT_MODEL, Device, parse_overrides
from sparsecircuits.errors import InputError


def prune_config(options: dict[str, Any], sets: list[str]) -> Any:
    """A validated PruneConfig from CLI options (None = default) and ``--set`` overrides."""
    from sparsecircuits.circuits.prune import PruneConfig

    given = {k: v for k, v in options.items() if v is not None}
    return PruneConfig.from_dict({**given, **parse_overrides(sets)}, source="prune options")


def register(app: typer.Typer) -> None:
    """Add the circuit commands to ``app``."""

    @app.command("prune")
    def prune_cmd(
        task: Annotated[list[str], typer.Option("--task", help="task name(s)")] = [],  # noqa: B006
        all_tasks: Annotated[bool, typer.Option("--all-tasks", help="every task")] = False,
        model: Annotated[str, typer.Option(help="model dir, run or shipped name")] = DEFAULT_MODEL,
        out: Annotated[Path | None, typer.Option(help="output dir (one task only)")] = None,
        runs_dir: Annotated[Path, typer.Option(help="root of default outputs")] = Path("runs"),
        target: Annotated[float | None, typer.Option(help="target loss per prompt")] = None,
        steps: Annotated[int | None, typer.Option(help="mask-training steps")] = None,
        k_coef: Annotated[float | None, typer.Option(help="penalty per active node")] = None,
        lr: Annotated[float | None, typer.Option()] = None,
        ablation: Annotated[str | None, typer.Option(help="mean | zero | task_mean")] = None,
        calibrate: Annotated[bool | None, typer.Option("--calibrate/--no-calibrate")] = None,
        frozen_norms: Annotated[bool | None, typer.Option("--frozen-norms/--live-norms")] = None,
        mask_embed: Annotated[bool | None, typer.Option("--mask-embed/--no-mask-embed")] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        search: Annotated[int, typer.Option(help="random-search trials (1 = none)")] = 1,
        budget: Annotated[float, typer.Option(help="search time budget, seconds")] = math.inf,
        set_: Annotated[list[str], typer.Option("--set", help="KEY=VALUE PruneConfig field")] = [],  # noqa: B006
        device: Device = "auto",
    ) -> None:
        """Find the smallest circuit for a task (writes circuit.json + masks.safetensors)."""
        from sparsecircuits import tasks as task_registry
        from sparsecircuits.circuits.pipeline import find_circuit, load_for_circuits
        from sparsecircuits.circuits.report import save_prune_outputs
        from sparsecircuits.console import prune_progress
        from sparsecircuits.train.distributed import resolve_device

        names = task_registry.names(include_controls=False) if all_tasks else list(task)
        if not names:
            raise InputError("give --task NAME (repeatable) or --all-tasks")
        for n in names:
            task_registry.get(n)  # unknown names fail before any work
        if out is not None and len(names) > 1:
            raise InputError("--out takes one task; with several, outputs go under --runs-dir")
        cfg = prune_config(
            dict(
                target_loss=target,
                steps=steps,
                k_coef=k_coef,
                lr=lr,
                ablation=ablation,
                calibrate=calibrate,
                frozen_norms=frozen_norms,
                mask_embed=mask_embed,
                seed=seed,
            ),
            set_,
        )
        lm = load_for_circuits(model, device=resolve_device(device))
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for name in names:
            dest = out or runs_dir / model_label(model) / name / stamp
            with prune_progress(name, total=cfg.steps * search) as on_step:
                doc, result, trials = find_circuit(
                    lm, name, cfg, trials=search, budget_s=budget, on_step=on_step
                )
            save_prune_outputs(dest, doc, result, trials)
            verdict = "reached" if doc.reached else "MISSED"
            typer.echo(
                f"{name}: {doc.n_nodes} nodes, {doc.n_edges} edges ({doc.n_weight_edges} weights)"
                f"; loss full {doc.loss.full:.3f} circuit {doc.loss.circuit:.3f} "
                f"test {doc.loss.circuit_test:.3f} (target {doc.target_loss} {verdict}; per-prompt "
                f"means) in {result.seconds:.1f} s -> {dest}"
            )

    @app.command("validate")
    def validate_cmd(
        circuit: Annotated[Path, typer.Argument(help="circuit.json or the directory holding it")],
        model: Annotated[str | None, typer.Option(help="default: the model in the file")] = None,
        out: Annotated[Path | None, typer.Option(help="report dir (default: circuit's)")] = None,
        seeds: Annotated[
            int | None, typer.Option(help="pruning seeds incl. the circuit's (5; 2 with --quick)")
        ] = None,
        quick: Annotated[
            bool, typer.Option("--quick", help="fewer random sets, seeds and steps (smoke test)")
        ] = False,
        check: Annotated[list[str], typer.Option("--check", help="run only these checks")] = [],  # noqa: B006
        device: Device = "auto",
    ) -> None:
        """Faithfulness checks of a circuit (writes report.json + report.md; exits 0 even when
        checks fail)."""
        from sparsecircuits.circuits.verify import CHECKS, VerifyOptions
        from sparsecircuits.circuits.verify_report import print_report, validate
        from sparsecircuits.train.distributed import resolve_device

        if quick:
            options = VerifyOptions.quick_mode(seeds=seeds if seeds is not None else 2)
        else:
            options = VerifyOptions(seeds=seeds if seeds is not None else 5)
        report = validate(
            circuit,
            model=model,
            out=out,
            options=options,
            checks=list(check) or CHECKS,
            device=resolve_device(device),
        )
        print_report(report)
        dest = Path(out) if out is not None else Path(report["circuit"]).parent
        typer.echo(f"report written to {dest / 'report.json'} and {dest / 'report.md'}")
