"""Hugging Face-style model directories (``config.json`` with a ``model_type``), read offline
and without running any of their code.

Two model types are understood:

- ``circuitgpt``: a local copy of the Hub repo ``openai/circuit-sparsity``. Its ``config.json``
  holds the official ``GPTConfig`` fields (translated by ``model/official.py``, the same table
  as ``beeg_config.json``) plus Hugging Face fields; its weights carry the wrapper's
  ``circuit_model.`` prefix (stripped; keys without it are accepted too).
- ``sparsecircuits_gpt``: what ``sparsecircuits export-hf`` writes: every field of our
  :class:`GPTConfig` at top level plus Hugging Face fields, tensors under exactly our names.

Weights: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``weight_map``), or a single other ``*.safetensors`` file; any float dtype, read as float32.
Python files of the snapshot (``modeling_*.py``, ``configuration_*.py``, ...) are never
imported: the architecture is ours, chosen from the config's fields.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from sparsecircuits.errors import CheckpointError, ConfigError
from sparsecircuits.fileio import read_json_object
from sparsecircuits.model.config import GPTConfig
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.official import Accepted, official_state, pop_neutral, translate_official

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PREFIX = "circuit_model."  # the Hub wrapper holds the official GPT as `.circuit_model`
_MEANS_FILE = "means.safetensors"  # our cached activation means may sit beside a model

# Fields Hugging Face (or the Hub repo's wrapper) writes that do not change the logits.
HF_NEUTRAL: dict[str, Accepted] = {
    "architectures": None,
    "auto_map": None,  # where transformers would find the remote code (never run here)
    "transformers_version": None,
    "torch_dtype": None,  # the storage dtype: tensors are read as float32 whatever it says
    "dtype": None,
    "_name_or_path": None,
    "bos_token_id": None,  # generation defaults
    "eos_token_id": None,
    "pad_token_id": None,
    "use_cache": None,
    "return_dict": None,
    "output_hidden_states": None,
    "output_attentions": None,
    "initializer_range": None,  # init only
    "_attn_implementation_autoset": None,  # which attention kernel transformers picked
    # The file decides: a tied model stores one matrix, and our tied_unembed is checked
    # against the weights (a tied config needs lm_head == wte).
    "tie_word_embeddings": None,
}
MODEL_TYPES = {
    "circuitgpt": "openai/circuit-sparsity on the Hub",
    "sparsecircuits_gpt": "written by sparsecircuits export-hf",
}


def snapshot_config(path: Path) -> tuple[GPTConfig, str]:
    """Translate a snapshot's ``config.json`` (``path``): (config, its model_type)."""
    data = read_json_object(path, missing=CheckpointError)
    source = str(path)
    model_type = data.pop("model_type", None)
    if model_type == "circuitgpt":
        return translate_official(data, source=source, neutral=HF_NEUTRAL), model_type
    if model_type == "sparsecircuits_gpt":
        return _our_config(data, source=source), model_type
    supported = ", ".join(f"{k} ({v})" for k, v in MODEL_TYPES.items())
    raise ConfigError(
        f"{source}: field 'model_type' = {model_type!r} is not supported (supported: {supported})"
    )


def _our_config(data: dict[str, Any], *, source: str) -> GPTConfig:
    """Our config fields, all of them present (an export is read back exactly), no others."""
    pop_neutral(data, HF_NEUTRAL, source=source)
    fields = GPTConfig.model_fields
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{source}: field '{key}' is not supported (not a field of sparsecircuits' "
                "GPTConfig; it may change inference)"
            )
    missing = [k for k in fields if k not in data]
    if missing:
        raise ConfigError(f"{source}: missing required field '{missing[0]}'")
    return GPTConfig.from_dict(data, source=source)


def read_snapshot(directory: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], str]:
    """(config, state in our names, the weights' source for error messages) of a snapshot.

    Shapes are checked here against the config, naming the shard that holds a misshapen
    tensor; missing and unexpected keys are left to ``io.load_state`` (as for every format).
    """
    config, model_type = snapshot_config(directory / CONFIG_FILE)
    tensors, origin, source = read_weights(directory)
    if model_type == "circuitgpt":
        state = official_state(tensors, config, source=source, prefixes=(HUB_PREFIX,))
        origin = {k.removeprefix(HUB_PREFIX): f for k, f in origin.items()}
    else:  # our names exactly: no prefix, no mask buffers, no filled-in defaults
        state = {}
        for key, t in tensors.items():
            if not t.is_floating_point():
                raise CheckpointError(f"{origin[key]}: '{key}' has dtype {t.dtype}, not a float")
            state[key] = t.float()
    with torch.device("meta"):
        expected = GPT(config).state_dict()
    for key, t in state.items():
        if key in expected and tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{origin.get(key, source)}: '{key}' has shape {tuple(t.shape)}, the config "
                f"implies {tuple(expected[key].shape)}"
            )
    return config, state, source


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Every tensor of a snapshot's safetensors weights, as stored (names, dtypes).

    Returns (tensors, {name: file holding it}, source): source is the single weights file or
    the shard index. A shard the index names but that is absent, a tensor in two shards, or an
    index that disagrees with the shards is a one-line CheckpointError.
    """
    index = directory / INDEX_FILE
    if index.exists():
        return _read_sharded(index)
    single = directory / SINGLE_FILE
    if not single.exists():
        others = sorted(
            p for p in directory.glob("*.safetensors") if p.is_file() and p.name != _MEANS_FILE
        )
        if len(others) != 1:
            found = f"; found {', '.join(p.name for p in others)}" if others else ""
            raise CheckpointError(
                f"{single}: file not found (a snapshot needs {SINGLE_FILE}, or {INDEX_FILE} "
                f"with its shards{found})"
            )
        single = others[0]
        log.info("reading the weights of %s from %s", directory, single.name)
    tensors = _read_file(single)
    return tensors, dict.fromkeys(tensors, str(single)), str(single)


def _read_sharded(index: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    weight_map = _weight_map(index)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name in sorted(set(weight_map.values())):
        shard = index.parent / name
        if Path(name).name != name or not shard.is_file():
            raise CheckpointError(f"{index}: shard '{name}' is not in {index.parent}")
        for key, t in _read_file(shard).items():
            if key in origin:
                raise CheckpointError(
                    f"{shard}: tensor '{key}' is also in {Path(origin[key]).name}"
                )
            if weight_map.get(key) != name:
                raise CheckpointError(
                    f"{shard}: holds '{key}', which {index.name} maps to "
                    f"{weight_map.get(key, 'no shard')!r}"
                )
            tensors[key], origin[key] = t, str(shard)
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CheckpointError(
            f"{index}: '{absent[0]}' is mapped to {weight_map[absent[0]]!r}, which lacks it"
        )
    return tensors, origin, str(index)


def _weight_map(index: Path) -> dict[str, str]:
    """The index's ``weight_map``; a name listed twice (JSON keeps only the last) is an error."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"{index}: '{key}' is listed twice")
            seen[key] = value
        return seen

    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{index}: not valid JSON ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected an object 'weight_map' of name -> shard file")
    return weight_map


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def is_snapshot_config(data: Mapping[str, Any]) -> bool:
    """Whether a parsed ``config.json`` is a Hugging Face-style one (it names a model_type)."""
    return "model_type" in data
