"""jacobcd52's weight-sparse models (``github.com/jacobcd52/sparse_pretrain_public``, the
SimpleStories models on the Hub), read into our GPT.

A directory holds ``config.json`` (``model_config``: his ``ModelConfig`` fields;
``sparsity_config``: his ``SparsityConfig`` fields; ``training_config``, and for bridged models
``bridges_config``) and the state dict of his ``SparseGPT``: ``pytorch_model.bin``, or for a
model trained with bridges ``sparse_model.bin`` beside ``bridges.bin``. Weights are read with
``torch.load(weights_only=True)`` only. The bridges (encoders/decoders to a dense model) are
not part of the sparse model's forward pass and are not read.

His ``config.json`` does not record where AbsTopK was applied; his loaders use his default
(the 8 node locations). The ``training_config.yaml`` his scripts upload beside it does; when it
names locations, they are used, and ``resid_pre`` (AbsTopK on the residual stream before every
block, the embedding included), which our model lacks, is refused by name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sparsecircuits.errors import CheckpointError, ConfigError
from sparsecircuits.fileio import read_json_object
from sparsecircuits.model.config import GPTConfig
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.official import official_state

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("pytorch_model.bin", "sparse_model.bin")  # standalone, bridged
BRIDGES_FILE = "bridges.bin"
TRAINING_YAML = "training_config.yaml"

# His ModelConfig defaults, for fields a config leaves out (his dataclass fills them so).
_MODEL_DEFAULTS: dict[str, Any] = {
    "n_layer": 8,
    "d_model": 1024,
    "n_ctx": 256,
    "d_head": 16,
    "d_mlp": None,  # 4 * d_model
    "vocab_size": None,  # required in practice: his model cannot be built without it
    "use_rms_norm": True,
    "tie_embeddings": False,
    "use_positional_embeddings": False,
    "use_bigram_table": True,
    "use_attention_sinks": True,
    "activation": "gelu",
    "dropout": 0.0,  # training only
    "use_bias": True,
    "use_flash_attention": True,
}
_BOOLS = (
    "use_rms_norm",
    "tie_embeddings",
    "use_positional_embeddings",
    "use_bigram_table",
    "use_attention_sinks",
    "use_bias",
)
# His SparsityConfig: the fields that matter at inference, with his defaults.
_DEFAULT_LOCS = "attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_v,attn_k,attn_q"
_ACT_DEFAULTS: dict[str, Any] = {
    "enable_activation_sparsity": True,
    "activation_topk_fraction": 0.25,
    "activation_sparsity_locations": _DEFAULT_LOCS,
}
_TRAINING_ONLY = (  # weight-sparsity schedule: applied by his optimizer, not in the forward
    "enable_weight_sparsity",
    "target_l0_fraction",
    "sparsity_anneal_start_fraction",
    "sparsity_anneal_end_fraction",
    "anneal_type",
    "min_weights_per_neuron",
)
_TOP_LEVEL = ("model_config", "sparsity_config", "training_config", "bridges_config")
# His location names -> ours (resid_mid is the residual right after the attention add).
_LOCS = {
    **{loc: loc for loc in _DEFAULT_LOCS.split(",")},
    "resid_mid": "resid_post_attn",
}
# His SparseGPT's module names -> ours, by name prefix (in order: first match wins).
_RENAMES = (
    ("wte.", "transformer.wte."),
    ("wpe.", "transformer.wpe."),
    ("ln_f.", "transformer.ln_f."),
    ("blocks.", "transformer.h."),
)


def is_jacob_config(data: Mapping[str, Any]) -> bool:
    """Whether a parsed ``config.json`` is his (nested ``model_config``, no format marker)."""
    return isinstance(data.get("model_config"), dict) and not {"format", "model_type"} & set(data)


def _refuse(source: str, key: str, why: str) -> None:
    raise ConfigError(f"{source}: field '{key}' {why}")


def jacob_config(directory: Path) -> GPTConfig:
    """Translate his ``config.json`` (and the locations of ``training_config.yaml``)."""
    path = directory / CONFIG_FILE
    source = str(path)
    data = read_json_object(path, missing=CheckpointError)
    for key in data:
        if key not in _TOP_LEVEL:
            _refuse(source, key, "is not supported (not written by sparse_pretrain)")
    model = dict(data["model_config"])
    for key in model:
        if key not in _MODEL_DEFAULTS:
            _refuse(source, f"model_config.{key}", "is not supported (not in his ModelConfig)")
    m = {**_MODEL_DEFAULTS, **model}
    sparsity = data.get("sparsity_config") or {}
    if not isinstance(sparsity, dict):
        _refuse(source, "sparsity_config", "must be an object")
    for key in sparsity:
        if key not in _ACT_DEFAULTS and key not in _TRAINING_ONLY:
            _refuse(
                source, f"sparsity_config.{key}", "is not supported (not in his SparsityConfig)"
            )
    s = {**_ACT_DEFAULTS, **sparsity}
    locs_field = f"{source}: field 'sparsity_config.activation_sparsity_locations'"
    if "activation_sparsity_locations" not in sparsity:
        yaml_path = directory / TRAINING_YAML
        from_yaml = _yaml_locations(yaml_path)
        if from_yaml is not None:  # what training used; config.json does not record it
            s["activation_sparsity_locations"] = from_yaml
            locs_field = f"{yaml_path}: field 'sparsity.activation_sparsity_locations'"
    for key in ("n_layer", "d_model", "n_ctx", "d_head", "vocab_size"):
        value = m[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _refuse(source, f"model_config.{key}", f"must be an integer >= 1, got {value!r}")
    for key in _BOOLS:
        if not isinstance(m[key], bool):
            _refuse(source, f"model_config.{key}", f"must be true or false, got {m[key]!r}")
    if m["activation"] not in ("gelu", "relu"):  # he would run anything but "gelu" as ReLU
        _refuse(source, "model_config.activation", f"= {m['activation']!r} is not supported")
    if not isinstance(s["enable_activation_sparsity"], bool):
        _refuse(source, "sparsity_config.enable_activation_sparsity", "must be true or false")
    if m["d_model"] % m["d_head"]:  # his n_heads = d_model // d_head asserts divisibility
        _refuse(source, "model_config.d_head", f"= {m['d_head']} does not divide d_model")
    if m["use_flash_attention"] is not True:  # his non-flash path drops the sinks
        _refuse(source, "model_config.use_flash_attention", "= false is not supported")
    d_mlp = m["d_mlp"] if m["d_mlp"] is not None else 4 * m["d_model"]
    afrac, locs = _activation_sparsity(s, m["d_model"], d_mlp, source=source, locs_field=locs_field)
    fields = dict(
        block_size=m["n_ctx"],
        vocab_size=m["vocab_size"],
        n_layer=m["n_layer"],
        n_head=m["d_model"] // m["d_head"],
        d_head=m["d_head"],
        d_model=m["d_model"],
        d_mlp=d_mlp,
        bias=m["use_bias"],
        ln_bias=True,  # nn.LayerNorm always has one (unused with RMSNorm)
        rms_norm=m["use_rms_norm"],
        activation_type=m["activation"],
        afrac=afrac,
        afrac_loctypes=locs,
        tied_unembed=m["tie_embeddings"],
        enable_bigram_table=m["use_bigram_table"],
        learnable_bigram_table=True,  # an nn.Parameter in his model
        sink=m["use_attention_sinks"],
        learned_pos_emb=m["use_positional_embeddings"],
    )
    return GPTConfig.from_dict(fields, source=source)


def _activation_sparsity(
    s: Mapping[str, Any], d_model: int, d_mlp: int, *, source: str, locs_field: str
) -> tuple[float | None, tuple[str, ...]]:
    """(afrac, our locations) for his AbsTopK: he keeps ``max(1, int(width * fraction))``
    per token and skips a site whose k covers its width; we keep ``int(afrac * width)``.
    ``locs_field``: "file: field 'name'" of the locations, for errors."""
    frac_field = "sparsity_config.activation_topk_fraction"
    if s["enable_activation_sparsity"] is False:
        return None, ()
    frac = s["activation_topk_fraction"]
    if isinstance(frac, bool) or not isinstance(frac, int | float) or frac <= 0:
        _refuse(source, frac_field, f"must be a number > 0, got {frac!r}")
    ours = []
    for name in (x for x in str(s["activation_sparsity_locations"]).split(",") if x):
        if name not in _LOCS:  # e.g. resid_pre: before every block, the embedding included
            raise ConfigError(
                f"{locs_field} names '{name}', which is not supported (our locations: "
                f"{', '.join(_LOCS)})"
            )
        ours.append(_LOCS[name])
    if frac >= 1:  # every site keeps everything: no sparsity at all
        return None, ()
    widths = {"mlp_neuron": d_mlp}
    for name in ours:
        if int(widths.get(name, d_model) * frac) < 1:  # he keeps 1 there, we would keep 0
            _refuse(source, frac_field, f"= {frac} keeps no value at {name}; not supported")
    return float(frac), tuple(dict.fromkeys(ours))


def _yaml_locations(path: Path) -> str | None:
    """``activation_sparsity_locations`` of his ``training_config.yaml`` (None when absent).
    One scalar line in the files his ``to_yaml`` writes; read without a YAML parser."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    found = re.findall(r"^\s*activation_sparsity_locations:\s*(.*?)\s*$", text, re.MULTILINE)
    if not found:
        return None
    if len(set(found)) > 1:
        raise ConfigError(f"{path}: 'activation_sparsity_locations' is given twice, differently")
    value = found[0].split(" #", 1)[0].strip()
    return value[1:-1] if value[:1] in "'\"" and value[-1:] == value[:1] and value else value


def read_jacob(directory: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """(config, state in our names, weights file) of one of his model directories."""
    config = jacob_config(directory)
    path = next((directory / f for f in WEIGHTS_FILES if (directory / f).is_file()), None)
    if path is None:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILES[0]}: file not found (nor {WEIGHTS_FILES[1]}, the "
            "sparse model of a bridged checkpoint)"
        )
    if path.name == WEIGHTS_FILES[1] and (directory / BRIDGES_FILE).exists():
        log.info("%s: loading the sparse model; %s is not read", directory, BRIDGES_FILE)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt archives
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(raw).__name__}")
    renamed, origin = {}, {}
    for key, value in raw.items():
        name = key.removeprefix("_orig_mod.").removeprefix("module.")
        for old, new in _RENAMES:
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        name = name.replace(".attn.attn_fn.", ".attn.attn_imp.")  # the sink module
        if name in renamed:
            raise CheckpointError(f"{path}: '{name}' is stored twice (as '{key}' too)")
        renamed[name], origin[name] = value, key
    _check_keys(path, config, renamed, origin)
    # His model has no final logits bias: official_state fills it with zeros.
    return config, official_state(renamed, config, source=str(path)), str(path)


def _check_keys(
    path: Path, config: GPTConfig, state: Mapping[str, Any], origin: Mapping[str, str]
) -> None:
    """Missing, unexpected and misshapen tensors, named as his file names them (``io``'s
    checks would name them in our names)."""
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    expected.pop("final_logits_bias")  # his model has none
    for name, t in state.items():
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor '{origin[name]}' for this config")
        shape = tuple(getattr(t, "shape", ()))
        if shape != tuple(expected[name].shape):
            raise CheckpointError(
                f"{path}: '{origin[name]}' has shape {shape}, the config implies "
                f"{tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        his = missing[0].replace(".attn.attn_imp.", ".attn.attn_fn.")
        his = next((o + his[len(n) :] for o, n in _RENAMES if his.startswith(n)), his)
        raise CheckpointError(f"{path}: missing '{his}' (our '{missing[0]}')")
