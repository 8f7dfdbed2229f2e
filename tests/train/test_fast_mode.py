"""The fast weight-gradient mode: support-only dW between regrowths, exact budgets always."""

from __future__ import annotations

import torch

from sparsecircuits.model import GPT, WeightSparsity, sparse_parameter_names
from sparsecircuits.model.config import GPTConfig
from sparsecircuits.train.config import OptimConfig
from sparsecircuits.train.optim import build_optimizer, estimated_sq, support_shares
from sparsecircuits.train.trainer import train_step

CFG = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, d_head=8, d_model=32)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    sp = WeightSparsity(model, sparse_parameter_names(model))
    xy = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(seed))
    return model, opt, sp, xy


def _supports(model, sp) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n] != 0 for n in sp.params}


def test_support_steps_keep_the_support_and_regrow_steps_may_change_it(monkeypatch) -> None:
    monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "1.01")  # CSR kernels everywhere
    model, opt, sp, xy = _setup()
    frac = 1 / 8
    step = dict(lr=1e-2, frac=frac, optim=OptimConfig(lr=1e-2))
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="regrow", **step)
    before = _supports(model, sp)
    for _ in range(3):
        loss, _ = train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="support", **step)
        assert torch.isfinite(torch.tensor(loss))
        now = _supports(model, sp)
        for n in before:  # never leaves its support (weights may still hit exact zero)
            assert not (now[n] & ~before[n]).any(), n
    changed = False
    for _ in range(5):
        train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="regrow", **step)
        now = _supports(model, sp)
        changed |= any(not torch.equal(now[n], before[n]) for n in before)
        for r in sp.report(frac):
            assert r.nonzero <= r.budget
    assert changed  # dense gradients let weights regrow
    assert sp.grad_shares and all(0.0 < v <= 1.0 for v in sp.grad_shares.values())


def test_support_mode_weight_gradient_is_the_dense_one_on_the_support(monkeypatch) -> None:
    monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "1.01")
    from sparsecircuits.model.layers import set_weight_grad

    model, _, sp, xy = _setup(1)
    sp.project_(1 / 4)
    grads = {}
    for mode in ("dense", "support"):
        model.zero_grad()
        set_weight_grad(model, mode)
        _, loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, mask in sp.masks.items():
        if n.endswith(".weight") and "wte" not in n and "wpe" not in n:
            torch.testing.assert_close(grads["support"][n], grads["dense"][n] * mask)


def test_gradient_norm_estimate_by_hand() -> None:
    a = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b.grad = torch.tensor([1.0, 0.0, 0.0])
    mask = torch.tensor([[True, False], [False, False]])
    shares = support_shares({"a": a, "b": b}, {"a": mask})
    assert shares == {"a": 9 / 25}  # b has no mask: counted whole, no share
    # A support-only gradient of a: 3 on the mask. Estimated full mass 9 / (9/25) = 25, +1 for b.
    a.grad = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    assert abs(estimated_sq({"a": a, "b": b}, {"a": mask}, shares) - 26.0) < 1e-9
    # A gradient that stayed dense (an embedding) is estimated from its on-mask part too.
    a.grad = torch.tensor([[6.0, 8.0], [0.0, 0.0]])
    assert abs(estimated_sq({"a": a}, {"a": mask}, shares) - 100.0) < 1e-9


def test_support_steps_reuse_the_csr_patterns_and_stay_correct(monkeypatch) -> None:
    monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "1.01")
    from sparsecircuits.model.layers import Linear

    model, opt, sp, xy = _setup(2)
    step = dict(lr=1e-2, frac=1 / 8, optim=OptimConfig(lr=1e-2))
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="regrow", **step)
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="support", **step)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    before = [m.kernel.pattern for m in linears]
    assert all(p is not None for p in before)
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="support", **step)
    assert all(m.kernel.pattern is p for m, p in zip(linears, before, strict=True))
    with torch.no_grad():
        logits, _ = model(xy[:, :-1])
        monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "0")  # plain dense matmuls
        dense, _ = model(xy[:, :-1])
    torch.testing.assert_close(logits, dense, atol=1e-4, rtol=1e-4)
