"""``sparsecircuits bridge fit|train|eval|nodes|steer|card``: bridges between a sparse and a dense
model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparsecircuits.errors import InputError, SparseCircuitsError

bridge_app = typer.Typer(no_args_is_help=True, help="Bridges between a sparse and a dense model.")
SparseOpt = Annotated[str, typer.Option(help="the weight-sparse model (dir, run or name)")]
DenseOpt = Annotated[str, typer.Option(help="the dense model (dir, run or name)")]


def _pair(sparse: str, dense: str):
    """Both models (eval mode, frozen), the shared tokenizer and their weights hashes."""
    from sparsecircuits.data import Tokenizer
    from sparsecircuits.model.io import load_model, resolve_model_dir, weights_hash

    sd, dd = resolve_model_dir(sparse), resolve_model_dir(dense)
    tok = Tokenizer.load(sd)
    if Tokenizer.load(dd).fingerprint() != tok.fingerprint():
        raise InputError(f"--dense {dense}: another tokenizer than --sparse {sparse}'s")
    s, d = load_model(sd), load_model(dd)
    return s, d, tok, {"sparse": weights_hash(s), "dense": weights_hash(d)}


@bridge_app.command("fit")
def fit_cmd(
    out: Annotated[Path, typer.Option(help="directory for bridges.safetensors/.json")],
    sparse: SparseOpt = "stdlib-sparse",
    dense: DenseOpt = "stdlib-dense",
    steps: Annotated[int, typer.Option(help="optimiser steps")] = 500,
    batch: Annotated[int, typer.Option(help="windows per step")] = 8,
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-3,
    seed: Annotated[int, typer.Option(help="seed of the bridges and the windows")] = 0,
    init: Annotated[
        str, typer.Option(help="start: lstsq (least-squares maps) or random")
    ] = "lstsq",
    init_tokens: Annotated[int, typer.Option(help="tokens of the least-squares start")] = 65536,
    resume: Annotated[bool, typer.Option(help="continue from OUT/checkpoint.pt")] = False,
) -> None:
    """Fit post-hoc bridges between two frozen models on the stdlib corpus's training files."""
    from pydantic import ValidationError
    from rich.progress import Progress

    from sparsecircuits.bridges.fit import FitConfig, fit
    from sparsecircuits.data import build_token_cache, load_corpus
    from sparsecircuits.model.config import format_validation_error
    from sparsecircuits.train.trainer import default_cache_dir

    try:
        cfg = FitConfig(steps=steps, batch=batch, seq_len=seq_len, lr=lr, seed=seed, init=init,
                        init_tokens=init_tokens)  # fmt: skip
    except ValidationError as err:
        raise InputError(format_validation_error(err, source="bridge fit")) from None
    s, d, tok, hashes = _pair(sparse, dense)
    if cfg.seq_len > min(s.config.block_size, d.config.block_size):
        raise InputError(f"--seq-len {seq_len}: longer than a model's context")
    train, _ = build_token_cache(
        load_corpus("stdlib"), tok, cache_dir=default_cache_dir() / "tokens"
    )
    with Progress(transient=True) as bar:
        task = bar.add_task("fitting bridges", total=cfg.steps)

        def tick(step: int, loss: float) -> None:
            bar.update(task, completed=step, description=f"fitting bridges (loss {loss:.3f})")

        meta = fit(s, d, train, out, cfg, hashes=hashes, resume=resume, progress=tick)
    typer.echo(f"bridge fit: {meta['steps']} steps in {meta['seconds']} s; wrote {out}")


@bridge_app.command("eval")
def eval_cmd(
    bridges: Annotated[str, typer.Argument(help="bridges: a directory or a shipped name")],
    sparse: SparseOpt = "stdlib-sparse",
    dense: DenseOpt = "stdlib-dense",
    windows: Annotated[int, typer.Option(help="held-out windows")] = 32,
    seq_len: Annotated[int, typer.Option(help="tokens per window")] = 128,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write JSON here")] = None,
) -> None:
    """Per-site fidelity on held-out files: NMSE both ways, hybrid KL and next-token
    agreement both ways, beside the sparse model alone. Also written to
    BRIDGES_DIR/fidelity.json, where serving and the dashboard read it."""
    from sparsecircuits.bridges.evaluate import FIDELITY_FILE, fidelity, format_table
    from sparsecircuits.bridges.fit import is_shipped, load_bridges, load_meta, resolve_bridges_dir
    from sparsecircuits.circuits.means import pretrain_windows
    from sparsecircuits.fileio import atomic_write_json

    if windows < 1 or seq_len < 2:
        raise InputError("--windows must be >= 1 and --seq-len >= 2")
    bridges_dir = resolve_bridges_dir(bridges)
    s, d, tok, hashes = _pair(sparse, dense)
    b = load_bridges(bridges_dir, hashes=hashes)
    doc = fidelity(s, d, b, pretrain_windows(tok, n_windows=windows, length=seq_len))
    typer.echo(f"{doc['windows']} held-out windows of {seq_len} tokens")
    typer.echo(format_table(doc))
    doc["weights_sha256"] = load_meta(bridges_dir).weights_sha256  # which bridges were measured
    if is_shipped(bridges_dir):  # the package's own files are not rewritten by a user's run
        typer.echo("(not written beside the shipped bridges; use --json to keep it)")
    else:
        atomic_write_json(bridges_dir / FIDELITY_FILE, doc)
    if json_out is not None:
        atomic_write_json(json_out, doc)


TaskOpt = Annotated[
    str, typer.Option("--prompts", help="the task whose prompts define the classes")
]
PositionsOpt = Annotated[str, typer.Option(help="steer the last position or all positions")]


def _positions(value: str):
    if value not in ("last", "all"):
        raise InputError(f"--positions {value!r}: expected last or all")
    return value


@bridge_app.command("nodes")
def nodes_cmd(
    prompts: TaskOpt,
    sparse: SparseOpt = "stdlib-sparse",
    circuit: Annotated[
        Path | None,
        typer.Option(help="circuit.json (default: the sparse model's shipped circuit of the task)"),
    ] = None,
    positions: PositionsOpt = "last",
    top: Annotated[int, typer.Option(help="rows to print")] = 10,
    pairs: Annotated[int, typer.Option(help="train pairs per class")] = 100,
) -> None:
    """A circuit's nodes ordered by how well they separate the task's two classes (the
    candidates for ``bridge steer --node``)."""
    from sparsecircuits.bridges.steer import parse_node, rank_nodes
    from sparsecircuits.circuits.schema import load_circuit
    from sparsecircuits.data import Tokenizer
    from sparsecircuits.model.io import load_model, resolve_model_dir
    from sparsecircuits.tasks import registry

    sd = resolve_model_dir(sparse)
    path = circuit or sd / "monitor" / "circuits" / prompts
    model = load_model(sd).eval()
    doc = load_circuit(path, model=model)
    if doc.task != prompts:
        raise InputError(f"--circuit {path}: a circuit of {doc.task}, not of {prompts}")
    nodes = [parse_node(n.id, model) for n in doc.nodes if n.loc != "embed"]
    train = registry.get(prompts).build(Tokenizer.load(sd), split="train", n=pairs,
                                        max_len=model.config.block_size)  # fmt: skip
    rows = rank_nodes(model, nodes, train, positions=_positions(positions), top=top)
    typer.echo(f"{'node':<22}{'mean a':>9}{'mean b':>9}{'separation':>12}")
    for r in rows:
        typer.echo(f"{r['node']:<22}{r['mean_a']:>+9.3f}{r['mean_b']:>+9.3f}"
                   f"{r['separation']:>12.2f}")  # fmt: skip


@bridge_app.command("steer")
def steer_cmd(
    bridges: Annotated[str, typer.Argument(help="bridges: a directory or a shipped name")],
    node: Annotated[str, typer.Option(help="sparse node LAYER.LOCATION.INDEX")],
    prompts: TaskOpt,
    src: Annotated[str, typer.Option("--from", help="the class moved from (a or b)")] = "a",
    dst: Annotated[str, typer.Option("--to", help="the class moved to (a or b)")] = "b",
    scale: Annotated[list[float], typer.Option(help="multiplier of the move (repeatable)")] = [1.0],  # noqa: B006
    seeds: Annotated[int, typer.Option(help="random-direction controls")] = 5,
    pairs: Annotated[int, typer.Option(help="pairs per split of the task")] = 100,
    side_pairs: Annotated[int, typer.Option(help="test pairs per other task")] = 50,
    heldout_windows: Annotated[int, typer.Option(help="held-out windows (0: skip)")] = 16,
    positions: PositionsOpt = "last",
    sparse: SparseOpt = "stdlib-sparse",
    dense: DenseOpt = "stdlib-dense",
    json_out: Annotated[Path | None, typer.Option("--json", help="also write JSON here")] = None,
) -> None:
    """Steer the dense model through a sparse node and the bridge, beside a random direction
    of equal norm, the dense class-mean difference and the sparse model steered itself."""
    from sparsecircuits.bridges.evaluate import FIDELITY_FILE
    from sparsecircuits.bridges.fit import load_bridges, load_meta, resolve_bridges_dir
    from sparsecircuits.bridges.steer import check_sides, parse_node
    from sparsecircuits.bridges.steer_run import format_steering, run_steering
    from sparsecircuits.circuits.means import pretrain_windows
    from sparsecircuits.fileio import atomic_write_json
    from sparsecircuits.tasks import registry

    check_sides(src, dst)
    registry.get(prompts)  # an unknown task is one line before any model loads
    if seeds < 1 or pairs < 1 or side_pairs < 0 or heldout_windows < 0 or not scale:
        raise InputError("--seeds and --pairs must be >= 1, --side-pairs and "
                         "--heldout-windows >= 0")  # fmt: skip
    bridges_dir = resolve_bridges_dir(bridges)
    s, d, tok, hashes = _pair(sparse, dense)
    b = load_bridges(bridges_dir, hashes=hashes)
    n = parse_node(node, s)
    windows = (
        pretrain_windows(tok, n_windows=heldout_windows, length=128) if heldout_windows else None
    )
    doc = run_steering(s, d, b, tok, task=prompts, node=n, src=src, dst=dst, scales=scale,
                       seeds=list(range(seeds)), n_pairs=pairs, side_pairs=side_pairs,
                       positions=_positions(positions), windows=windows)  # fmt: skip
    doc["bridges_sha256"] = load_meta(bridges_dir).weights_sha256
    fid = bridges_dir / FIDELITY_FILE
    if fid.exists():  # the site's fidelity travels with the result, if it is of these bridges
        from sparsecircuits.monitor.bridged import load_fidelity

        try:
            doc["site_fidelity"] = load_fidelity(bridges_dir, weights_sha256=doc["bridges_sha256"])[
                doc["site"]
            ].model_dump()
        except SparseCircuitsError as err:  # other bridges' or a malformed file: say so, go on
            typer.echo(f"note: no site fidelity recorded ({err})", err=True)
        except KeyError:
            typer.echo(f"note: {fid} has no row for {doc['site']}", err=True)
    typer.echo(format_steering(doc))
    if json_out is not None:
        atomic_write_json(json_out, doc)


@bridge_app.command("card")
def card_cmd(
    bridges: Annotated[str, typer.Argument(help="bridges: a directory or a shipped name")],
    name: Annotated[str, typer.Option(help="the name the bridges are published under")],
    sparse: SparseOpt = "stdlib-sparse",
    dense: DenseOpt = "stdlib-dense",
) -> None:
    """Write BRIDGES/README.md from the directory's own files: metadata, fidelity table and
    steering experiments, each with the command that reproduces it."""
    from sparsecircuits.bridges.card import CARD_FILE, card_text
    from sparsecircuits.bridges.fit import resolve_bridges_dir
    from sparsecircuits.fileio import atomic_write

    d = resolve_bridges_dir(bridges)
    text = card_text(d, name=name, sparse=sparse, dense=dense)
    atomic_write(d / CARD_FILE, lambda tmp: Path(tmp).write_text(text))
    typer.echo(f"wrote {d / CARD_FILE}")


def register(app: typer.Typer) -> None:
    """Add the ``bridge`` group to ``app``."""
    from sparsecircuits.cli.bridge_train import register_train

    if not any(c.name == "train" for c in bridge_app.registered_commands):
        register_train(bridge_app)  # joint training lives in its own module (it is long)
    app.add_typer(bridge_app, name="bridge")
