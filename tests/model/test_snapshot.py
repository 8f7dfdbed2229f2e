"""Hugging Face-style snapshots: a local copy of the Hub repo ``openai/circuit-sparsity``
(``model_type: circuitgpt``) and what ``sparsecircuits export-hf`` writes
(``sparsecircuits_gpt``) load offline, without importing the Python files they ship.

The Hub-style models are tiny official-layout CatPosEmb checkpoints (``tests/model/test_catpos``)
written the way the Hub wrapper stores them (``circuit_model.`` prefix, Hugging Face fields in
``config.json``); logits and every hook tensor must match the official forward
(``test_catpos.reference``) of the weights as stored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from sparsecircuits import load_model
from sparsecircuits.data.tokenizer import EOT, Tokenizer, bytes_to_unicode
from sparsecircuits.errors import CheckpointError, ConfigError
from tests.model.helpers import tiny_model, tokens
from tests.model.test_catpos import catpos_config, catpos_state, reference
from tests.model.test_official_format import resolve

RAISING_PY = 'raise RuntimeError("snapshot code must never be imported")\n'
# Fields the Hub's config.json carries beyond the official GPTConfig (none changes inference).
HUB_EXTRAS: dict[str, Any] = {
    "model_type": "circuitgpt",
    "architectures": ["CircuitGPTForCausalLM"],
    "auto_map": {
        "AutoConfig": "config.CircuitGPTConfig",
        "AutoModelForCausalLM": "modeling_circuitgpt.CircuitGPTForCausalLM",
    },
    "transformers_version": "4.57.1",
    "torch_dtype": "float32",
    "bigram_table_rank": None,
    "unembed_rank": None,
    "afrac_ste": False,
    "afrac_ste_only_non_neurons": False,
    "afrac_approx": False,
    "rtopk": False,
    "mup": False,
    "mup_width_multiplier": 1.0,
    "enable_fp8_linear": False,
    "scale_invariance": False,
    "bos_token_id": 2047,
    "eos_token_id": 2047,
    "pad_token_id": 2047,
    "tokenizer_name": "tinypython_2k",
    "grad_checkpointing": False,
    "enable_sparse_kernels": False,
    "flash": True,
    "dropout": 0.0,
    "dropout_cat_pos_emb": False,
}
PY_FILES = ("modeling_circuitgpt.py", "config.py", "gpt.py", "hook_utils.py")


def write_weights(
    directory: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1, stem: str = "model"
) -> None:
    """``model.safetensors``, or ``shards`` files ``model-0000i-of-0000n.safetensors`` listed by
    ``model.safetensors.index.json`` (Hugging Face's sharded layout)."""
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}  # unshared
    if shards == 1:
        save_file(tensors, str(directory / f"{stem}.safetensors"), {"format": "pt"})
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(directory / shard), {"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index))


def write_hub(
    directory: Path,
    cfg: dict[str, Any],
    sd: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    prefix: str = "circuit_model.",
    **extra: Any,
) -> Path:
    """A Hub-style snapshot of official-layout weights ``sd`` and official config ``cfg``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {**cfg, **HUB_EXTRAS, "torch_dtype": str(dtype).removeprefix("torch."), **extra}
    (directory / "config.json").write_text(json.dumps(config))
    write_weights(directory, {prefix + k: v.to(dtype) for k, v in sd.items()}, shards=shards)
    for name in PY_FILES:  # the remote code: importing any of it fails loudly
        (directory / name).write_text(RAISING_PY)
    return directory


def hub_case(variant: str, seed: int = 3) -> tuple[dict, dict, dict]:
    """(config.json fields, resolved official config, official-layout weights)."""
    cfg = catpos_config(**({"sinusoidal_cat_pos_emb": True} if variant == "sinusoidal" else {}))
    c = resolve(cfg)
    return cfg, c, catpos_state(c, seed=seed)


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and mtime (to show nothing was written)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }


def load_error(exc_type: type[Exception], directory: Path, **kwargs: Any) -> str:
    before = listing(directory)
    with pytest.raises(exc_type) as err:
        load_model(directory, **kwargs)
    message = str(err.value)
    assert "\n" not in message and message.strip()
    assert listing(directory) == before  # nothing written, nothing removed
    return message


# ---------------------------------------------------------------------------------- circuitgpt
@pytest.mark.parametrize("variant", ["learned", "sinusoidal"])
@pytest.mark.parametrize(
    ("shards", "dtype"),
    [(1, torch.float32), (3, torch.float32), (1, torch.bfloat16), (2, torch.float16)],
    ids=["single-fp32", "sharded-fp32", "single-bf16", "sharded-fp16"],
)
def test_hub_snapshot_matches_the_official_forward(tmp_path, variant, shards, dtype) -> None:
    cfg, c, sd = hub_case(variant)
    directory = write_hub(tmp_path / "hub", cfg, sd, shards=shards, dtype=dtype)
    model = load_model(directory)
    assert model.config.d_pos_emb == c["d_pos_emb"] and model.config.sink
    assert model.config.sinusoidal_cat_pos_emb == (variant == "sinusoidal")
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    stored = {k: v.to(dtype).float() for k, v in sd.items()}  # what the file holds
    idx = torch.randint(0, c["vocab_size"], (2, c["block_size"]), generator=torch.Generator())
    want_logits, want = reference(c, stored, idx)
    logits, got = model.run_with_cache(idx)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)


def test_snapshot_code_is_never_imported(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd)
    (directory / "__init__.py").write_text(RAISING_PY)
    load_model(directory)
    assert not any("modeling_circuitgpt" in m or m == "hook_utils" for m in sys.modules)


def test_unprefixed_keys_and_mask_buffers_are_accepted(tmp_path) -> None:
    cfg, c, sd = hub_case("learned")
    block = c["block_size"]
    mask = torch.ones(block, block).tril().view(1, 1, block, block)
    with_masks = sd | {f"transformer.h.{i}.attn.bias": mask.clone() for i in range(c["n_layer"])}
    model = load_model(write_hub(tmp_path / "hub", cfg, with_masks, prefix=""))
    idx = tokens(vocab=c["vocab_size"], seq=block)
    torch.testing.assert_close(model(idx)[0], reference(c, sd, idx)[0], atol=1e-5, rtol=0)


def test_a_key_with_and_without_the_prefix_is_an_error(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd)
    key = "transformer.wte.weight"
    (directory / "model.safetensors").unlink()
    write_weights(directory, {f"circuit_model.{k}": v for k, v in sd.items()} | {key: sd[key]})
    assert key in load_error(CheckpointError, directory)


def hub_tokenizer_json() -> str:
    """A byte-level BPE tokenizer.json shaped like the Hub's: 2048 ids, EOT = 2047."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab |= {f"tok{i}": i for i in range(len(vocab), 2047)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    return hf.to_str()


def test_the_snapshot_tokenizer_loads_as_ours(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd)
    (directory / "tokenizer.json").write_text(hub_tokenizer_json())
    tok = Tokenizer.load(directory)
    assert tok.eot_id == 2047 and tok.vocab_size == 2048
    text = "def f(x):\n    return x"
    assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------- bad snapshots
def test_snapshot_without_weights(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd)
    (directory / "model.safetensors").unlink()
    message = load_error(CheckpointError, directory)
    assert "model.safetensors" in message and str(directory) in message


def test_weight_of_the_wrong_shape_names_file_and_key(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    key = "transformer.h.1.mlp.c_fc.weight"
    directory = write_hub(tmp_path / "hub", cfg, sd | {key: sd[key][:, :-1]}, shards=3)
    message = load_error(CheckpointError, directory)
    assert key in message and "-of-00003.safetensors" in message


def test_missing_sink_logit_is_named(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    key = "transformer.h.0.attn.attn_imp.sink_logit"
    directory = write_hub(tmp_path / "hub", cfg, {k: v for k, v in sd.items() if k != key})
    message = load_error(CheckpointError, directory)
    assert key in message and "model.safetensors" in message


def test_unexpected_bigram_table_is_named(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd, enable_bigram_table=False)
    assert "bigram_table" in load_error(CheckpointError, directory)


def test_unknown_model_type_names_it_and_the_supported_ones(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd, model_type="gpt2")
    message = load_error(ConfigError, directory)
    assert "config.json" in message and "'model_type'" in message and "'gpt2'" in message
    assert "circuitgpt" in message and "sparsecircuits_gpt" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("mup", True), ("rtopk", True), ("scale_invariance", True), ("rope_theta", 10000)],
)
def test_fields_that_change_inference_are_refused_by_name(tmp_path, field, value) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd, **{field: value})
    message = load_error(ConfigError, directory)
    assert "config.json" in message and f"field '{field}'" in message
    assert "is not supported" in message


def test_sparse_storage_is_refused(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd)
    assert "storage='sparse'" in load_error(ConfigError, directory, storage="sparse")


def _edit_index(directory: Path, edit) -> None:
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_naming_a_missing_shard(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd, shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    message = load_error(CheckpointError, directory)
    assert "model.safetensors.index.json" in message and "model-00002-of-00002" in message


def test_a_tensor_in_two_shards(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd, shards=2)
    key = "circuit_model.transformer.wte.weight"
    first = directory / "model-00001-of-00002.safetensors"
    second = directory / "model-00002-of-00002.safetensors"
    from safetensors.torch import load_file

    holder, other = (first, second) if key in load_file(str(first)) else (second, first)
    save_file({**load_file(str(other)), key: sd["transformer.wte.weight"]}, str(other))
    message = load_error(CheckpointError, directory)
    assert key in message and holder.name in message and other.name in message


def test_an_index_listing_a_tensor_twice(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd, shards=2)
    path = directory / "model.safetensors.index.json"
    text = path.read_text().replace(
        '"weight_map": {', '"weight_map": {"circuit_model.bigram_table": "x.safetensors", ', 1
    )
    path.write_text(text)
    message = load_error(CheckpointError, directory)
    assert "circuit_model.bigram_table" in message and "twice" in message


def test_an_index_that_disagrees_with_its_shards(tmp_path) -> None:
    cfg, _, sd = hub_case("learned")
    directory = write_hub(tmp_path / "hub", cfg, sd, shards=2)
    _edit_index(directory, lambda m: m.pop("circuit_model.transformer.ln_f.weight"))
    assert "transformer.ln_f.weight" in load_error(CheckpointError, directory)


# ------------------------------------------------------------------- sparsecircuits_gpt (export)
def write_export(directory: Path, model, **extra: Any) -> Path:
    """What ``sparsecircuits export-hf`` writes: our config fields at top level plus Hugging
    Face fields, our tensor names (a tied unembedding stored once), remote code and tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "sparsecircuits_gpt",
        "architectures": ["SparseCircuitsGPTForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_sparsecircuits.SparseCircuitsGPT"},
        "transformers_version": "4.57.1",
        "torch_dtype": "float32",
        **model.config.to_json_dict(),
        **extra,
    }
    (directory / "config.json").write_text(json.dumps(config))
    state = dict(model.state_dict())
    if model.config.tied_unembed:
        state.pop("lm_head.weight")
    write_weights(directory, state)
    for name in ("configuration_sparsecircuits.py", "modeling_sparsecircuits.py"):
        (directory / name).write_text(RAISING_PY)
    (directory / "tokenizer.json").write_text(hub_tokenizer_json())
    return directory


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"d_pos_emb": 6, "learned_pos_emb": False, "sinusoidal_cat_pos_emb": True},
        {"tied_unembed": True, "rms_norm": False, "sink": False, "afrac": None},
    ],
    ids=["default", "catpos", "tied-layernorm"],
)
def test_export_reads_back_exactly(tmp_path, overrides) -> None:
    model = tiny_model(seed=5, **overrides)
    loaded = load_model(write_export(tmp_path / "out", model))
    assert loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    idx = tokens()
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_export_with_an_unknown_field_is_refused(tmp_path) -> None:
    directory = write_export(tmp_path / "out", tiny_model(seed=5), rope_theta=10000)
    message = load_error(ConfigError, directory)
    assert "config.json" in message and "field 'rope_theta' is not supported" in message


def test_export_missing_a_field_is_refused(tmp_path) -> None:
    directory = write_export(tmp_path / "out", tiny_model(seed=5))
    path = directory / "config.json"
    config = json.loads(path.read_text())
    del config["sink"]
    path.write_text(json.dumps(config))
    assert "'sink'" in load_error(ConfigError, directory)


def test_export_with_a_prefixed_or_missing_tensor_is_refused(tmp_path) -> None:
    model = tiny_model(seed=5)
    directory = write_export(tmp_path / "out", model)
    state = {f"circuit_model.{k}": v for k, v in model.state_dict().items()}
    write_weights(directory, state)
    assert "circuit_model." in load_error(CheckpointError, directory)
    state = {k: v for k, v in model.state_dict().items() if k != "final_logits_bias"}
    write_weights(directory, state)
    assert "final_logits_bias" in load_error(CheckpointError, directory)
