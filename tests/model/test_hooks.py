"""Hook sites: caching, interventions (nested, threaded, two models), gradients, forward_from."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sparsecircuits.errors import InputError
from sparsecircuits.model import Hooks, site_names

from .helpers import tiny_model, tokens


def zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def idx():
    return tokens(2, 12, seed=1)


def test_cache_has_every_site_in_order_with_documented_shapes(model, idx) -> None:
    logits, cache = model.run_with_cache(idx)
    assert list(cache) == model.hook_names() == site_names(model.config.n_layer)
    B, T = idx.shape
    cfg = model.config
    widths = {
        "resid_in": cfg.d_model,
        "attn.act_in": cfg.d_model,
        "attn.q": cfg.d_attn,
        "attn.k": cfg.d_attn,
        "attn.v": cfg.d_attn,
        "attn.y": cfg.d_attn,
        "attn.resid_delta": cfg.d_model,
        "resid_mid": cfg.d_model,
        "mlp.act_in": cfg.d_model,
        "mlp.post_act": cfg.mlp_width,
        "mlp.resid_delta": cfg.d_model,
    }
    for name, act in cache.items():
        site = "resid_in" if name == "final_resid" else name.split(".", 1)[1]
        assert act.shape == (B, T, widths[site]), name
        assert not act.requires_grad
    assert logits.shape == (B, T, cfg.vocab_size)


def test_cached_residuals_are_consistent(model, idx) -> None:
    # The residual stream is the running sum of the writes (no relu / resid AbsTopK here).
    _, cache = model.run_with_cache(idx)
    for i in range(model.config.n_layer):
        mid = cache[f"{i}.resid_in"] + cache[f"{i}.attn.resid_delta"]
        torch.testing.assert_close(cache[f"{i}.resid_mid"], mid)
        nxt = "final_resid" if i == model.config.n_layer - 1 else f"{i + 1}.resid_in"
        torch.testing.assert_close(cache[nxt], mid + cache[f"{i}.mlp.resid_delta"])


def test_cache_subset_and_logits_equal_plain_forward(model, idx) -> None:
    plain, _ = model(idx)
    logits, cache = model.run_with_cache(idx, names=["1.attn.q", "final_resid"])
    assert set(cache) == {"1.attn.q", "final_resid"}
    assert torch.equal(logits, plain)
    logits, cache = model.run_with_cache(idx, names=[])
    assert cache == {} and torch.equal(logits, plain)


def test_zero_ablating_mlp_neurons_matches_manual_computation(model, idx) -> None:
    clean, clean_cache = model.run_with_cache(idx)
    ablated, cache = model.run_with_cache(idx, interventions={"0.mlp.post_act": zero})
    assert (ablated - clean).abs().max() > 1e-3
    assert torch.equal(cache["0.mlp.post_act"], zero(clean_cache["0.mlp.post_act"]))
    assert torch.equal(cache["0.resid_mid"], clean_cache["0.resid_mid"])  # upstream untouched

    # By hand: with no neuron active the MLP writes only its (AbsTopK'd) output bias.
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        write = mlp.sparsify(mlp.c_proj(zero(clean_cache["0.mlp.post_act"])), "mlp_out")
        manual = model.forward_from(1, clean_cache["0.resid_mid"] + write, idx)
    torch.testing.assert_close(ablated, manual, rtol=0, atol=1e-6)
    # ... and equal to patching that MLP write in directly.
    patched = model.run_with_hooks(idx, interventions={"0.mlp.resid_delta": lambda x: write})
    torch.testing.assert_close(ablated, patched, rtol=0, atol=1e-6)


def test_intervention_result_is_cached_and_used_downstream(model, idx) -> None:
    shift = torch.linspace(-1.0, 1.0, model.config.d_model)
    logits, cache = model.run_with_cache(
        idx, names=["final_resid"], interventions={"final_resid": lambda x: x + shift}
    )
    _, clean = model.run_with_cache(idx, names=["final_resid"])
    torch.testing.assert_close(cache["final_resid"], clean["final_resid"] + shift)
    with torch.no_grad():
        want = model.forward_from("final_resid", cache["final_resid"], idx)
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)


def test_nested_run_with_cache_inside_an_intervention(model, idx) -> None:
    idx2 = tokens(1, 7, seed=2)
    inner: dict = {}

    def outer_fn(x: torch.Tensor) -> torch.Tensor:
        inner["result"] = model.run_with_cache(
            idx2, names=["0.attn.q"], interventions={"1.mlp.post_act": zero}
        )
        return 2.0 * x

    logits, cache = model.run_with_cache(
        idx, names=["1.attn.q", "final_resid"], interventions={"0.mlp.post_act": outer_fn}
    )
    # Neither call sees the other's interventions or cache entries.
    assert set(cache) == {"1.attn.q", "final_resid"}
    double = model.run_with_hooks(idx, interventions={"0.mlp.post_act": lambda x: 2.0 * x})
    assert torch.equal(logits, double)
    inner_logits, inner_cache = inner["result"]
    assert set(inner_cache) == {"0.attn.q"}
    assert torch.equal(
        inner_logits, model.run_with_hooks(idx2, interventions={"1.mlp.post_act": zero})
    )
    _, plain_inner_cache = model.run_with_cache(idx2, names=["0.attn.q"])
    assert torch.equal(inner_cache["0.attn.q"], plain_inner_cache["0.attn.q"])


def test_two_threads_on_one_model_with_different_interventions(model, idx) -> None:
    barrier = threading.Barrier(2)
    scales = (0.0, 3.0)

    def slow_scale(s: float):
        def fn(x: torch.Tensor) -> torch.Tensor:
            time.sleep(0.002)  # yield mid-forward so the two passes interleave
            return s * x

        return fn

    def work(s: float):
        out = []
        for _ in range(4):
            barrier.wait()
            out.append(
                model.run_with_cache(
                    idx, names=["1.mlp.post_act"], interventions={"0.attn.v": slow_scale(s)}
                )
            )
        return out

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, scales))
    for s, runs in zip(scales, results, strict=True):
        want, want_cache = model.run_with_cache(
            idx, names=["1.mlp.post_act"], interventions={"0.attn.v": slow_scale(s)}
        )
        for logits, cache in runs:
            assert torch.equal(logits, want)
            assert torch.equal(cache["1.mlp.post_act"], want_cache["1.mlp.post_act"])
    assert not torch.equal(results[0][0][0], results[1][0][0])


def test_two_models_in_one_process_do_not_share_hooks() -> None:
    a, b = tiny_model(seed=3), tiny_model(seed=4, n_layer=1, sink=False)
    ia, ib = tokens(2, 9, seed=5), tokens(2, 9, seed=6)
    plain_b, _ = b(ia)

    def run_b_inside(x: torch.Tensor) -> torch.Tensor:
        logits_b, cache_b = b.run_with_cache(ia, names=["final_resid"])
        assert torch.equal(logits_b, plain_b) and set(cache_b) == {"final_resid"}
        return zero(x)

    logits_a, cache_a = a.run_with_cache(
        ib, names=["1.resid_in"], interventions={"0.mlp.post_act": run_b_inside}
    )
    assert set(cache_a) == {"1.resid_in"}
    assert torch.equal(logits_a, a.run_with_hooks(ib, interventions={"0.mlp.post_act": zero}))
    assert b.hook_names() == site_names(1) and len(a.hook_names()) == len(site_names(2))


def test_detach_false_keeps_cache_in_the_graph() -> None:
    model = tiny_model(seed=2).double()  # float64 so the finite-difference check is tight
    idx = tokens(2, 10, seed=3)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())

    logits, cache = model.run_with_cache(idx, names=["1.attn.q"], detach=False)
    q = cache["1.attn.q"]
    assert q.requires_grad
    (grad,) = torch.autograd.grad(loss_of(logits), q)
    assert grad.shape == q.shape and grad.abs().sum() > 0

    # The gradient is the true derivative w.r.t. that site: nudge it and compare.
    direction = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=q.dtype)
    eps = 1e-5
    with torch.no_grad():
        up = loss_of(
            model.run_with_hooks(idx, interventions={"1.attn.q": lambda x: x + eps * direction})
        )
        down = loss_of(
            model.run_with_hooks(idx, interventions={"1.attn.q": lambda x: x - eps * direction})
        )
    torch.testing.assert_close(
        (up - down) / (2 * eps), (grad * direction).sum(), rtol=1e-4, atol=1e-8
    )


def test_unknown_hook_names_raise_input_error(model, idx) -> None:
    with pytest.raises(InputError, match=r"0\.attn\.z"):
        model.run_with_cache(idx, names=["0.attn.q", "0.attn.z"])
    with pytest.raises(InputError, match="hook_resid_pre"):
        model.run_with_cache(idx, interventions={"blocks.0.hook_resid_pre": zero})
    with pytest.raises(InputError, match=r"2\.resid_in"):
        model.run_with_hooks(idx, interventions={"2.resid_in": zero})


def test_intervention_returning_wrong_shape_is_an_input_error(model, idx) -> None:
    with pytest.raises(InputError, match=r"0\.attn\.q"):
        model.run_with_hooks(idx, interventions={"0.attn.q": lambda x: x[..., :3]})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "residual_activation_type": "relu",
            "afrac_loctypes": ("resid_post_attn", "resid_post_mlp", "mlp_neuron"),
        },
    ],
    ids=["default", "relu_resid_topk"],
)
def test_forward_from_every_residual_site_reproduces_logits(overrides) -> None:
    model = tiny_model(seed=5, **overrides)
    idx = tokens(2, 11, seed=7)
    logits, cache = model.run_with_cache(idx)
    n = model.config.n_layer

    def check(start, x) -> None:
        with torch.no_grad():
            out = model.forward_from(start, x, idx)
        torch.testing.assert_close(out, logits, rtol=0, atol=1e-6)

    for layer in range(n):
        check(layer, cache[f"{layer}.resid_in"])
        check(f"{layer}.resid_in", cache[f"{layer}.resid_in"])
        check(f"{layer}.resid_mid", cache[f"{layer}.resid_mid"])
    check(n, cache["final_resid"])
    check("final_resid", cache["final_resid"])


def test_forward_from_applies_hooks_downstream(model, idx) -> None:
    _, cache = model.run_with_cache(idx, names=["1.resid_in"])
    hooks = Hooks(cache_names=["final_resid"], interventions={"1.mlp.post_act": zero})
    with torch.no_grad():
        out = model.forward_from(1, cache["1.resid_in"], idx, hooks=hooks)
    want, want_cache = model.run_with_cache(
        idx, names=["final_resid"], interventions={"1.mlp.post_act": zero}
    )
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(hooks.cache["final_resid"], want_cache["final_resid"])


@pytest.mark.parametrize("start", [-1, 3, "0.attn.q", "2.resid_in", "x.resid_in", "resid_in"])
def test_forward_from_rejects_non_residual_starts(model, idx, start) -> None:
    x = torch.zeros(2, 12, model.config.d_model)
    with pytest.raises(InputError):
        model.forward_from(start, x, idx)
