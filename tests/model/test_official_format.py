"""Acceptance test: OpenAI's official checkpoint layout loads and gives the official logits.

The expected logits come from ``reference_logits`` below: an independent forward pass written
with plain torch ops from the official inference code's semantics (nothing is imported from
``sparsecircuits.model``, and attention is an explicit softmax, not SDPA). The sink follows the
official ``SDPAWithSink`` (flash path); note that the official ``load_model`` defaults to
``flash=False``, which builds no sink module and silently drops the sink logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sparsecircuits import load_model
from sparsecircuits.errors import CheckpointError, ConfigError

NODE_LOCS = "attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_q,attn_k,attn_v"

# The official GPTConfig defaults (they differ from ours), used for fields a config leaves out.
OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    block_size=1024,
    vocab_size=50304,
    n_layer=12,
    n_head=12,
    d_head=None,
    d_model=768,
    d_mlp=None,
    bias=True,
    ln_bias=True,
    rms_norm=False,
    residual_activation_type="identity",
    activation_type="gelu",
    afrac=None,
    afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out",
    tied_unembed=True,
    enable_bigram_table=False,
    sink=False,
)

# A released-style config: d_head (8) != d_model / n_head (12), d_mlp (96) != 4 * d_model, and
# the training-only fields the official loader drops or ignores.
BASE_CONFIG: dict[str, Any] = dict(
    block_size=20,
    vocab_size=72,
    n_layer=2,
    n_head=4,
    d_head=8,
    d_model=48,
    d_mlp=96,
    bias=True,
    ln_bias=True,
    rms_norm=True,
    residual_activation_type="identity",
    activation_type="gelu",
    afrac=0.25,
    afrac_loctypes=NODE_LOCS,
    tied_unembed=False,
    enable_bigram_table=True,
    learnable_bigram_table=False,
    bigram_table_rank=None,
    sink=True,
    dropout=0.0,
    flash=True,
    grad_checkpointing=True,
    debug_nans=False,
    tokenizer_name="tinypython_2k",
    pfrac=0.015625,
    expansion_factor=1,
    expansion_factor_mlp=4,
)


def resolve(config_json: dict[str, Any]) -> dict[str, Any]:
    """The effective official config: defaults, legacy ``n_mlp`` and derived widths."""
    c = {**OFFICIAL_DEFAULTS, **config_json}
    if "n_mlp" in c:
        c["d_mlp"] = c.pop("n_mlp")
    c["d_mlp"] = c["d_mlp"] or 4 * c["d_model"]
    c["d_head"] = c["d_head"] or c["d_model"] // c["n_head"]
    return c


# ------------------------------------------------------------------ official-layout state dict
def official_state(c: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the official key names, about half of each matrix zeroed."""
    gen = torch.Generator().manual_seed(seed)
    d, V, M, A = c["d_model"], c["vocab_size"], c["d_mlp"], c["n_head"] * c["d_head"]

    def rand(*shape: int, scale: float, density: float = 0.5) -> torch.Tensor:
        w = torch.randn(shape, generator=gen) * scale
        return w * (torch.rand(shape, generator=gen) < density)  # mimic weight sparsity

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": 1.0 + 0.2 * torch.randn(d, generator=gen)}
        if not c["rms_norm"] and c["ln_bias"]:
            out[f"{prefix}.bias"] = 0.2 * torch.randn(d, generator=gen)
        return out

    def linear(prefix: str, n_out: int, n_in: int) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": rand(n_out, n_in, scale=2.0 / math.sqrt(n_in))}
        if c["bias"]:
            out[f"{prefix}.bias"] = rand(n_out, scale=0.2)
        return out

    sd = {
        "transformer.wte.weight": rand(V, d, scale=1.0),
        "transformer.wpe.weight": rand(c["block_size"], d, scale=0.5),
    }
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}"
        sd |= norm(f"{p}.ln_1")
        sd |= linear(f"{p}.attn.c_attn", 3 * A, d)
        sd |= linear(f"{p}.attn.c_proj", d, A)
        if c["sink"]:
            # Nonzero, and large enough either way to matter, so a dropped sink is caught.
            sd[f"{p}.attn.attn_imp.sink_logit"] = 2.0 * torch.randn(c["n_head"], generator=gen)
        sd |= norm(f"{p}.ln_2")
        sd |= linear(f"{p}.mlp.c_fc", M, d)
        sd |= linear(f"{p}.mlp.c_proj", d, M)
    sd |= norm("transformer.ln_f")
    sd["lm_head.weight"] = (
        sd["transformer.wte.weight"]  # the official model shares one tensor when tied
        if c["tied_unembed"]
        else rand(V, d, scale=1.0 / math.sqrt(d))
    )
    sd["final_logits_bias"] = 0.3 * torch.randn(V, generator=gen)
    if c["enable_bigram_table"]:
        sd["bigram_table"] = torch.randn(V, V, generator=gen)
    return sd


def write_official(directory: Path, config_json: dict[str, Any], sd: dict[str, torch.Tensor]):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "beeg_config.json").write_text(json.dumps(config_json))
    torch.save(sd, directory / "final_model.pt")
    return directory


# ----------------------------------------------------------------------- reference forward
def _linear(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    y = x @ sd[f"{prefix}.weight"].T
    bias = sd.get(f"{prefix}.bias")
    return y if bias is None else y + bias


def _norm(c: dict, x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    w = sd[f"{prefix}.weight"]
    if c["rms_norm"]:  # torch.nn.RMSNorm with eps=None uses the dtype's machine epsilon
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * w
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-5) * w
    bias = sd.get(f"{prefix}.bias")
    return y if bias is None else y + bias


def _abstopk(c: dict, x: torch.Tensor, loc: str) -> torch.Tensor:
    if c["afrac"] is None or loc not in c["afrac_loctypes"].split(","):
        return x
    k = int(c["afrac"] * x.shape[-1])
    if k == 0:
        return torch.zeros_like(x)
    # Threshold at the k-th largest |x| (sort-based, unlike the model's topk + scatter). Ties at
    # the threshold only occur at 0 here (after a relu), where keeping extra zeros changes nothing.
    kth = x.abs().sort(dim=-1, descending=True).values[..., k - 1 : k]
    return torch.where(x.abs() >= kth, x, torch.zeros_like(x))


def _act(c: dict, x: torch.Tensor) -> torch.Tensor:
    if c["activation_type"] == "relu":
        return x.clamp_min(0)
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact GELU


def _resid(c: dict, x: torch.Tensor, loc: str) -> torch.Tensor:
    if c["residual_activation_type"] == "relu":
        x = x.clamp_min(0)
    return _abstopk(c, x, loc)


def _attention(q, k, v, sink_logit: torch.Tensor | None) -> torch.Tensor:
    """q, k, v: (B, H, T, D). Softmax over [sink, keys 0..t] written out by hand."""
    B, H, T, D = q.shape
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    scores = scores.masked_fill(future, -math.inf)
    if sink_logit is not None:
        # The sink is key slot 0 with k = 0 (so its logit is just sink_logit[h]) and v = 0.
        sink = sink_logit.view(1, H, 1, 1).expand(B, H, T, 1)
        scores = torch.cat([sink, scores], dim=-1)
        v = torch.cat([torch.zeros(B, H, 1, D), v], dim=2)
    e = (scores - scores.amax(-1, keepdim=True)).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


def reference_logits(c: dict, sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    H, D = c["n_head"], c["d_head"]
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}"
        h = _abstopk(c, _norm(c, x, sd, f"{p}.ln_1"), "attn_in")
        q, k, v = _linear(h, sd, f"{p}.attn.c_attn").split(H * D, dim=-1)
        q, k, v = (
            _abstopk(c, t, loc).view(B, T, H, D).transpose(1, 2)
            for t, loc in ((q, "attn_q"), (k, "attn_k"), (v, "attn_v"))
        )
        sink = sd[f"{p}.attn.attn_imp.sink_logit"] if c["sink"] else None
        y = _attention(q, k, v, sink).transpose(1, 2).reshape(B, T, H * D)
        x = x + _abstopk(c, _linear(y, sd, f"{p}.attn.c_proj"), "attn_out")
        x = _resid(c, x, "resid_post_attn")
        h = _abstopk(c, _norm(c, x, sd, f"{p}.ln_2"), "mlp_in")
        h = _abstopk(c, _act(c, _linear(h, sd, f"{p}.mlp.c_fc")), "mlp_neuron")
        x = x + _abstopk(c, _linear(h, sd, f"{p}.mlp.c_proj"), "mlp_out")
        x = _resid(c, x, "resid_post_mlp")
    unembed = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    logits = _norm(c, x, sd, "transformer.ln_f") @ unembed.T
    logits = logits + sd.get("final_logits_bias", torch.zeros(c["vocab_size"]))
    if c["enable_bigram_table"]:
        logits = logits + sd["bigram_table"][idx]
    return logits


# ------------------------------------------------------------------------------- variants
VARIANTS: dict[str, dict[str, Any]] = {
    # The released-model recipe, with the legacy `n_mlp` key instead of `d_mlp`.
    "paper_n_mlp": {"d_mlp": None, "n_mlp": 96},
    "paper": {},
    "released_extra_fields": {"n_embd": 48, "debug_exact_topk": False, "sparse_matmul_impl": "x"},
    "no_sink_no_bigram": {"sink": False, "enable_bigram_table": False},
    "sink_only": {"afrac": None, "enable_bigram_table": False},
    "dense_layernorm": {"rms_norm": False, "afrac": None, "sink": False},
    "layernorm_no_biases": {"rms_norm": False, "ln_bias": False, "bias": False},
    "afrac_half_subset": {"afrac": 0.5, "afrac_loctypes": "mlp_neuron,attn_k"},
    "resid_topk": {"afrac_loctypes": NODE_LOCS + ",resid_post_attn,resid_post_mlp"},
    "relu_resid": {"residual_activation_type": "relu", "activation_type": "relu"},
    "relu_resid_topk": {
        "residual_activation_type": "relu",
        "afrac_loctypes": "resid_post_attn,resid_post_mlp,mlp_neuron",
    },
    "tied_no_lm_head_key": {"tied_unembed": True},
    "tied_both_keys": {"tied_unembed": True},
    # Fields left out take the official defaults: LayerNorm, tied, no sink/bigram/AbsTopK.
    "official_defaults": "minimal",
}


def variant_config(name: str) -> dict[str, Any]:
    v = VARIANTS[name]
    if v == "minimal":
        return {k: BASE_CONFIG[k] for k in ("block_size", "vocab_size", "n_layer", "n_head")} | {
            "d_model": 48
        }
    return {k: val for k, val in {**BASE_CONFIG, **v}.items() if val is not None or k != "d_mlp"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_official_checkpoint_matches_reference_forward(tmp_path: Path, name: str) -> None:
    config_json = variant_config(name)
    c = resolve(config_json)
    seed = list(VARIANTS).index(name)
    sd = official_state(c, seed)
    if name == "tied_no_lm_head_key":
        del sd["lm_head.weight"]
    model = load_model(write_official(tmp_path, config_json, sd))

    idx = torch.randint(0, c["vocab_size"], (3, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits, _ = model(idx)
    expected = reference_logits(c, sd, idx)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    # The variant's features must actually move the logits, or the comparison proves little.
    for feature in ("sink", "enable_bigram_table"):
        if c[feature]:
            without = reference_logits({**c, feature: False}, sd, idx)
            assert (without - logits).abs().max() > 1e-2, feature
    if c["afrac"] is not None:
        dense = reference_logits({**c, "afrac": None}, sd, idx)
        assert (dense - logits).abs().max() > 1e-2


def test_loaded_config_follows_official_fields(tmp_path: Path) -> None:
    config_json = variant_config("paper_n_mlp")
    model = load_model(
        write_official(tmp_path, config_json, official_state(resolve(config_json), 0))
    )
    cfg = model.config
    assert (cfg.d_mlp, cfg.d_head, cfg.d_model, cfg.n_head) == (96, 8, 48, 4)
    assert cfg.afrac_loctypes == tuple(NODE_LOCS.split(","))
    assert cfg.sink and cfg.rms_norm and cfg.enable_bigram_table and not cfg.tied_unembed
    assert not model.training


def test_missing_final_logits_bias_loads_as_zeros(tmp_path: Path) -> None:
    config_json = variant_config("paper")
    c = resolve(config_json)
    sd = official_state(c, 1)
    del sd["final_logits_bias"]
    model = load_model(write_official(tmp_path, config_json, sd))
    assert torch.equal(model.final_logits_bias, torch.zeros(c["vocab_size"]))
    idx = torch.randint(0, c["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_logits(c, sd, idx), atol=1e-5, rtol=1e-5)


def test_torch_compile_prefix_and_non_flash_mask_buffer(tmp_path: Path) -> None:
    config_json = variant_config("no_sink_no_bigram")
    c = resolve(config_json)
    sd = official_state(c, 2)
    # A compiled model's state dict prefixes every key with `_orig_mod.`; the official slow
    # attention path also saves its causal mask as `attn.bias`, which carries no weights.
    block = c["block_size"]
    mask = torch.ones(block, block).tril().view(1, 1, block, block)
    saved = {f"_orig_mod.{k}": v for k, v in sd.items()}
    saved |= {f"_orig_mod.transformer.h.{i}.attn.bias": mask for i in range(c["n_layer"])}
    model = load_model(write_official(tmp_path, config_json, saved))
    idx = torch.randint(0, c["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_logits(c, sd, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scale_invariance", True),
        ("use_tied_aux_matrix", True),
        ("mup", True),
        ("bigram_table_rank", 4),
    ],
)
def test_unsupported_official_field_value_names_the_field(tmp_path, field, value) -> None:
    config_json = variant_config("paper") | {field: value}
    write_official(tmp_path, config_json, official_state(resolve(variant_config("paper")), 0))
    with pytest.raises(ConfigError, match=field) as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_unknown_official_field_names_the_field(tmp_path: Path) -> None:
    config_json = variant_config("paper") | {"n_experts": 4}
    write_official(tmp_path, config_json, official_state(resolve(variant_config("paper")), 0))
    with pytest.raises(ConfigError, match="n_experts"):
        load_model(tmp_path)


def test_n_embd_contradicting_d_model_is_rejected(tmp_path: Path) -> None:
    config_json = variant_config("paper") | {"n_embd": 64}
    write_official(tmp_path, config_json, official_state(resolve(variant_config("paper")), 0))
    with pytest.raises(ConfigError, match="n_embd"):
        load_model(tmp_path)


def test_official_weights_missing_a_key_name_it(tmp_path: Path) -> None:
    config_json = variant_config("paper")
    sd = official_state(resolve(config_json), 0)
    del sd["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_model(write_official(tmp_path, config_json, sd))


def test_official_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    config_json = variant_config("paper")
    sd = official_state(resolve(config_json | {"d_head": 4}), 0)  # c_attn rows no longer fit
    with pytest.raises(CheckpointError, match="c_attn"):
        load_model(write_official(tmp_path, config_json, sd))


def test_truncated_or_missing_final_model_pt(tmp_path: Path) -> None:
    config_json = variant_config("paper")
    write_official(tmp_path, config_json, official_state(resolve(config_json), 0))
    path = tmp_path / "final_model.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"final_model\.pt") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"final_model\.pt"):
        load_model(tmp_path)


def test_fields_left_out_take_the_official_defaults(tmp_path: Path) -> None:
    config_json = variant_config("official_defaults")
    model = load_model(
        write_official(tmp_path, config_json, official_state(resolve(config_json), 0))
    )
    cfg = model.config
    assert cfg.tied_unembed and not cfg.rms_norm and not cfg.sink
    assert cfg.afrac is None and not cfg.enable_bigram_table
    assert cfg.d_head == 48 // 4 and cfg.mlp_width == 4 * 48
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tied_checkpoint_with_two_different_matrices_is_rejected(tmp_path: Path) -> None:
    config_json = variant_config("tied_both_keys")
    sd = official_state(resolve(config_json), 0)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1.0
    with pytest.raises(CheckpointError, match="tied_unembed"):
        load_model(write_official(tmp_path, config_json, sd))
