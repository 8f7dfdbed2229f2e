"""``heldout_loss`` (what a model card reports) and ``sparsecircuits eval-loss``, whose default
must give the same number: every held-out window, not the first 64."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from sparsecircuits import cli
from sparsecircuits.data import build_token_cache, load_corpus, train_tokenizer
from sparsecircuits.model import GPT, GPTConfig, save_model
from sparsecircuits.train.metrics import evaluate, heldout_loss
from tests.data.conftest import python_source, write_py_files

VAL_FRACTION = 0.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random 8-token-context model, a generated corpus and its token cache."""
    root = tmp_path_factory.mktemp("heldout")
    tok = train_tokenizer([python_source(i) for i in range(100)], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=2,
                          d_head=8, d_model=16)).eval()  # fmt: skip
    save_model(model, root / "model")
    tok.save(root / "model")
    write_py_files(root / "code", 16)
    corpus = load_corpus(str(root / "code"), val_fraction=VAL_FRACTION)
    _, val = build_token_cache(corpus, tok, cache_dir=root / "cache" / "tokens")
    return root, model, val


def _eval_loss(root, *extra: str) -> str:
    args = ["eval-loss", str(root / "model"), "--corpus", str(root / "code"),
            "--val-fraction", str(VAL_FRACTION), "--cache-dir", str(root / "cache"),
            "--device", "cpu", *extra]  # fmt: skip
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    return res.output


def test_heldout_loss_scores_every_window(setup):
    _, model, val = setup
    n = val.num_windows(model.config.block_size + 1)
    got = heldout_loss(model, val, device=torch.device("cpu"))
    assert got["val_tokens"] == n * model.config.block_size
    assert heldout_loss(model, val, windows=3, device=torch.device("cpu"))["val_tokens"] == 24


def test_eval_loss_default_is_the_cards_number(setup):
    root, model, val = setup
    n = val.num_windows(model.config.block_size + 1)
    assert n > 64  # more windows than the old default scored
    card = heldout_loss(model, val, device=torch.device("cpu"))["val_loss"]  # as export_run
    first64 = evaluate(model, val, windows=64, batch_size=8, device=torch.device("cpu"))
    assert f"{first64['val_loss']:.4f}" != f"{card:.4f}"  # so the check below can tell them apart
    out = _eval_loss(root)
    assert re.search(rf"validation loss {card:.4f} nats/token over {n * 8:,} tokens", out), out
    assert "(all windows)" in out
    out = _eval_loss(root, "--windows", "5")
    assert f"(the first 5 of {n:,} windows)" in out, out


def test_eval_loss_rejects_a_window_count_below_one(setup):
    root, _, _ = setup
    res = CliRunner().invoke(cli.app, ["eval-loss", str(root / "model"), "--windows", "0"])
    assert res.exit_code != 0 and "--windows must be >= 1, got 0" in str(res.exception)
