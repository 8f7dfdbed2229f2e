"""Compact storage (indices + values, optional fp16) for shipped models."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sparsecircuits.errors import CheckpointError
from sparsecircuits.model import GPT, WeightSparsity, load_model, save_model, sparse_parameter_names
from sparsecircuits.model.compact import META_KEY

from .helpers import randomize_, tiny_config


def _sparse_model(seed: int = 0) -> GPT:
    model = randomize_(GPT(tiny_config(vocab_size=128, d_model=64, d_mlp=256)), seed)
    WeightSparsity(model, sparse_parameter_names(model)).project_(1 / 16)
    return model


def test_round_trip_is_exact_and_smaller(tmp_path):
    model = _sparse_model()
    save_model(model, tmp_path / "plain")
    save_model(model, tmp_path / "compact", compact=True)
    loaded = load_model(tmp_path / "compact")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    plain = (tmp_path / "plain" / "model.safetensors").stat().st_size
    compact = (tmp_path / "compact" / "model.safetensors").stat().st_size
    assert compact < 0.6 * plain
    with safe_open(tmp_path / "compact" / "model.safetensors", framework="pt") as f:
        index = json.loads(f.metadata()[META_KEY])
    assert index["transformer.h.0.mlp.c_fc.weight"]["encoding"] == "sparse"
    assert index["bigram_table"]["encoding"] == "dense"  # dense tensors stay dense


def test_fp16_only_where_asked_and_error_is_bounded(tmp_path):
    model = _sparse_model(1)
    save_model(model, tmp_path, compact=True, fp16=["bigram_table"])
    loaded = load_model(tmp_path)
    assert loaded.bigram_table.dtype == torch.float32
    err = (loaded.bigram_table - model.bigram_table).abs().max()
    assert 0 < err <= 1e-3 * model.bigram_table.abs().max()
    w = "transformer.h.1.attn.c_attn.weight"
    assert torch.equal(loaded.state_dict()[w], model.state_dict()[w])  # not rounded
    idx = torch.randint(0, 128, (2, 16))
    assert (loaded(idx)[0] - model(idx)[0]).abs().max() <= err + 1e-5  # bigram adds to logits
    with pytest.raises(ValueError, match="compact"):
        save_model(model, tmp_path / "x", fp16=["bigram_table"])


def test_inconsistent_compact_file_is_a_checkpoint_error(tmp_path):
    model = _sparse_model(2)
    save_model(model, tmp_path, compact=True)
    path = tmp_path / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del tensors["transformer.h.0.mlp.c_fc.weight::idx"]
    save_file(tensors, path, meta)
    with pytest.raises(CheckpointError, match="inconsistent compact weights"):
        load_model(tmp_path)


def _corrupt_indices(path, name: str, change) -> None:
    """Rewrite ``name::idx`` of a compact ``model.safetensors`` with ``change(indices)``."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[name + "::idx"] = change(tensors[name + "::idx"])
    save_file(tensors, path, meta)


@pytest.mark.parametrize("storage", ["dense", "sparse"])
@pytest.mark.parametrize(
    ("change", "shown"),
    [
        (lambda i: torch.cat([i[:-1], torch.tensor([-1], dtype=i.dtype)]), "min -1"),
        (lambda i: torch.cat([i[:-1], torch.tensor([10**6], dtype=i.dtype)]), "max 1000000"),
        (lambda i: i.float(), "torch.float32 indices"),
    ],
)
def test_compact_indices_out_of_range_name_the_tensor(tmp_path, storage, change, shown):
    # A negative index used to wrap around silently (torch indexes from the end).
    save_model(_sparse_model(3), tmp_path, compact=True)
    name = "transformer.h.1.mlp.c_proj.weight"  # 64 x 256 entries
    _corrupt_indices(tmp_path / "model.safetensors", name, change)
    with pytest.raises(CheckpointError, match=f"'{name}'") as err:
        load_model(tmp_path, storage=storage)
    message = str(err.value)
    assert "model.safetensors" in message and shown in message, message
    if "indices outside" in message:
        assert "[0, 16384)" in message
    assert "\n" not in message
