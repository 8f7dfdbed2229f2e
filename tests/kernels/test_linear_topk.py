"""The fused product + AbsTopK node against the ops one by one: bitwise equal, both ways."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.kernels import LinearKernelState, abstopk, gelu_abstopk, sparse_linear
from sparsecircuits.kernels._lib import library_path
from sparsecircuits.kernels.crossover import ENV as BELOW
from sparsecircuits.kernels.linear_topk import Segment, sparse_linear_topk

pytestmark = pytest.mark.skipif(library_path() is None, reason="needs the compiled kernels")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(BELOW, "1.01")  # every weight takes the sparse path
    yield


def _inputs(seed: int, n_tok: int, in_f: int, out_f: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < 0.2)
    w[::5] = 0.0  # empty rows
    x = torch.randn(n_tok, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    return w, x, b


def _run(fused: bool, w, x, b, segs, grads, mode):
    w, x = w.clone().requires_grad_(True), x.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    state = LinearKernelState(grad_mode=mode)
    if fused:
        outs = sparse_linear_topk(x, w, b, state, segs)
        assert outs is not None and state.used_sparse
    else:
        parts = sparse_linear(x, w, b, state).split([s.width for s in segs], dim=-1)
        outs = [
            gelu_abstopk(p, s.k) if s.gelu else abstopk(p, s.k)
            for p, s in zip(parts, segs, strict=True)
        ]
    loss = sum((o * g).sum() for o, g in zip(outs, grads, strict=True) if g is not None)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in (x, w, b) if t is not None]


@pytest.mark.parametrize("mode", ["support", "dense", "regrow"])
@pytest.mark.parametrize("n_tok", [1, 33, 300])
@pytest.mark.parametrize(
    "segs",
    [
        (Segment(24, 6), Segment(24, 6), Segment(24, 5)),  # q, k, v
        (Segment(20, 5),),  # a width that is not a multiple of 8: the tails
        (Segment(40, 10, gelu=True),),  # c_fc
        (Segment(140, 35, gelu=True),),  # GELU' packed 64 entries at a time unfused, plus tails
    ],
)
def test_fused_node_equals_the_ops_one_by_one(mode, n_tok, segs) -> None:
    out_f = sum(s.width for s in segs)
    w, x, b = _inputs(n_tok, n_tok, 19, out_f, bias=True)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(n_tok, s.width, generator=g) for s in segs]
    if len(segs) > 1:
        grads[1] = None  # an output without a gradient
    outs_f, grads_f = _run(True, w, x, b, segs, grads, mode)
    outs_u, grads_u = _run(False, w, x, b, segs, grads, mode)
    for a, c in zip(outs_f + grads_f, outs_u + grads_u, strict=True):
        assert torch.equal(a, c)


def test_falls_back_where_it_does_not_apply(monkeypatch) -> None:
    w, x, b = _inputs(0, 8, 16, 24, bias=False)
    state = LinearKernelState()
    segs = (Segment(24, 6),)
    with torch.no_grad():  # without a backward a GELU segment runs torch's GELU: not fused
        assert sparse_linear_topk(x, w, b, state, (Segment(24, 6, gelu=True),)) is None
    xg = x.clone().requires_grad_(True)
    assert sparse_linear_topk(xg, w, b, state, (Segment(24, 24),)) is None  # keeps everything
    assert sparse_linear_topk(xg, w, b, state, (Segment(12, 3),)) is None  # widths != out
    monkeypatch.setenv(BELOW, "0")  # dense weights take F.linear
    assert sparse_linear_topk(xg, w, b, state, segs) is None


@pytest.mark.parametrize("extra", [5, 270])  # tokens past one 32-token tile per thread
@pytest.mark.parametrize(
    "segs",
    [
        (Segment(24, 6), Segment(24, 6), Segment(24, 5)),  # q, k, v
        (Segment(20, 5),),  # a width that is not a multiple of 8
        (Segment(20, 1), Segment(12, 11)),
    ],
)
def test_inference_fused_forward_equals_the_ops_one_by_one(extra, segs) -> None:
    """Without gradients the product and AbsTopKs run as one pass (no masks): bitwise the
    plain product followed by each segment's AbsTopK, with and without a bias (a strided
    one too). A single tile (decoding: 3 tokens here) runs fused on one thread; between one
    tile and one tile per thread the ops run one by one."""
    out_f = sum(s.width for s in segs)
    n_tok = 32 * torch.get_num_threads() + extra
    for bias in (True, False):
        w, x, b = _inputs(n_tok + 5, n_tok, 19, out_f, bias=bias)
        if b is not None:
            b = torch.stack([b, b], dim=1)[:, 0]  # not contiguous
        with torch.no_grad():
            got = sparse_linear_topk(x[None], w, b, LinearKernelState(), segs)
            few = sparse_linear_topk(x[None, :3], w, b, LinearKernelState(), segs)
            mid = sparse_linear_topk(x[None, :40], w, b, LinearKernelState(), segs)
            parts = sparse_linear(x, w, b, LinearKernelState()).split(
                [s.width for s in segs], dim=-1
            )
        assert got is not None and few is not None
        assert (mid is None) is (torch.get_num_threads() > 1)
        for o, f, p, s in zip(got, few, parts, segs, strict=True):
            assert o.shape == (1, n_tok, s.width) and f.shape == (1, 3, s.width)
            assert torch.equal(o[0], abstopk(p, s.k))
            assert torch.equal(f[0], abstopk(p[:3], s.k))


def test_model_forward_hooks_still_run_and_fusion_changes_nothing(monkeypatch) -> None:
    """A forward hook on a product module runs (the fused node is skipped for it); outputs and
    every gradient equal the run with fusion disabled."""
    import sparsecircuits.model.layers as layers
    from sparsecircuits.model import GPT
    from sparsecircuits.model.config import GPTConfig

    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, d_head=8, d_model=32)
    xy = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(0))

    def run(fuse: bool, hook: bool):
        torch.manual_seed(0)
        model = GPT(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(torch.rand(p.shape) < 0.3)
        seen = []
        if hook:
            model.transformer.h[0].attn.c_attn.register_forward_hook(
                lambda m, i, o: seen.append(o.shape)
            )
            model.transformer.h[0].mlp.c_proj.register_full_backward_hook(
                lambda m, gi, go: seen.append(go[0].shape)
            )
        real = layers.sparse_linear_topk
        fused = []

        def spy(*a, **k):
            out = real(*a, **k) if fuse else None
            fused.append(out is not None)
            return out

        monkeypatch.setattr(layers, "sparse_linear_topk", spy)
        _, loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        monkeypatch.undo()
        monkeypatch.setenv(BELOW, "1.01")
        return loss.detach(), [p.grad for p in model.parameters()], seen, fused

    loss_f, grads_f, _, fused_f = run(True, False)
    loss_u, grads_u, _, _ = run(False, False)
    loss_h, grads_h, seen_h, fused_h = run(True, True)
    assert fused_f == [True] * 4  # c_attn, attn c_proj, c_fc, mlp c_proj
    # the hooked c_attn and mlp c_proj ran as modules: both hooks fired
    assert len(seen_h) == 2 and fused_h == [True] * 2
    assert torch.equal(loss_f, loss_u) and torch.equal(loss_f, loss_h)
    for a, b, c in zip(grads_f, grads_u, grads_h, strict=True):
        assert (a is None and b is None) or (torch.equal(a, b) and torch.equal(a, c))
