"""``sparsecircuits bridge train``: a new weight-sparse model trained jointly with bridges to a
frozen dense model (``sparsecircuits.bridges.joint``). Works under torchrun like ``train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sparsecircuits.cli.common import Device, parse_overrides, run_trainer
from sparsecircuits.errors import SparseCircuitsError

Opt = typer.Option


def train_cmd(
    dense: Annotated[str, Opt(help="the frozen dense model (dir, run or name)")],
    out: Annotated[Path, Opt(help="run directory (checkpoints, metrics, model/, bridges/)")],
    preset: Annotated[str, Opt(help="tiny | small | paper")] = "small",
    config: Annotated[Path | None, Opt(help="a train_config.json to use")] = None,
    steps: Annotated[int | None, Opt(help="override the number of steps")] = None,
    corpus: Annotated[str | None, Opt(help="stdlib, python-env, a dir/glob of .py files")] = None,
    seed: Annotated[int | None, Opt(help="seed of the model, bridges and batches")] = None,
    set_: Annotated[list[str], Opt("--set", help="KEY=VALUE, e.g. optim.lr=0.01")] = [],  # noqa: B006
    # the bridge options: None takes JointConfig's default on a fresh run and the run's own
    # setting on --resume (where a value that differs from it is refused, naming the field)
    coef_lm: Annotated[float | None, Opt(help="next-token loss coefficient (1)")] = None,
    coef_nmse: Annotated[float | None, Opt(help="encoder+decoder NMSE coefficient (1)")] = None,
    coef_kl: Annotated[float | None, Opt(help="hybrid KL coefficient, both ways (1)")] = None,
    k: Annotated[int | None, Opt(help="encoder AbsTopK keep-count (none)")] = None,
    bridge_lr: Annotated[float | None, Opt(help="the bridges' AdamW rate (1e-2)")] = None,
    resume: Annotated[bool, Opt(help="continue the run in --out")] = False,
    device: Device = "auto",
    cache_dir: Annotated[Path | None, Opt(help="tokenizer/token cache")] = None,
) -> None:
    """Train a weight-sparse GPT jointly with bridges to --dense (loss: the sparse model's
    next-token loss + NMSE of every encoder and decoder + the KL of every hybrid pass). The
    sparse model takes the dense model's tokenizer; their layer counts must match. The bridges
    are written to OUT/bridges (and in every checkpoint): check them with
    ``sparsecircuits bridge eval OUT/bridges --sparse OUT --dense DENSE``."""
    from sparsecircuits.bridges.joint import JointConfig, joint_trainer, read_joint_config
    from sparsecircuits.train.config import TrainConfig, merge_overrides, preset_config
    from sparsecircuits.train.trainer import read_run_config

    overrides = parse_overrides(set_)
    for key, value in (("steps", steps), ("corpus", corpus), ("seed", seed)):
        if value is not None:
            overrides[key] = value
    given = {"coef_lm": coef_lm, "coef_nmse": coef_nmse, "coef_kl": coef_kl, "k": k,
             "bridge_lr": bridge_lr}  # fmt: skip
    given = {name: v for name, v in given.items() if v is not None}
    if resume:
        cfg = read_run_config(out)
        if overrides or config is not None:
            raise SparseCircuitsError("--resume continues the saved config; drop other options")
        # the saved settings, and any given one must equal them (refused below, by name)
        joint = JointConfig.from_dict({**read_joint_config(out).model_dump(), **given},
                                      source="bridge train")  # fmt: skip
    else:
        if config is not None:
            base = TrainConfig.from_json_file(config).model_dump(mode="json")
            cfg = TrainConfig.from_dict(merge_overrides(base, overrides), source=str(config))
        else:
            cfg = preset_config(preset, **overrides)
        joint = JointConfig.from_dict(given, source="bridge train")
    trainer = joint_trainer(cfg, joint, dense=dense, run_dir=out, device=device,
                            cache_dir=cache_dir, resume=resume)  # fmt: skip
    run_trainer(trainer, steps=cfg.steps, saved=f", bridges to {out / 'bridges'}")


def register_train(bridge_app: typer.Typer) -> None:
    """Add ``train`` to the ``bridge`` command group."""
    bridge_app.command("train")(train_cmd)
