"""Concatenated position channels (official ``BlockCatPosEmb``): an official-layout checkpoint
loads and gives the logits and every hook tensor of an independent reference forward.

The reference below is written from the official inference code's semantics with plain torch
ops (nothing from ``sparsecircuits.model``): positions are *not* added to the residual; each
attention and MLP reads ``cat([norm(x), norm_p(wpe[:T])])`` and AbsTopK at ``attn_in`` /
``mlp_in`` keeps ``int(afrac * (d_model + d_pos_emb))`` of the concatenation.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from sparsecircuits import load_model
from sparsecircuits.errors import ConfigError
from sparsecircuits.model import GPT, GPTConfig
from tests.model.test_official_format import (
    BASE_CONFIG,
    NODE_LOCS,
    _abstopk,
    _act,
    _attention,
    _linear,
    _norm,
    _resid,
    official_state,
    resolve,
    write_official,
)

D_POS = 6


def official_sinusoids(T: int, D: int) -> torch.Tensor:
    """The official init, transcribed step by step (periods 4 .. T, sin block then cos)."""
    half = max(1, D // 2)
    periods = torch.logspace(math.log10(4.0), math.log10(max(4.0, float(T))), steps=half)
    angles = torch.arange(T, dtype=torch.float32).unsqueeze(1) * (2 * math.pi / periods)
    enc = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if enc.shape[1] < D:
        enc = torch.cat([enc, torch.zeros(T, D - enc.shape[1])], dim=1)
    return enc[:, :D]


def catpos_state(c: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Official-layout weights of a CatPosEmb model: the plain layout with the attention and MLP
    inputs widened by d_pos_emb, ``ln_p1``/``ln_p2`` norms and a (block_size, d_pos_emb) wpe."""
    gen = torch.Generator().manual_seed(seed + 1)
    plain = official_state(c, seed)
    d_in, P = c["d_model"] + c["d_pos_emb"], c["d_pos_emb"]
    sd = dict(plain)
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}"
        for name in ("attn.c_attn", "mlp.c_fc"):
            w = plain[f"{p}.{name}.weight"]
            extra = torch.randn(w.shape[0], P, generator=gen) * (2.0 / math.sqrt(d_in))
            sd[f"{p}.{name}.weight"] = torch.cat([w, extra], dim=1)
        for ln in ("ln_p1", "ln_p2"):
            sd[f"{p}.{ln}.weight"] = 1.0 + 0.2 * torch.randn(P, generator=gen)
            if not c["rms_norm"] and c["ln_bias"]:
                sd[f"{p}.{ln}.bias"] = 0.2 * torch.randn(P, generator=gen)
    if c.get("sinusoidal_cat_pos_emb"):
        sd["transformer.wpe.weight"] = official_sinusoids(c["block_size"], P)
    else:
        sd["transformer.wpe.weight"] = torch.randn(c["block_size"], P, generator=gen)
    return sd


def reference(c: dict, sd: dict, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits (B, T, V) and every hook tensor of the official CatPosEmb forward."""
    B, T = idx.shape
    H, D = c["n_head"], c["d_head"]
    hooks: dict[str, torch.Tensor] = {}
    x = sd["transformer.wte.weight"][idx]
    pos = sd["transformer.wpe.weight"][:T].expand(B, T, -1)
    for i in range(c["n_layer"]):
        p = f"transformer.h.{i}"
        hooks[f"{i}.resid_in"] = x
        h = torch.cat([_norm(c, x, sd, f"{p}.ln_1"), _norm(c, pos, sd, f"{p}.ln_p1")], dim=-1)
        h = hooks[f"{i}.attn.act_in"] = _abstopk(c, h, "attn_in")
        q, k, v = _linear(h, sd, f"{p}.attn.c_attn").split(H * D, dim=-1)
        q, k, v = (_abstopk(c, t, loc) for t, loc in ((q, "attn_q"), (k, "attn_k"), (v, "attn_v")))
        hooks[f"{i}.attn.q"], hooks[f"{i}.attn.k"], hooks[f"{i}.attn.v"] = q, k, v
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        sink = sd[f"{p}.attn.attn_imp.sink_logit"] if c["sink"] else None
        y = hooks[f"{i}.attn.y"] = _attention(q, k, v, sink).transpose(1, 2).reshape(B, T, H * D)
        delta = hooks[f"{i}.attn.resid_delta"] = _abstopk(
            c, _linear(y, sd, f"{p}.attn.c_proj"), "attn_out"
        )
        x = hooks[f"{i}.resid_mid"] = _resid(c, x + delta, "resid_post_attn")
        h = torch.cat([_norm(c, x, sd, f"{p}.ln_2"), _norm(c, pos, sd, f"{p}.ln_p2")], dim=-1)
        h = hooks[f"{i}.mlp.act_in"] = _abstopk(c, h, "mlp_in")
        h = hooks[f"{i}.mlp.post_act"] = _abstopk(
            c, _act(c, _linear(h, sd, f"{p}.mlp.c_fc")), "mlp_neuron"
        )
        delta = hooks[f"{i}.mlp.resid_delta"] = _abstopk(
            c, _linear(h, sd, f"{p}.mlp.c_proj"), "mlp_out"
        )
        x = _resid(c, x + delta, "resid_post_mlp")
    hooks["final_resid"] = x
    unembed = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    logits = _norm(c, x, sd, "transformer.ln_f") @ unembed.T + sd["final_logits_bias"]
    if c["enable_bigram_table"]:
        logits = logits + sd["bigram_table"][idx]
    return logits, hooks


VARIANTS = {
    "learned": {},
    "sinusoidal": {"sinusoidal_cat_pos_emb": True},
    "odd_sinusoidal": {"sinusoidal_cat_pos_emb": True, "d_pos_emb": 7},  # a zero-padded column
    "layernorm_tied": {"rms_norm": False, "tied_unembed": True, "sink": False},
    "relu_resid_topk": {
        "residual_activation_type": "relu",
        "afrac_loctypes": NODE_LOCS + ",resid_post_attn,resid_post_mlp",
    },
}


def catpos_config(**overrides: Any) -> dict[str, Any]:
    # AbsTopK at all 8 node sites, sink and bigram table (BASE_CONFIG), plus the position fields.
    return {**BASE_CONFIG, "d_pos_emb": D_POS, "dropout_cat_pos_emb": False, **overrides}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_catpos_checkpoint_matches_the_reference(tmp_path, variant):
    cfg = catpos_config(**VARIANTS[variant])
    c = resolve(cfg)
    sd = catpos_state(c, seed=sum(map(ord, variant)))
    model = load_model(write_official(tmp_path / variant, cfg, sd))
    assert model.config.d_model_in == c["d_model"] + c["d_pos_emb"]
    idx = torch.randint(0, c["vocab_size"], (3, c["block_size"]), generator=torch.Generator())
    want_logits, want = reference(c, sd, idx)
    logits, got = model.run_with_cache(idx)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=0, msg=name)


def test_sinusoidal_positions_are_the_official_ones_and_frozen():
    config = GPTConfig(
        **{k: BASE_CONFIG[k] for k in ("block_size", "vocab_size", "n_layer", "n_head")},
        d_model=48,
        d_pos_emb=9,
        sinusoidal_cat_pos_emb=True,
        learned_pos_emb=False,
    )
    wpe = GPT(config).transformer.wpe.weight
    torch.testing.assert_close(wpe, official_sinusoids(config.block_size, 9), atol=0, rtol=0)
    assert not wpe.requires_grad


def test_cached_decoding_matches_a_full_pass_on_a_catpos_model(tmp_path):
    cfg = catpos_config()
    model = load_model(write_official(tmp_path / "m", cfg, catpos_state(resolve(cfg), seed=3)))
    idx = torch.randint(0, cfg["vocab_size"], (2, cfg["block_size"]))
    full, _ = model(idx)
    greedy = model.generate(idx[:, :4], max_new_tokens=30, temperature=0)
    assert torch.equal(
        greedy, model.generate(idx[:, :4], max_new_tokens=30, temperature=0, use_cache=False)
    )
    lengths = torch.tensor([cfg["block_size"], 7])
    torch.testing.assert_close(
        model.forward_last(idx, lengths), full[torch.arange(2), lengths - 1], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"d_pos_emb": 0}, "d_pos_emb"),
        ({"d_pos_emb": None, "sinusoidal_cat_pos_emb": True}, "sinusoidal_cat_pos_emb"),
    ],
)
def test_bad_position_fields_are_one_line_errors(tmp_path, fields, message):
    cfg = catpos_config(**fields)
    d = write_official(tmp_path / "bad", cfg, {})
    with pytest.raises(ConfigError, match=message) as err:
        load_model(d)
    assert "\n" not in str(err.value) and "beeg_config.json" in str(err.value)


@pytest.mark.parametrize("sinusoidal", [False, True])
def test_fixed_positions_are_never_projected_even_in_a_frozen_model(sinusoidal):
    from sparsecircuits.model.sparsity import sparse_parameter_names

    config = GPTConfig(
        n_layer=1, d_model=16, n_head=2, d_head=4, block_size=8, vocab_size=32, d_pos_emb=4,
        learned_pos_emb=False, sinusoidal_cat_pos_emb=sinusoidal,
    )  # fmt: skip
    model = GPT(config)
    names = sparse_parameter_names(model)
    model.requires_grad_(False)  # pruning freezes every parameter: the list must not change
    assert sparse_parameter_names(model) == names
    assert ("transformer.wpe.weight" in names) is not sinusoidal
