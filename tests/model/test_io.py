"""Our checkpoint format: round trips, and one-line errors for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsecircuits import load_model, save_model
from sparsecircuits.errors import CheckpointError, ConfigError

from .helpers import tiny_model, tokens


def saved(tmp_path: Path, **overrides) -> Path:
    directory = tmp_path / "model"
    save_model(tiny_model(seed=11, **overrides), directory)
    return directory


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def load_error(exc_type: type[Exception], directory: Path) -> str:
    with pytest.raises(exc_type) as err:
        load_model(directory)
    message = str(err.value)
    assert "\n" not in message and message.strip()
    return message


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tied_unembed": True},
        {"learnable_bigram_table": True, "sink": False},
        {"rms_norm": False, "afrac": None, "learned_pos_emb": False},
    ],
    ids=["default", "tied", "learnable_bigram", "layernorm_dense_nopos"],
)
def test_round_trip_gives_identical_logits(tmp_path: Path, overrides) -> None:
    model = tiny_model(seed=12, **overrides)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    idx = tokens(2, 10, seed=12)
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # The file path works as well as the directory.
    assert load_model(tmp_path / "model.safetensors").config == model.config


def test_tied_model_stores_the_shared_matrix_once(tmp_path: Path) -> None:
    save_model(tiny_model(seed=13, tied_unembed=True), tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_config_json_is_versioned_and_uses_the_official_loctype_string(tmp_path: Path) -> None:
    data = json.loads((saved(tmp_path) / "config.json").read_text())
    assert data["format"] == "sparsecircuits.gpt" and data["format_version"] == 1
    assert isinstance(data["afrac_loctypes"], str) and "attn_q" in data["afrac_loctypes"]


def test_save_overwrites_an_existing_model(tmp_path: Path) -> None:
    save_model(tiny_model(seed=1), tmp_path)
    second = tiny_model(seed=2)
    save_model(second, tmp_path)
    idx = tokens(1, 5)
    assert torch.equal(load_model(tmp_path)(idx)[0], second(idx)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_directory(tmp_path: Path) -> None:
    assert "no_such_dir" in load_error(CheckpointError, tmp_path / "no_such_dir")


def test_directory_with_neither_format(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    message = load_error(CheckpointError, tmp_path)
    assert "config.json" in message and "beeg_config.json" in message


def test_missing_weights_file(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / "model.safetensors").unlink()
    assert "model.safetensors" in load_error(CheckpointError, directory)


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5, -1])
def test_truncated_safetensors(tmp_path: Path, keep: float) -> None:
    directory = saved(tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:n])
    assert "model.safetensors" in load_error(CheckpointError, directory)


def test_unknown_config_field_is_named(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    edit_config(directory, n_experts=4)
    assert "n_experts" in load_error(ConfigError, directory)


def test_wrong_typed_config_field_is_named(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    edit_config(directory, n_layer="four")
    message = load_error(ConfigError, directory)
    assert "n_layer" in message and "four" in message


def test_invalid_config_value_is_named(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    edit_config(directory, afrac=1.5)
    assert "afrac" in load_error(ConfigError, directory)


def test_config_that_is_not_json(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    (directory / "config.json").write_text('{"n_layer": 2,')
    assert "config.json" in load_error(ConfigError, directory)


def test_config_of_another_format(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    edit_config(directory, format_version=99)
    assert "format" in load_error(ConfigError, directory)


@pytest.mark.parametrize(
    "changes",
    [{"d_model": 64}, {"n_layer": 3}, {"sink": False}, {"tied_unembed": True}],
    ids=["d_model", "n_layer", "sink", "tied"],
)
def test_weights_that_do_not_fit_the_config(tmp_path: Path, changes) -> None:
    directory = saved(tmp_path)
    edit_config(directory, **changes)
    load_error(CheckpointError, directory)


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    directory = saved(tmp_path)
    edit_config(directory, d_mlp=64)
    message = load_error(CheckpointError, directory)
    assert "mlp.c_fc" in message and "64" in message and "96" in message


def test_load_onto_a_device_argument(tmp_path: Path) -> None:
    model = load_model(saved(tmp_path), device="cpu")
    assert model.lm_head.weight.device.type == "cpu"
