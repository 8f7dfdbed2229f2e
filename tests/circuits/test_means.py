"""Pretraining means: stored with the weights hash they belong to; stale files are ignored."""

from __future__ import annotations

import torch

from sparsecircuits.circuits.means import (
    MEANS_FILE,
    activation_means,
    load_or_compute_means,
    save_means,
    zero_values,
)
from sparsecircuits.circuits.nodes import NodeSpace
from tests.circuits.conftest import circuit_model


def _values(space: NodeSpace, fill: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, fill) for k, v in zero_values(space).items()}


def test_model_dir_means_are_used_only_for_their_own_weights(tmp_path):
    model = circuit_model(vocab_size=64)
    space = NodeSpace(model.config)
    model_dir, cache = tmp_path / "model", tmp_path / "cache"
    model_dir.mkdir()
    save_means(_values(space, 1.0), model_dir / MEANS_FILE, model_hash="a" * 64)
    # The cache entry for hash "b..." is what a model with those weights must get.
    cached = cache / "means" / f"{'b' * 24}-stdlib-64.st"
    save_means(_values(space, 2.0), cached, model_hash="b" * 64)

    got = load_or_compute_means(
        model, None, model_hash="a" * 64, model_dir=model_dir, cache_dir=cache
    )
    assert float(got["0.attn_in"][0]) == 1.0
    got = load_or_compute_means(
        model, None, model_hash="b" * 64, model_dir=model_dir, cache_dir=cache
    )
    assert float(got["0.attn_in"][0]) == 2.0  # the model dir's file belongs to other weights


def test_means_leave_out_padding():
    """Right-padded prompts: the mean over real positions equals the mean of each prompt run
    on its own; padding (token 0 here) must not count."""
    model = circuit_model(vocab_size=64)
    space = NodeSpace(model.config)
    a, b = torch.tensor([[5, 9, 3, 7, 1]]), torch.tensor([[8, 2]])
    padded = torch.tensor([[5, 9, 3, 7, 1], [8, 2, 0, 0, 0]])
    got = activation_means(model, padded, space=space, lengths=torch.tensor([5, 2]))
    ma = activation_means(model, a, space=space)
    mb = activation_means(model, b, space=space)
    for key, v in got.items():
        want = (5 * ma[key] + 2 * mb[key]) / 7
        assert torch.allclose(v, want, atol=1e-5), key
