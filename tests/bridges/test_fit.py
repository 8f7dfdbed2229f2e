"""Post-hoc bridge fitting on tiny models: the loss falls, a killed fit resumed equals an
uninterrupted one, the files refuse other models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecircuits.bridges.fit import FitConfig, fit, fit_loss, load_bridges
from sparsecircuits.errors import InputError
from tests.model.helpers import tiny_model

HASHES = {"sparse": "s" * 64, "dense": "d" * 64}


class Windows:
    """The slice of TokenStore a fit uses: seeded windows of a fixed token array."""

    def __init__(self, vocab: int) -> None:
        self.ids = np.random.default_rng(0).integers(0, vocab, 5000)

    def sample_windows(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        starts = rng.integers(0, len(self.ids) - length, n)
        return np.stack([self.ids[s : s + length] for s in starts])


def _pair():
    return tiny_model(0), tiny_model(1)


CFG = FitConfig(steps=6, batch=2, seq_len=8, lr=3e-3, checkpoint_every=2, init_tokens=256)


def test_the_loss_falls(tmp_path: Path):
    sparse, dense = _pair()
    win = Windows(sparse.config.vocab_size)
    idx = torch.from_numpy(win.sample_windows(np.random.default_rng(9), 4, 8)).long()
    from sparsecircuits.bridges.bridge import Bridges

    torch.manual_seed(CFG.seed)
    fresh = Bridges(n_layer=sparse.config.n_layer, d_dense=dense.config.d_model,
                    d_sparse=sparse.config.d_model)  # fmt: skip
    before = float(fit_loss(sparse, dense, fresh, idx, CFG)[0].detach())
    fit(sparse, dense, win, tmp_path, CFG.model_copy(update={"steps": 30}), hashes=HASHES)
    fitted = load_bridges(tmp_path, hashes=HASHES)
    after = float(fit_loss(sparse, dense, fitted, idx, CFG)[0].detach())
    assert after < 0.8 * before, (before, after)


def test_a_killed_fit_resumed_equals_an_uninterrupted_one(tmp_path: Path):
    sparse, dense = _pair()
    win = Windows(sparse.config.vocab_size)
    fit(sparse, dense, win, tmp_path / "a", CFG, hashes=HASHES)

    def die(step: int, loss: float) -> None:
        if step == 3:  # after the checkpoint at step 2, before the one at 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(sparse, dense, win, tmp_path / "b", CFG, hashes=HASHES, progress=die)
    fit(sparse, dense, win, tmp_path / "b", CFG, hashes=HASHES, resume=True)
    a = load_bridges(tmp_path / "a", hashes=HASHES).state_dict()
    b = load_bridges(tmp_path / "b", hashes=HASHES).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and a fit resumed under another config is refused, not silently mixed
    with pytest.raises(InputError, match="another lr"):
        fit(sparse, dense, win, tmp_path / "b", CFG.model_copy(update={"lr": 1.0}),
            hashes=HASHES, resume=True)  # fmt: skip


def test_bridges_for_other_models_are_refused_in_one_line(tmp_path: Path):
    sparse, dense = _pair()
    fit(sparse, dense, Windows(sparse.config.vocab_size), tmp_path, CFG.model_copy(
        update={"steps": 1}), hashes=HASHES)  # fmt: skip
    with pytest.raises(InputError, match="another dense model") as err:
        load_bridges(tmp_path, hashes={**HASHES, "dense": "x" * 64})
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="cannot read"):
        load_bridges(tmp_path / "nowhere", hashes=HASHES)
    with pytest.raises(InputError, match="layer count"):
        fit(tiny_model(0), tiny_model(1, n_layer=1), Windows(10), tmp_path, CFG, hashes=HASHES)
