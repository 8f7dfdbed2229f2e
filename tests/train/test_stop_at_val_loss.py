"""``stop_at_val_loss``: stop at the first evaluation that reaches a validation loss, with the
checkpoint and final model saved there (how a loss-matched dense baseline is made)."""

from __future__ import annotations

import json

import pytest

from sparsecircuits.errors import ConfigError
from sparsecircuits.model import load_model
from sparsecircuits.train.checkpoint import list_checkpoints
from sparsecircuits.train.trainer import Trainer

from .conftest import tiny_config


def _evals(run) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r]


def test_stops_at_the_first_evaluation_at_or_below_the_loss(small_corpus, cache_dir, tmp_path):
    # Every validation loss of a tiny model is below 100 nats/token: stop at the first eval.
    cfg = tiny_config(small_corpus, stop_at_val_loss=100.0)
    run = tmp_path / "run"
    result = Trainer(cfg, run_dir=run, device="cpu", cache_dir=cache_dir).run()
    assert result.steps == cfg.eval_every < cfg.steps
    evals = _evals(run)
    assert [r["step"] for r in evals] == [cfg.eval_every]
    assert result.val_loss == evals[-1]["val_loss"] <= 100.0
    assert load_model(run / "model") is not None
    assert list_checkpoints(run)[-1].name == f"step_{cfg.eval_every:08d}"
    # Resuming the stopped run trains no further.
    again = Trainer(cfg, run_dir=run, device="cpu", cache_dir=cache_dir, resume=True).run()
    assert again.steps == cfg.eval_every and again.val_loss == result.val_loss


def test_an_unreached_loss_trains_every_step(small_corpus, cache_dir, tmp_path):
    cfg = tiny_config(small_corpus, stop_at_val_loss=1e-6, steps=16)
    result = Trainer(cfg, run_dir=tmp_path / "run", device="cpu", cache_dir=cache_dir).run()
    assert result.steps == cfg.steps
    assert [r["step"] for r in _evals(tmp_path / "run")] == [8, 16]


def test_stop_at_val_loss_must_be_positive(small_corpus):
    with pytest.raises(ConfigError, match="stop_at_val_loss"):
        tiny_config(small_corpus, stop_at_val_loss=0.0)
