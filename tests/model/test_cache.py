"""KV-cache decoding: a pass split into cached chunks gives the full pass's logits and hook
tensors, and greedy generation with the cache equals generation without it."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.errors import InputError
from sparsecircuits.model import KVCache
from sparsecircuits.model.sampling import sample_next
from tests.model.helpers import TINY, tiny_model, tokens

ALL_SITES = ",".join(
    [
        "attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out",
        "resid_post_attn,resid_post_mlp",
    ]
)
VARIANTS = {
    "sink_bigram_topk": {},
    "no_sink_no_afrac": {"sink": False, "afrac": None},
    "relu_resid_all_sites": {"residual_activation_type": "relu", "afrac_loctypes": ALL_SITES},
    "catpos": {"d_pos_emb": 5, "learned_pos_emb": False},
    "layernorm_tied": {"rms_norm": False, "tied_unembed": True},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_chunks_equal_the_full_pass(variant):
    model = tiny_model(seed=4, **VARIANTS[variant])
    idx = tokens(batch=3, seq=TINY["block_size"], seed=1)
    full, want = model.run_with_cache(idx)
    cache = KVCache.for_model(model, batch=3)
    got_logits, got = [], []
    for a, b in ((0, 5), (5, 6), (6, 17), (17, TINY["block_size"])):
        logits, hooks = model.run_with_cache(idx[:, a:b], cache=cache)
        got_logits.append(logits)
        got.append(hooks)
    assert cache.length == TINY["block_size"]
    torch.testing.assert_close(torch.cat(got_logits, 1), full, atol=1e-5, rtol=0)
    for name in want:  # every site holds the new positions only, and equals the full pass there
        torch.testing.assert_close(
            torch.cat([h[name] for h in got], 1), want[name], atol=1e-5, rtol=0, msg=name
        )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_is_the_same_with_and_without_the_cache(variant):
    model = tiny_model(seed=5, **VARIANTS[variant])
    prompt = tokens(batch=2, seq=6, seed=2)
    # Past the context: the window slides, and both paths must re-read the last block_size.
    n_new = TINY["block_size"] + 9
    with_cache = model.generate(prompt, max_new_tokens=n_new, temperature=0)
    without = model.generate(prompt, max_new_tokens=n_new, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 6 + n_new)
    assert torch.equal(with_cache, without)


def test_sampling_with_the_cache_is_reproducible_and_equals_the_uncached_draw():
    model = tiny_model(seed=6)
    prompt = tokens(batch=2, seq=4, seed=3)
    draws = [
        model.generate(
            prompt,
            max_new_tokens=12,
            top_k=5,
            use_cache=use,
            generator=torch.Generator().manual_seed(7),
        )
        for use in (True, True, False)
    ]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


def test_a_cache_that_would_overflow_or_has_another_batch_is_an_input_error():
    model = tiny_model(seed=7)
    cache = KVCache.for_model(model, batch=2)
    model(tokens(batch=2, seq=TINY["block_size"] - 2), cache=cache)
    with pytest.raises(InputError, match="exceed"):
        model(tokens(batch=2, seq=3), cache=cache)
    with pytest.raises(InputError, match="rows"):
        model(tokens(batch=3, seq=1), cache=KVCache.for_model(model, batch=2))


def test_greedy_takes_the_likeliest_token_and_the_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 0.0, 4.9]])
    assert sample_next(logits, temperature=0).tolist() == [[1], [0]]
