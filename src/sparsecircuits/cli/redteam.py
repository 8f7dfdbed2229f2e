"""``sparsecircuits scan``: circuit-aware red teaming (search for inputs that engage,
suppress or evade a circuit family's monitor)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from sparsecircuits.cli.common import DEFAULT_MODEL, ModelArg
from sparsecircuits.errors import InputError

SHIPPED = "shipped"


def scan(
    family: Annotated[str, typer.Option(help="circuit family (e.g. string-literal)")],
    objective: Annotated[
        Literal["engage", "suppress", "evade"],
        typer.Option(help="engage / suppress the family, or evade its flag keeping a target"),
    ],
    measure: Annotated[
        Literal["engagement", "causal-share"],
        typer.Option(
            help="engage/suppress: the family's engagement, or its causal share "
            "(log p of each token, full minus the family mean-ablated)"
        ),
    ] = "engagement",
    model: ModelArg = DEFAULT_MODEL,
    catalog: Annotated[
        str, typer.Option(help="catalogue directory; 'shipped': the model's own")
    ] = SHIPPED,
    policy: Annotated[Path | None, typer.Option(help="policy YAML: its flag rules")] = None,
    template: Annotated[
        Path | None, typer.Option(help="template YAML/JSON (default: the family's)")
    ] = None,
    mode: Annotated[
        Literal["gcg", "evolve", "random"], typer.Option(help="search: gcg, evolve or random")
    ] = "gcg",
    budget: Annotated[int, typer.Option(help="candidate evaluations")] = 512,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same hits)")] = 0,
    batch: Annotated[int, typer.Option(help="candidates scored per step")] = 64,
    topk: Annotated[int, typer.Option(help="gcg: candidate tokens per position")] = 64,
    out: Annotated[Path | None, typer.Option(help="write hits and the run here")] = None,
) -> None:
    """Search the tokens of a template's span for inputs that drive a circuit family's
    engagement up (engage) or down (suppress), or keep a behaviour while its flag stays off
    (evade)."""
    from sparsecircuits import __version__
    from sparsecircuits.model.io import resolve_model_dir
    from sparsecircuits.redteam.scan import load_monitor, write_scan
    from sparsecircuits.redteam.scan import scan as run_scan
    from sparsecircuits.redteam.template import load_template

    if min(budget, batch, topk) < 1:
        raise InputError("--budget, --batch and --topk must be >= 1")
    meas = "causal_share" if measure == "causal-share" else "engagement"
    if objective == "evade" and meas != "engagement":
        raise InputError("--measure: evade keeps the flag rules off; it has no other measure")
    mdir = resolve_model_dir(model)
    cat = mdir / "monitor" if catalog == SHIPPED else Path(catalog)
    if not cat.exists():
        raise InputError(f"--catalog {cat}: no such catalogue")
    if policy is None and catalog == SHIPPED and (cat / "policy.yaml").exists():
        policy = cat / "policy.yaml"
    from sparsecircuits.audit.records import now_iso

    started = now_iso()
    mon = load_monitor(mdir, cat, policy=policy)
    t = load_template(template, family=family)
    searcher, res = run_scan(mon, family=family, objective=objective, template=t, mode=mode,
                             budget=budget, seed=seed, batch=batch, topk=topk,
                             measure=meas)  # fmt: skip
    b, o = res.best, searcher.obj
    goal = f"{measure} threshold {o.threshold():.3f}"
    if objective == "evade":
        rules = ", ".join(f"z > {r.z:g} on {r.k} of {r.n}" for r in o.rules) or "none"
        goal = f"rules {rules}; target p >= {t.min_target_prob:g}"
    typer.echo(
        f"scan {family} {objective} ({mode}, seed {seed}): {len(res.hits)} hits in "
        f"{res.evaluations} evaluations, {res.seconds:.1f} s ({goal}); best span {b.span!r}: "
        + ("" if meas == "engagement" else f"{measure} {b.value:.3f}, ")
        + f"engagement {b.engagement:.3f}, max z {b.max_z:.2f}, "
        f"flagged {b.flagged}, target logp {b.target_logprob:.3f}"
    )
    if res.none_retokenized:
        typer.echo("scan: no candidate encoded back to its own tokens (the span's edges merge "
                   "with the text around it): try another --seed or template")  # fmt: skip
    if out is not None:
        run = {"family": family, "objective": objective, "measure": meas, "mode": mode,
               "budget": budget, "seed": seed, "model": mdir.name, "hashes": mon.hashes,
               "started": started, "version": __version__}  # fmt: skip
        write_scan(out, searcher, res, run=run)
        typer.echo(f"scan: wrote {out}/hits.jsonl, trajectory.jsonl, scan.json")


def install_garak_detector(
    python: Annotated[Path, typer.Option(help="the python of garak's own environment")],
) -> None:
    """Copy our circuit-telemetry detector into a garak environment (garak loads detectors
    only from its own package); then run garak there with ``-d sparsecircuits.CircuitTelemetry``
    against a running ``sparsecircuits serve``."""
    from sparsecircuits.redteam.adapters import GARAK_DETECTOR, install_garak_detector

    dest = install_garak_detector(python)
    env = "SPARSECIRCUITS_URL, _USER_KEY, _OPERATOR_KEY, _FAMILY"
    typer.echo(f"installed {dest}: use garak -d {GARAK_DETECTOR} (settings: {env})")


def register(app: typer.Typer) -> None:
    """Add ``scan`` and ``install-garak-detector`` to ``app``."""
    app.command()(scan)
    app.command("install-garak-detector")(install_garak_detector)
