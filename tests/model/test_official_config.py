"""Sizes in an official ``beeg_config.json``: zero, negative or non-integer sizes are one-line
ConfigErrors naming the file and the field, never an arithmetic traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sparsecircuits import load_model
from sparsecircuits.errors import ConfigError
from sparsecircuits.model.official import official_config
from tests.model.test_official_format import official_state, resolve, variant_config, write_official


def _write(tmp_path: Path, **changes: Any) -> Path:
    """An official directory whose config has ``changes`` (None deletes a field)."""
    config_json = variant_config("paper") | changes
    config_json = {k: v for k, v in config_json.items() if v is not None}
    return write_official(
        tmp_path, config_json, official_state(resolve(variant_config("paper")), 0)
    )


@pytest.mark.parametrize(
    ("changes", "field", "got"),
    [
        ({"n_head": 0, "d_head": None}, "n_head", "0"),  # d_model // 0: ZeroDivisionError
        ({"n_head": 0}, "n_head", "0"),
        ({"n_head": -4, "d_head": None}, "n_head", "-4"),
        ({"d_model": 0}, "d_model", "0"),
        ({"d_model": -48, "d_head": None}, "d_model", "-48"),
        ({"n_layer": 0}, "n_layer", "0"),
        ({"n_layer": -1}, "n_layer", "-1"),
        ({"d_head": 0}, "d_head", "0"),
        ({"d_head": -8}, "d_head", "-8"),
        ({"vocab_size": 0}, "vocab_size", "0"),
        ({"vocab_size": -72}, "vocab_size", "-72"),
        ({"block_size": 0}, "block_size", "0"),
        ({"d_mlp": 0}, "d_mlp", "0"),
        ({"d_mlp": None, "n_mlp": 0}, "n_mlp", "0"),  # the legacy name is the one named
        ({"n_embd": 0, "d_model": None, "d_head": None}, "n_embd", "0"),
        ({"n_head": "4", "d_head": None}, "n_head", "'4'"),  # str // str: TypeError
        ({"n_head": 4.0, "d_head": None}, "n_head", "4.0"),
        ({"n_head": True, "d_head": None}, "n_head", "True"),
    ],
)
def test_bad_size_names_the_file_and_field(tmp_path, changes, field, got) -> None:
    with pytest.raises(ConfigError) as err:
        load_model(_write(tmp_path, **changes))
    message = str(err.value)
    assert "beeg_config.json" in message and f"'{field}'" in message, message
    assert f"must be an integer >= 1, got {got}" in message, message
    assert "\n" not in message


def test_derived_head_width_of_zero_is_explained(tmp_path) -> None:
    # d_head absent: the official code uses d_model // n_head, here 48 // 64 = 0.
    with pytest.raises(ConfigError, match=r"beeg_config\.json: field 'd_head' is not given") as e:
        load_model(_write(tmp_path, n_head=64, d_head=None))
    assert "48 // 64" in str(e.value)


def test_null_derived_sizes_are_still_accepted(tmp_path) -> None:
    config = official_config(_write(tmp_path, d_head=None, n_embd=None) / "beeg_config.json")
    assert config.d_head == 48 // 4
