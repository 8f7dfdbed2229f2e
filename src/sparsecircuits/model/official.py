"""OpenAI's official model directories: ``beeg_config.json`` (translated into a
:class:`GPTConfig`) and ``final_model.pt`` (read into our parameter names).

The translation (:func:`translate_official`) and the state clean-up (:func:`official_state`)
are shared with the Hugging Face Hub snapshot reader (``model/snapshot.py``), whose
``config.json`` carries the same official fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sparsecircuits.errors import CheckpointError, ConfigError
from sparsecircuits.fileio import read_json_object
from sparsecircuits.model.config import GPTConfig

# Accepted values of a field that does not change inference; None means "any value".
Accepted = tuple[Any, ...] | None

# Fields of official configs that do not change inference here, with the values we accept.
OFFICIAL_NEUTRAL: dict[str, Accepted] = {
    "bigram_table_rank": (None,),
    "unembed_rank": (None,),
    "use_tied_aux_matrix": (False, None),
    "dropout_cat_pos_emb": None,  # training only
    "mup": (False,),
    "mup_width_multiplier": None,
    "afrac_ste": None,  # training-time straight-through options
    "afrac_ste_only_non_neurons": None,
    "afrac_approx": (False,),
    "rtopk": (False,),
    "enable_fp8_linear": None,
    "scale_invariance": (False,),
    "pfrac": None,
    "expansion_factor": None,
    "expansion_factor_mlp": None,
    "flash": None,
    "grad_checkpointing": None,
    "debug_nans": None,
    "enable_sparse_kernels": None,
    "tokenizer_name": None,
    "dropout": (0, 0.0),  # inference only: dropout is off anyway
    # Present in released configs but not in the official GPTConfig (training-side switches).
    "debug_exact_topk": None,
    "sparse_matmul_impl": None,
}
# The official GPTConfig fields that are ours too, with the official defaults (they differ
# from ours): absent official fields take these values.
_OFFICIAL_DEFAULTS: dict[str, Any] = {
    "block_size": 1024,
    "vocab_size": 50304,
    "n_layer": 12,
    "n_head": 12,
    "d_head": None,  # derived: d_model // n_head
    "d_model": 768,
    "d_mlp": None,  # derived: 4 * d_model
    "bias": True,
    "ln_bias": True,
    "rms_norm": False,
    "residual_activation_type": "identity",
    "activation_type": "gelu",
    "afrac": None,
    "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out",
    "tied_unembed": True,
    "enable_bigram_table": False,
    "learnable_bigram_table": False,
    "sink": False,
    "d_pos_emb": None,
    "sinusoidal_cat_pos_emb": False,
}
_LEGACY = ("n_mlp", "n_embd")  # older names of d_mlp and d_model

# Sizes of an official config; those in _NULLABLE may be null (then derived from the others).
_SIZES = (
    "block_size",
    "vocab_size",
    "n_layer",
    "n_head",
    "d_head",
    "d_model",
    "d_mlp",
    "d_pos_emb",
)
_NULLABLE = ("d_head", "d_mlp", "n_mlp", "n_embd", "d_pos_emb")


def _check_size(source: str, key: str, value: Any) -> None:
    """A size field must be a whole number >= 1 (checked before any arithmetic uses it)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{source}: field '{key}' must be an integer >= 1, got {value!r}")


def _check_sizes(source: str, raw: Mapping[str, Any]) -> None:
    """Every size field present in ``raw`` (legacy names included) is a whole number >= 1."""
    for key in (*_SIZES, *_LEGACY):
        if key in raw and not (raw[key] is None and key in _NULLABLE):
            _check_size(source, key, raw[key])


def pop_neutral(data: dict[str, Any], table: Mapping[str, Accepted], *, source: str) -> None:
    """Remove the fields of ``table`` from ``data``; a value outside its accepted ones (one
    that would change inference) is a one-line ConfigError naming the field."""
    for key, accepted in table.items():
        if key in data:
            value = data.pop(key)
            if accepted is not None and value not in accepted:
                raise ConfigError(
                    f"{source}: field '{key}' = {value!r} is not supported "
                    f"(supported: {', '.join(map(repr, accepted))})"
                )


def official_config(path: Path) -> GPTConfig:
    """Translate an official ``beeg_config.json`` into a :class:`GPTConfig`."""
    return translate_official(read_json_object(path), source=str(path))


def translate_official(
    raw: Mapping[str, Any], *, source: str, neutral: Mapping[str, Accepted] | None = None
) -> GPTConfig:
    """A :class:`GPTConfig` from the fields of an official ``GPTConfig`` (``raw``, as JSON).

    Fields in :data:`OFFICIAL_NEUTRAL` or ``neutral`` (e.g. a Hub config's own fields) are
    dropped after their values are checked; any other field that is not an official one is
    refused by name, since we cannot know that it leaves inference unchanged.
    """
    extra = {**OFFICIAL_NEUTRAL, **(neutral or {})}
    for key in raw:
        if key not in _OFFICIAL_DEFAULTS and key not in extra and key not in _LEGACY:
            raise ConfigError(
                f"{source}: field '{key}' is not supported (not a field of the official "
                "GPTConfig; it may change inference)"
            )
    _check_sizes(source, raw)
    data = {**_OFFICIAL_DEFAULTS, **raw}
    if "n_mlp" in data:  # legacy name
        data["d_mlp"] = data.pop("n_mlp")
    if "n_embd" in data:  # nanoGPT's name for d_model, still written into released configs
        n_embd = data.pop("n_embd")
        if "d_model" not in raw:
            data["d_model"] = n_embd
        elif n_embd is not None and n_embd != raw["d_model"]:
            raise ConfigError(
                f"{source}: field 'n_embd' = {n_embd!r} contradicts 'd_model' = {raw['d_model']!r}"
            )
    pop_neutral(data, extra, source=source)
    if data.get("d_head") is None:  # derived as the official code does
        d_model, n_head = data["d_model"], data["n_head"]
        _check_size(source, "d_model" if "d_model" in raw else "n_embd", d_model)
        _check_size(source, "n_head", n_head)
        if d_model < n_head:
            raise ConfigError(
                f"{source}: field 'd_head' is not given and d_model // n_head = {d_model} // "
                f"{n_head} is 0; give d_head, or an n_head no larger than d_model"
            )
        data["d_head"] = d_model // n_head
    # The official model adds wpe to the residual unless positions are concatenated channels.
    data["learned_pos_emb"] = data.get("d_pos_emb") is None
    return GPTConfig.from_dict(data, source=source)


def is_mask_buffer(key: str) -> bool:
    """Whether ``key`` is the causal-mask buffer of the official non-flash attention
    (``transformer.h.{i}.attn.bias``, (1, 1, block, block)): not a weight, rebuilt by us."""
    return key.endswith(".attn.bias") and key.count(".") == 4


def official_state(
    raw: Mapping[str, Any], config: GPTConfig, *, source: str, prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Official-layout tensors as our state: ``prefixes`` (and torch.compile / DDP wrappers)
    stripped, mask buffers dropped, sparse tensors densified, floats made float32, and the
    ``final_logits_bias`` older checkpoints lack filled with zeros (as the official loader
    does). A key present both with and without a prefix is an error."""
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key
        for prefix in (*prefixes, "_orig_mod.", "module."):
            name = name.removeprefix(prefix)
        if is_mask_buffer(name):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry '{key}' is not a tensor")
        if name in state:
            raise CheckpointError(f"{source}: '{name}' is stored twice (as '{key}' too)")
        state[name] = (value.to_dense() if value.is_sparse else value).float()
    state.setdefault("final_logits_bias", torch.zeros(config.vocab_size))
    return state


def read_official_state(path: Path, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The tensors of an official ``final_model.pt`` (read with ``weights_only=True``)."""
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt archives
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err})"
        ) from None
    if isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
        raw = raw["model"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(raw).__name__}")
    return official_state(raw, config, source=str(path))
