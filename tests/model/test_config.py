"""GPTConfig: official field names, strict validation, one-line errors, JSON round trip."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sparsecircuits.errors import ConfigError
from sparsecircuits.model import ALL_LOCS, NODE_LOCS, GPTConfig


def config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        GPTConfig.from_dict(data)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_paper_recipe() -> None:
    cfg = GPTConfig()
    assert cfg.rms_norm and cfg.sink and cfg.enable_bigram_table and not cfg.tied_unembed
    assert cfg.afrac == 0.25 and cfg.afrac_loctypes == NODE_LOCS
    assert cfg.d_head == 16 and cfg.activation_type == "gelu"
    assert cfg.mlp_width == 4 * cfg.d_model and cfg.d_attn == cfg.n_head * cfg.d_head
    assert len(NODE_LOCS) == 8 and set(ALL_LOCS) - set(NODE_LOCS) == {
        "resid_post_attn",
        "resid_post_mlp",
    }


def test_explicit_d_mlp() -> None:
    assert GPTConfig(d_model=32, d_mlp=40).mlp_width == 40


@pytest.mark.parametrize(
    "value",
    [
        "attn_in,mlp_neuron",
        " attn_in , mlp_neuron ",
        ["attn_in", "mlp_neuron"],
        ("attn_in", "mlp_neuron"),
    ],
)
def test_afrac_loctypes_accepts_comma_string_and_lists(value) -> None:
    cfg = GPTConfig.from_dict({"afrac_loctypes": value})
    assert cfg.afrac_loctypes == ("attn_in", "mlp_neuron")


def test_empty_loctypes() -> None:
    assert GPTConfig.from_dict({"afrac_loctypes": ""}).afrac_loctypes == ()


@pytest.mark.parametrize("value", ["attn_in,attn_z", ["mlp_out", "neurons"]])
def test_unknown_location_is_rejected(value) -> None:
    message = config_error({"afrac_loctypes": value})
    assert "afrac_loctypes" in message and ("attn_z" in message or "neurons" in message)


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(),
        GPTConfig(afrac=None, afrac_loctypes=(), d_mlp=100, tied_unembed=True),
        GPTConfig(afrac_loctypes=ALL_LOCS, residual_activation_type="relu", rms_norm=False),
    ],
)
def test_to_json_dict_round_trips(cfg: GPTConfig) -> None:
    data = json.loads(json.dumps(cfg.to_json_dict()))
    assert isinstance(data["afrac_loctypes"], str)  # the official comma-separated form
    assert GPTConfig.from_dict(data) == cfg


def test_unknown_field_is_named() -> None:
    assert "n_experts" in config_error({"n_experts": 8})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_layer", "four"),
        ("n_layer", 4.0),  # strict: no silent float -> int
        ("n_layer", True),  # strict: a bool is not an int
        ("rms_norm", "yes"),
        ("afrac", "0.25"),
        ("activation_type", "swish"),
        ("residual_activation_type", "gelu"),
    ],
)
def test_wrong_typed_field_is_named(field: str, value) -> None:
    message = config_error({field: value})
    assert f"'{field}'" in message and repr(value) in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_layer", 0), ("d_head", -1), ("d_mlp", 0), ("afrac", 0.0), ("afrac", 1.5)],
)
def test_out_of_range_values_are_named(field: str, value) -> None:
    message = config_error({field: value})
    assert field in message and "<root>" not in message


def test_integral_afrac_is_accepted() -> None:
    assert GPTConfig.from_dict({"afrac": 1}).afrac == 1.0


def test_non_object_input() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        GPTConfig.from_dict([1, 2])


def test_configs_are_frozen_and_replace_validates() -> None:
    cfg = GPTConfig()
    with pytest.raises(ValidationError):
        cfg.n_layer = 3
    assert cfg.replace(n_layer=3).n_layer == 3 and cfg.n_layer == 4
    with pytest.raises(ConfigError, match="n_layer"):
        cfg.replace(n_layer="three")


def test_from_json_file(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"n_layer": 2, "afrac_loctypes": "mlp_in"}))
    cfg = GPTConfig.from_json_file(path)
    assert cfg.n_layer == 2 and cfg.afrac_loctypes == ("mlp_in",)
    with pytest.raises(ConfigError, match="not found"):
        GPTConfig.from_json_file(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        GPTConfig.from_json_file(path)
    assert "\n" not in str(err.value)
