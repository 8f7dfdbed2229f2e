"""Model commands: ``sparsecircuits train | info | sample | eval-loss | export``.

Heavy imports happen inside commands so ``--help`` is instant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from sparsecircuits.cli.common import DEFAULT_MODEL, Device, ModelArg, parse_overrides, run_trainer
from sparsecircuits.errors import InputError, SparseCircuitsError


def train(
    preset: Annotated[str, typer.Option(help="tiny | small | paper")] = "small",
    out: Annotated[Path, typer.Option(help="run directory (checkpoints, metrics, model/)")] = Path(
        "runs/small"
    ),
    config: Annotated[Path | None, typer.Option(help="a train_config.json to use")] = None,
    steps: Annotated[int | None, typer.Option(help="override the number of steps")] = None,
    corpus: Annotated[
        str | None, typer.Option(help="stdlib, python-env, a dir/glob of .py files")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    set_: Annotated[list[str], typer.Option("--set", help="KEY=VALUE, e.g. optim.lr=0.01")] = [],  # noqa: B006
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
    device: Device = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="tokenizer/token cache")] = None,
) -> None:
    """Train a weight-sparse GPT (works under torchrun for data parallelism)."""
    from sparsecircuits.train.config import TrainConfig, merge_overrides, preset_config
    from sparsecircuits.train.trainer import Trainer, read_run_config

    overrides = parse_overrides(set_)
    for key, value in (("steps", steps), ("corpus", corpus), ("seed", seed)):
        if value is not None:
            overrides[key] = value
    if resume:
        cfg = read_run_config(out)
        if overrides:
            raise SparseCircuitsError("--resume continues the saved config; drop other options")
    elif config is not None:
        base = TrainConfig.from_json_file(config).model_dump(mode="json")
        cfg = TrainConfig.from_dict(merge_overrides(base, overrides), source=str(config))
    else:
        cfg = preset_config(preset, **overrides)
    trainer = Trainer(cfg, run_dir=out, device=device, cache_dir=cache_dir, resume=resume)
    run_trainer(trainer, steps=cfg.steps)


def info(
    model: ModelArg = DEFAULT_MODEL,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Config, total parameters and exact nonzeros per sparse matrix."""
    from sparsecircuits.console import print_summary
    from sparsecircuits.model.io import load_model, read_sparsity, resolve_model_dir
    from sparsecircuits.model.summary import model_summary

    mdir = resolve_model_dir(model)
    summary = model_summary(load_model(mdir), sparsity=read_sparsity(mdir))
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)


def _check_sample_options(*, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """One-line errors for sizes ``sample`` cannot use (negative, or zero where meaningless)."""
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"--temperature must be a number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {top_k}")


def fit_prompt(ids: list[int], *, context: int, max_new_tokens: int) -> tuple[list[int], str]:
    """The prompt tokens to keep, and a warning ("" if none) when the prompt is longer than the
    model's ``context``: then only its last ``context - max_new_tokens`` tokens are kept (at
    least half the context), so every new token still sees the whole kept prompt."""
    if len(ids) <= context:
        return ids, ""
    keep = max(context - max_new_tokens, context // 2, 1)
    warning = (
        f"warning: prompt is {len(ids)} tokens; kept the last {keep} "
        f"(the model's context is {context})"
    )
    return ids[-keep:], warning


def sample(
    model: ModelArg = DEFAULT_MODEL,
    prompt: Annotated[str, typer.Option(help="text to continue")] = "def ",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate (>= 1)")] = 128,
    temperature: Annotated[
        float, typer.Option(help="softmax temperature (>= 0; 0 takes the likeliest token)")
    ] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="sample among the k likeliest (>= 1)")] = 40,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
) -> None:
    """Generate a continuation of --prompt. A prompt longer than the model's context keeps its
    last tokens only, with a warning on stderr saying how many."""
    _check_sample_options(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    import torch

    from sparsecircuits.data import Tokenizer
    from sparsecircuits.model.io import load_model, resolve_model_dir
    from sparsecircuits.train.distributed import resolve_device

    mdir = resolve_model_dir(model)
    dev = resolve_device(device)
    m = load_model(mdir, device=dev)
    tok = Tokenizer.load(mdir)
    ids = tok.encode(prompt) or [tok.eot_id]
    ids, warning = fit_prompt(ids, context=m.config.block_size, max_new_tokens=max_new_tokens)
    if warning:
        typer.echo(warning, err=True)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = m.generate(
        torch.tensor([ids], device=dev),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        generator=gen,
    )
    typer.echo(tok.decode(out[0].tolist()))


def eval_loss(
    model: ModelArg = DEFAULT_MODEL,
    corpus: Annotated[
        str, typer.Option(help="stdlib, python-env, a dir/glob of .py files")
    ] = "stdlib",
    windows: Annotated[
        int | None,
        typer.Option(
            help="score only the first N held-out windows (block_size + 1 tokens each); "
            "default: all of them, as the model cards do"
        ),
    ] = None,
    val_fraction: Annotated[float, typer.Option()] = 0.02,
    device: Device = "auto",
    cache_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Validation loss (nats/token) on the corpus's held-out files (the model card's number)."""
    from sparsecircuits.data import Tokenizer, build_token_cache, load_corpus
    from sparsecircuits.model.io import load_model, resolve_model_dir
    from sparsecircuits.train.distributed import resolve_device
    from sparsecircuits.train.metrics import heldout_loss
    from sparsecircuits.train.trainer import default_cache_dir

    if windows is not None and windows < 1:
        raise InputError(f"--windows must be >= 1, got {windows}")
    mdir = resolve_model_dir(model)
    dev = resolve_device(device)
    m = load_model(mdir, device=dev)
    tok = Tokenizer.load(mdir)
    c = load_corpus(corpus, val_fraction=val_fraction)
    cache = (cache_dir or default_cache_dir()) / "tokens"
    _, val = build_token_cache(c, tok, cache_dir=cache)
    ev = heldout_loss(m, val, windows=windows, device=dev)
    n_all = val.num_windows(m.config.block_size + 1)
    n = ev["val_tokens"] // m.config.block_size
    scope = "all" if n == n_all else f"the first {n:,} of {n_all:,}"
    typer.echo(
        f"validation loss {ev['val_loss']:.4f} nats/token over {ev['val_tokens']:,} "
        f"tokens ({scope} windows) of {len(c.val)} held-out files"
    )


def export(
    run: Annotated[Path, typer.Argument(help="a finished training run directory")],
    name: Annotated[str, typer.Option(help="shipped model name, e.g. stdlib-sparse")],
    description: Annotated[str, typer.Option(help="one paragraph for the model card")] = "",
    dest: Annotated[Path | None, typer.Option(help="default: the package's pretrained/NAME")] = (
        None
    ),
    fp16: Annotated[list[str], typer.Option(help="tensor names stored in half precision")] = [],  # noqa: B006
    cache_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Write a compact shipped model + model card (validation loss, task table, nonzeros)."""
    from sparsecircuits.cards import export_run
    from sparsecircuits.model.io import PRETRAINED_ROOT

    target = dest or PRETRAINED_ROOT / name
    card = export_run(
        run, target, name=name, description=description or name, fp16=fp16, cache_dir=cache_dir
    )
    typer.echo(
        f"exported {name} to {target}: validation loss {card['val_loss']:.4f} nats/token, "
        f"{card['storage']['bytes'] / 1e6:.1f} MB"
    )


def register(app: typer.Typer) -> None:
    """Add the model commands to ``app``."""
    app.command()(train)
    app.command()(info)
    app.command()(sample)
    app.command("eval-loss")(eval_loss)
    app.command()(export)
