"""Exporting a finished run as a shipped model with a model card."""

import json

import torch
from typer.testing import CliRunner

from sparsecircuits import cli
from sparsecircuits.cards import export_run
from sparsecircuits.model import load_model
from sparsecircuits.train.trainer import Trainer

from .conftest import tiny_config


def test_export_writes_a_verified_compact_model_and_card(small_corpus, cache_dir, tmp_path):
    cfg = tiny_config(
        small_corpus,
        tokenizer_vocab=1024,
        steps=8,
        eval_every=4,
        checkpoint_every=4,
        model=dict(n_layer=1, d_model=32, n_head=2, d_head=16, block_size=128),
    )
    run = tmp_path / "run"
    Trainer(cfg, run_dir=run, device="cpu", cache_dir=cache_dir).run()
    dest = tmp_path / "shipped" / "tiny-sparse"
    card = export_run(
        run,
        dest,
        name="tiny-sparse",
        description="a test model",
        fp16=["bigram_table"],
        n_pairs=4,
        cache_dir=cache_dir,
    )

    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "sparsity.json",
        "train_config.json",
        "metrics.jsonl",
        "card.json",
        "README.md",
    ):
        assert (dest / f).exists(), f
    assert json.loads((dest / "card.json").read_text()) == card
    assert len(card["tasks"]) == 20
    assert card["training"]["steps"] == 8 and card["training"]["tokens_seen"] == 8 * 4 * 128
    assert card["storage"]["fp16"] == ["bigram_table"]
    assert 0 < card["storage"]["max_abs_logit_diff_vs_fp32_original"] < 0.05
    assert card["storage"]["bytes"] < (run / "model" / "model.safetensors").stat().st_size

    original, shipped = load_model(run / "model"), load_model(dest)
    w = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(original.state_dict()[w], shipped.state_dict()[w])  # weights exact
    readme = (dest / "README.md").read_text()
    assert "validation loss" in readme and "| single_double_quote |" in readme
    assert "sparsecircuits train --config" in readme
    assert not list(dest.parent.glob(".tmp-*"))  # written via a temp dir, then renamed

    # The card's validation loss is what `sparsecircuits eval-loss` prints by default.
    args = ["eval-loss", str(dest), "--corpus", str(small_corpus), "--val-fraction",
            str(cfg.val_fraction), "--cache-dir", str(cache_dir), "--device", "cpu"]  # fmt: skip
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    expected = (
        f"validation loss {card['val_loss']:.4f} nats/token over "
        f"{card['data']['val_tokens']:,} tokens (all windows)"
    )
    assert expected in res.output, res.output
