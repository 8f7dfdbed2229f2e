"""Training a model with concatenated position channels (an option of the model config):
learned channels train and are projected like any embedding; sinusoidal ones stay fixed."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.model import load_model
from sparsecircuits.model.layers import sinusoids
from sparsecircuits.model.sparsity import l0_budget, sparse_parameter_names
from sparsecircuits.train.trainer import Trainer

from .conftest import tiny_config

MODEL = dict(n_layer=2, d_model=32, n_head=2, d_head=16, block_size=32, d_pos_emb=6,
             learned_pos_emb=False)  # fmt: skip


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_catpos_model_trains_and_keeps_its_budgets(small_corpus, cache_dir, tmp_path, sinusoidal):
    cfg = tiny_config(
        small_corpus, model={**MODEL, "sinusoidal_cat_pos_emb": sinusoidal}, steps=8,
        eval_every=8, checkpoint_every=8,
    )  # fmt: skip
    result = Trainer(cfg, run_dir=tmp_path / "run", device="cpu", cache_dir=cache_dir).run()
    model = load_model(tmp_path / "run")
    assert model.config.d_pos_emb == 6 and torch.isfinite(torch.tensor(result.val_loss))
    wpe = model.transformer.wpe.weight
    names = sparse_parameter_names(model)
    if sinusoidal:  # fixed: never trained, never projected
        torch.testing.assert_close(wpe, sinusoids(32, 6), atol=0, rtol=0)
        assert "transformer.wpe.weight" not in names
    else:
        assert "transformer.wpe.weight" in names
    params = dict(model.named_parameters())
    for name in names:
        assert int((params[name] != 0).sum()) <= l0_budget(params[name].shape, 1 / 8), name
