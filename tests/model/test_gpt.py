"""The GPT forward pass: AbsTopK, the attention sink, causality, inputs, loss, generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsecircuits.errors import InputError
from sparsecircuits.kernels.attention import causal_padded, torch_causal_attention
from sparsecircuits.model import GPT, NODE_LOCS
from sparsecircuits.model.layers import abstopk

from .helpers import tiny_config, tiny_model, tokens

# Hook site -> AbsTopK location that produced it.
SITE_LOC = {
    "attn.act_in": "attn_in",
    "attn.q": "attn_q",
    "attn.k": "attn_k",
    "attn.v": "attn_v",
    "attn.resid_delta": "attn_out",
    "mlp.act_in": "mlp_in",
    "mlp.post_act": "mlp_neuron",
    "mlp.resid_delta": "mlp_out",
}


def nonzeros_per_token(x: torch.Tensor) -> torch.Tensor:
    return (x != 0).sum(-1).flatten()


@pytest.mark.parametrize("afrac", [0.25, 0.5, 0.1])
def test_abstopk_keeps_exactly_k_per_token_at_every_node_location(afrac: float) -> None:
    model = tiny_model(seed=0, afrac=afrac, afrac_loctypes=NODE_LOCS)
    _, cache = model.run_with_cache(tokens(3, 10))
    for layer in range(model.config.n_layer):
        for site in SITE_LOC:
            act = cache[f"{layer}.{site}"]
            k = int(afrac * act.shape[-1])
            assert (nonzeros_per_token(act) == k).all(), (site, k)
        # attn.y is no AbsTopK location: it mixes the sparse v of several positions.
        y_last = cache[f"{layer}.attn.y"][:, -1]
        assert (nonzeros_per_token(y_last) > int(afrac * model.config.d_attn)).all()


def test_abstopk_on_the_residual_stream() -> None:
    afrac = 0.25
    model = tiny_model(seed=1, afrac=afrac, afrac_loctypes=("resid_post_attn", "resid_post_mlp"))
    _, cache = model.run_with_cache(tokens(2, 10))
    k = int(afrac * model.config.d_model)
    for name in ("0.resid_mid", "1.resid_in", "1.resid_mid", "final_resid"):
        assert (nonzeros_per_token(cache[name]) == k).all(), name
    # Only the residual is sparsified: the node locations stay dense.
    assert (nonzeros_per_token(cache["0.mlp.post_act"]) == model.config.mlp_width).all()
    assert (nonzeros_per_token(cache["0.resid_in"]) == model.config.d_model).all()


def test_abstopk_only_at_listed_locations_and_off_without_afrac() -> None:
    model = tiny_model(seed=2, afrac=0.25, afrac_loctypes=("attn_k", "mlp_neuron"))
    _, cache = model.run_with_cache(tokens(2, 8))
    assert (nonzeros_per_token(cache["1.attn.k"]) == model.config.d_attn // 4).all()
    assert (nonzeros_per_token(cache["1.mlp.post_act"]) == model.config.mlp_width // 4).all()
    assert (nonzeros_per_token(cache["1.attn.q"]) == model.config.d_attn).all()
    assert (nonzeros_per_token(cache["1.mlp.resid_delta"]) == model.config.d_model).all()

    dense = tiny_model(seed=2, afrac=None)
    _, cache = dense.run_with_cache(tokens(2, 8))
    for name in ("0.attn.q", "0.attn.act_in", "0.mlp.post_act", "0.mlp.resid_delta"):
        assert (nonzeros_per_token(cache[name]) == cache[name].shape[-1]).all(), name


def test_abstopk_keeps_the_largest_magnitudes() -> None:
    x = torch.tensor([[0.5, -3.0, 2.0, -0.1, 1.0], [4.0, 0.0, -4.5, 0.2, -0.3]])
    want = torch.tensor([[0.0, -3.0, 2.0, 0.0, 0.0], [4.0, 0.0, -4.5, 0.0, 0.0]])
    assert torch.equal(abstopk(x, 2), want)
    assert torch.equal(abstopk(x, 5), x)
    assert torch.equal(abstopk(x, 0), torch.zeros_like(x))


def test_sink_logit_controls_how_much_attention_goes_nowhere() -> None:
    model = tiny_model(seed=3, afrac=None)
    idx = tokens(2, 9, seed=3)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.attn_imp.sink_logit.fill_(60.0)  # exp(60) dwarfs every real key
    _, cache = model.run_with_cache(idx, names=["0.attn.y", "1.attn.y"])
    assert cache["0.attn.y"].abs().max() < 1e-6 and cache["1.attn.y"].abs().max() < 1e-6

    # A very negative sink logit is the same as having no sink at all.
    no_sink = GPT(tiny_config(afrac=None, sink=False)).eval()
    state = {k: v for k, v in model.state_dict().items() if "sink_logit" not in k}
    no_sink.load_state_dict(state)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.attn_imp.sink_logit.fill_(-60.0)
    torch.testing.assert_close(model(idx)[0], no_sink(idx)[0], rtol=0, atol=1e-5)


def test_sink_logit_is_per_head() -> None:
    model = tiny_model(seed=4, afrac=None)
    idx = tokens(1, 6, seed=4)
    with torch.no_grad():
        model.transformer.h[0].attn.attn_imp.sink_logit[1] = 60.0  # silence head 1 only
    _, cache = model.run_with_cache(idx, names=["0.attn.y"])
    heads = cache["0.attn.y"].view(1, 6, model.config.n_head, model.config.d_head)
    assert heads[:, :, 1].abs().max() < 1e-6
    assert heads[:, :, 0].abs().max() > 1e-2 and heads[:, :, 2].abs().max() > 1e-2


@pytest.mark.parametrize("sink", [True, False])
def test_attention_is_causal(sink: bool) -> None:
    model = tiny_model(seed=5, sink=sink)
    idx = tokens(1, 10, seed=5)
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % model.config.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_bigram_table_row_of_the_current_token_is_added() -> None:
    model = tiny_model(seed=6)
    idx = tokens(2, 7, seed=6)
    table = model.bigram_table.clone()
    with_table, _ = model(idx)
    with torch.no_grad():
        model.bigram_table.zero_()
    without, _ = model(idx)
    torch.testing.assert_close(with_table - without, table[idx], rtol=0, atol=1e-5)


def test_loss_is_mean_next_token_cross_entropy_ignoring_minus_one() -> None:
    model = tiny_model(seed=7)
    idx = tokens(2, 9, seed=7)
    targets = tokens(2, 9, seed=8)
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    want = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, want)
    assert model(idx)[1] is None


def test_sequence_longer_than_block_size_is_an_input_error() -> None:
    model = tiny_model(seed=0)
    n = model.config.block_size
    model(tokens(1, n))  # exactly the context is fine
    with pytest.raises(InputError, match="block_size") as err:
        model(tokens(1, n + 1))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[0, 80]]),  # vocab_size is 80
        torch.tensor([[-1, 3]]),
        torch.tensor([1, 2, 3]),  # not (batch, seq)
    ],
)
def test_bad_token_ids_are_input_errors(bad: torch.Tensor) -> None:
    with pytest.raises(InputError):
        tiny_model(seed=0)(bad)


def test_shapes_with_d_head_not_d_model_over_n_head() -> None:
    cfg = tiny_config(n_head=3, d_head=5, d_model=40, d_mlp=None)
    model = GPT(cfg)
    attn = model.transformer.h[0].attn
    assert attn.c_attn.weight.shape == (3 * 15, 40)
    assert attn.c_proj.weight.shape == (40, 15)
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (160, 40)
    assert model(tokens(2, 5))[0].shape == (2, 5, cfg.vocab_size)


def test_parameter_names_follow_the_official_layout() -> None:
    names = set(GPT(tiny_config()).state_dict())
    for want in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.1.ln_1.weight",
        "transformer.h.1.attn.c_attn.bias",
        "transformer.h.1.attn.attn_imp.sink_logit",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.weight",
        "lm_head.weight",
        "final_logits_bias",
        "bigram_table",
    ):
        assert want in names, want
    plain = set(GPT(tiny_config(sink=False, enable_bigram_table=False, bias=False)).state_dict())
    assert not any("sink_logit" in n or "bigram" in n or n.endswith(".bias") for n in plain)


def test_init_follows_gpt2() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=2, d_model=64, d_mlp=256)
    model = GPT(cfg)
    c_proj = model.transformer.h[0].mlp.c_proj.weight
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.002
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert torch.equal(model.transformer.h[0].ln_1.weight, torch.ones(cfg.d_model))
    assert not model.transformer.h[0].attn.c_attn.bias.any()
    assert not model.transformer.h[0].attn.attn_imp.sink_logit.any()
    assert not model.bigram_table.any() and not model.final_logits_bias.any()
    assert "bigram_table" not in dict(model.named_parameters())  # a fixed buffer by default
    learnable = GPT(tiny_config(learnable_bigram_table=True))
    assert "bigram_table" in dict(learnable.named_parameters())


def test_tied_unembedding_shares_one_tensor() -> None:
    model = GPT(tiny_config(tied_unembed=True))
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = GPT(tiny_config(tied_unembed=False))
    V, d = untied.config.vocab_size, untied.config.d_model
    assert untied.num_params() - model.num_params() == V * d


def test_no_learned_position_embedding() -> None:
    model = tiny_model(seed=8, learned_pos_emb=False)
    assert "transformer.wpe.weight" not in model.state_dict()
    assert model(tokens(2, 6))[0].shape == (2, 6, model.config.vocab_size)


def test_generate_appends_tokens_reproducibly_past_block_size() -> None:
    model = tiny_model(seed=9)
    prompt = tokens(2, 20, seed=9)
    n_new = 6  # 26 tokens > block_size 24: generate must crop its input to the context
    a = model.generate(prompt, max_new_tokens=n_new, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, max_new_tokens=n_new, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 20 + n_new) and torch.equal(a, b)
    assert torch.equal(a[:, :20], prompt)
    assert int(a.max()) < model.config.vocab_size
    greedy = model.generate(prompt[:, :5], max_new_tokens=1, top_k=1)
    assert torch.equal(greedy[:, 5], model(prompt[:, :5])[0][:, -1].argmax(-1))


@pytest.mark.parametrize(
    "overrides", [{}, {"sink": False}, {"afrac": None}, {"rms_norm": False, "n_layer": 1}]
)
def test_forward_last_equals_the_full_forward_at_each_rows_last_position(overrides) -> None:
    model = tiny_model(seed=6, **overrides)
    idx = tokens(4, 11, seed=6)
    lengths = torch.tensor([11, 3, 7, 1])
    full, _ = model(idx)
    last = model.forward_last(idx, lengths)
    want = full[torch.arange(4), lengths - 1]
    torch.testing.assert_close(last, want, rtol=0, atol=1e-5)


def test_sink_gradient_matches_the_explicit_mask_path() -> None:
    """The fused causal path and the masked path give the same outputs and sink gradients."""
    model = tiny_model(seed=7)
    attn = model.transformer.h[0].attn.attn_imp
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, model.config.n_head, 9, 8, generator=g) for _ in range(3))
    visible = torch.ones(9, 9, dtype=torch.bool).tril()[None]
    fused = attn(q, k, v)
    (g_fused,) = torch.autograd.grad(fused.square().sum(), attn.sink_logit)
    masked = attn(q, k, v, visible)
    (g_masked,) = torch.autograd.grad(masked.square().sum(), attn.sink_logit)
    torch.testing.assert_close(fused, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_fused, g_masked, rtol=1e-4, atol=1e-6)


def test_flash_sink_path_matches_the_padded_and_masked_paths_with_gradients() -> None:
    """The CPU flash-kernel sink (log-sum-exp correction) equals the padded-channel path and
    the explicit-mask path in outputs and in q, k, v and sink-logit gradients."""
    model = tiny_model(seed=8)
    attn = model.transformer.h[0].attn.attn_imp
    with torch.no_grad():
        attn.sink_logit.copy_(torch.linspace(-2.0, 3.0, attn.sink_logit.numel()))
    g = torch.Generator().manual_seed(8)
    H = model.config.n_head
    base = [torch.randn(3, 13, H, 8, generator=g) for _ in range(3)]
    visible = torch.ones(13, 13, dtype=torch.bool).tril()[None]
    results = []
    for path in ("flash", "padded", "masked"):
        qkv = [t.clone().requires_grad_(True) for t in base]
        q, k, v = (t.transpose(1, 2) for t in qkv)  # strided views, as in the model
        if path == "flash":
            y = torch_causal_attention(q, k, v, attn.sink_logit)
        elif path == "padded":
            y = causal_padded(q, k, v, attn.sink_logit)
        else:
            y = attn(q, k, v, visible)
        grads = torch.autograd.grad(y.square().sum(), [*qkv, attn.sink_logit])
        results.append((y, grads))
    for y, grads in results[1:]:
        torch.testing.assert_close(results[0][0], y, rtol=0, atol=1e-5)
        for a, b in zip(results[0][1], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
