"""The fast weight-gradient mode: support-only dW between regrowths, exact budgets always."""

from __future__ import annotations

import torch

from sparsecircuits.kernels import support_index
from sparsecircuits.model import GPT, WeightSparsity, sparse_parameter_names
from sparsecircuits.model.config import GPTConfig
from sparsecircuits.train.config import OptimConfig
from sparsecircuits.train.optim import (
    build_optimizer,
    corrected_sq,
    estimated_sq,
    support_shares,
)
from sparsecircuits.train.step import train_step

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
    idx = {"a": support_index(mask)}
    shares = support_shares({"a": a, "b": b}, idx)
    assert shares == {"a": 9 / 25}  # b has no mask: counted whole, no share
    # A support-only gradient of a: 3 on the mask. Estimated full mass 9 / (9/25) = 25, +1 for b.
    a.grad = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    assert abs(estimated_sq({"a": a, "b": b}, idx, shares) - 26.0) < 1e-9
    # A gradient that stayed dense (an embedding) is estimated from its on-mask part too.
    a.grad = torch.tensor([[6.0, 8.0], [0.0, 0.0]])
    assert abs(estimated_sq({"a": a}, idx, shares) - 100.0) < 1e-9
    # A regrowth estimate whose off-support mass 16 holds 12 of token noise: share 9 / 13,
    # and the noise is off the gradient norm (never below 0, never below the support's part).
    a.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert support_shares({"a": a, "b": b}, idx, excess={"a": 12.0}) == {"a": 9 / 13}
    assert support_shares({"a": a}, idx, excess={"a": 100.0}) == {"a": 1.0}
    assert corrected_sq({"a": a, "b": b}, {"a": 12.0}) == 13.0 + 1.0
    assert corrected_sq({"a": a, "b": b}, {"b": 5.0}) == 25.0


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


def test_support_adamw_equals_dense_adamw_then_rezeroing() -> None:
    """Support-only AdamW with deferred moment decay == dense AdamW + re-zeroing, to rounding,
    through support steps, a catch-up and a dense step."""
    from sparsecircuits.train.support_adamw import SupportAdamW

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) < 0.4
    w0 = w0 * mask
    b0 = torch.randn(5, generator=g)
    grads = [(torch.randn(6, 5, generator=g), torch.randn(5, generator=g)) for _ in range(6)]
    runs = []
    for sparse in (False, True):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        opt = build_optimizer(torch.nn.ParameterList([w, b]), OptimConfig(lr=0.05))
        sup = SupportAdamW(opt)
        for i, (gw, gb) in enumerate(grads):
            dense_step = i in (0, 4)  # steps 1-3 and 5 are support steps
            w.grad = gw.clone() if dense_step else gw * mask
            b.grad = gb.clone()
            if dense_step or not sparse:
                if sparse:
                    sup.catch_up({id(w): mask})
                opt.step()
            else:
                sup.step({id(w): support_index(mask)})
            if not dense_step:
                with torch.no_grad():
                    w.masked_fill_(~mask, 0.0)
        if sparse:
            sup.catch_up({id(w): mask})
        st = opt.state[w]
        runs.append((w.detach().clone(), b.detach().clone(), st["exp_avg"], st["exp_avg_sq"]))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fast_mode_run_keeps_budgets_and_resumes_exactly(small_corpus, cache_dir, tmp_path) -> None:
    """A whole fast-mode run: exact budgets at the end, and a run resumed from its step-16
    checkpoint ends with the uninterrupted run's weights."""
    import shutil

    from sparsecircuits.model import load_model
    from sparsecircuits.model.sparsity import l0_budget
    from sparsecircuits.train.trainer import Trainer

    from .conftest import tiny_config

    cfg = tiny_config(small_corpus, sparsity=dict(target_l0=1 / 8, anneal_end=0.5,
                                                  weight_grad="fast", regrow_every=5))  # fmt: skip
    run = tmp_path / "full"
    Trainer(cfg, run_dir=run, device="cpu", cache_dir=cache_dir).run()
    model = load_model(run / "model")
    params = dict(model.named_parameters())
    for name in sparse_parameter_names(model):
        if name.endswith(".weight"):
            assert int((params[name] != 0).sum()) <= l0_budget(params[name].shape, 1 / 8), name
    part = tmp_path / "part"
    part.mkdir()
    for f in ("train_config.json", "tokenizer.json"):
        shutil.copyfile(run / f, part / f)
    shutil.copytree(run / "checkpoints" / "step_00000016", part / "checkpoints" / "step_00000016")
    Trainer(cfg, run_dir=part, device="cpu", cache_dir=cache_dir, resume=True).run()
    a, b = model.state_dict(), load_model(part / "model").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_regrow_steps_take_the_bf16_product_only_for_projected_weights(monkeypatch) -> None:
    """regrow_precision "bf16": the regrowth steps' projected weights go through the regrow
    gradient (exact on their supports), every other weight keeps its exact dense gradient;
    "fp32" never takes the regrow path."""
    import sparsecircuits.kernels.linear as linear

    monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "1.01")
    calls: list[tuple[int, int]] = []
    real, real_bf16 = linear.regrow_weight_grad, linear._bf16_dw

    def spy(pattern, dy, x, regrowth):  # the regrow gradient (CPUs without native bfloat16)
        calls.append((pattern.rows, pattern.cols))
        return real(pattern, dy, x, regrowth)

    def spy_bf16(dy, x):  # its bfloat16 product (the one-pass backward's path)
        calls.append((dy.shape[1], x.shape[1]))
        return real_bf16(dy, x)

    monkeypatch.setattr(linear, "regrow_weight_grad", spy)
    monkeypatch.setattr(linear, "_bf16_dw", spy_bf16)
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    names = [n for n in sparse_parameter_names(model) if "c_fc" not in n]  # c_fc stays dense
    sp = WeightSparsity(model, names)
    sp.project_(1 / 4)
    xy = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    step = dict(lr=1e-2, frac=1 / 4, optim=OptimConfig(lr=1e-2), mode="regrow")
    step["regrow_tokens"] = 1.0  # every token: fp32 is then the exact dense gradient
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], regrow_precision="fp32", **step)
    assert calls == []
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], regrow_precision="bf16", **step)
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert calls and tuple(c_fc.shape) not in calls  # c_fc: 128 x 32, unique in CFG
    assert all(m.kernel.grad_mode == "dense" for m in model.modules() if hasattr(m, "kernel"))


def test_regrow_tokens_reach_the_regrowth_products(monkeypatch) -> None:
    """regrow_tokens < 1 takes the regrow path even in float32: the projected weights'
    off-support products read that share of the step's tokens; the layers are reset after."""
    import sparsecircuits.kernels.linear as linear
    from sparsecircuits.kernels import Regrowth

    monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "1.01")
    seen: list[tuple[float, bool, int, int]] = []
    real = linear._off_support_dw

    def spy(dy, x, regrowth, support):
        seen.append((regrowth.share, regrowth.bf16, dy.shape[0], *regrowth.split(dy.shape[0])))
        return real(dy, x, regrowth, support)

    monkeypatch.setattr(linear, "_off_support_dw", spy)
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    sp = WeightSparsity(model, sparse_parameter_names(model))
    sp.project_(1 / 4)
    xy = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    step = dict(lr=1e-2, frac=1 / 4, optim=OptimConfig(lr=1e-2), mode="regrow")
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], regrow_precision="fp32",
               regrow_tokens=1.0, **step)  # fmt: skip
    assert seen == []  # float32 over every token: the exact dense gradient
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], regrow_precision="fp32",
               regrow_tokens=0.5, **step)  # fmt: skip
    # 4 sequences of 16 tokens: the first 2, as halves of one sequence each
    assert seen and all(s == (0.5, False, 64, 32, 16) for s in seen)
    assert all(m.kernel.regrowth == Regrowth() for m in model.modules() if hasattr(m, "kernel"))


def test_support_steps_with_sparse_gradients_equal_dense_ones(monkeypatch) -> None:
    """With the support AdamW, support steps take the weight gradients as sparse COO tensors
    (no dense zeros); weights and AdamW moments come out bitwise as with dense gradients."""
    monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "1.01")
    import sparsecircuits.train.step as step_mod
    from sparsecircuits.train.support_adamw import SupportAdamW

    real = step_mod.set_weight_grad
    results = []
    for sparse in (True, False):
        modes: list[str] = []

        def spy(model, mode, *, only=None, regrowth=None, sparse=sparse, modes=modes):
            mode = mode if sparse or mode != "support_sparse" else "support"
            modes.append(mode)
            return real(model, mode, only=only, regrowth=regrowth)

        monkeypatch.setattr(step_mod, "set_weight_grad", spy)
        model, opt, sp, xy = _setup(4)
        sup = SupportAdamW(opt)
        step = dict(lr=1e-2, frac=1 / 8, optim=OptimConfig(lr=1e-2), support_opt=sup)
        for i in range(4):
            train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="support" if i else "regrow",
                       **step)  # fmt: skip
        sup.catch_up({id(sp.params[n]): m for n, m in sp.masks.items()})
        assert ("support_sparse" in modes) == sparse
        moments = [t.clone() for s in opt.state.values() for k, t in s.items() if k != "step"]
        results.append(([p.detach().clone() for p in model.parameters()], moments))
    (pa, ma), (pb, mb) = results
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(ma, mb, strict=True))


def test_support_adamw_brings_compact_moments_back_before_a_dense_update() -> None:
    """A weight stepped on its support (moments held compact) and then by the optimizer
    itself (no support given) is stepped with its current moments, as after a catch-up."""
    from sparsecircuits.train.support_adamw import SupportAdamW

    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) < 0.5
    grads = [torch.randn(6, 5, generator=g) * mask, torch.randn(6, 5, generator=g)]
    out = []
    for early_catch_up in (False, True):
        w = torch.nn.Parameter(w0 * mask)
        opt = build_optimizer(torch.nn.ParameterList([w]), OptimConfig(lr=0.05))
        sup = SupportAdamW(opt)
        w.grad = grads[0].clone()
        sup.step({id(w): support_index(mask)})
        if early_catch_up:
            sup.catch_up({})
        w.grad = grads[1].clone()
        sup.step({})  # no support: the optimizer's own dense step
        sup.catch_up({})
        st_ = opt.state[w]
        out.append([w.detach().clone(), st_["exp_avg"].clone(), st_["exp_avg_sq"].clone()])
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


def test_inference_between_support_steps_sees_the_new_weights(monkeypatch) -> None:
    """Support steps write the weights through the compiled kernels; inference caches the
    weights' CSR values by version, so every such write must bump the parameter's version
    (a write through ``p.data`` would not, and evaluation would use stale weights)."""
    from sparsecircuits.train.support_adamw import SupportAdamW

    monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "1.01")
    model, opt, sp, xy = _setup(3)
    step = dict(lr=1e-2, frac=1 / 8, optim=OptimConfig(lr=1e-2), support_opt=SupportAdamW(opt))
    train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="regrow", **step)
    for _ in range(2):
        train_step(model, opt, sp, xy[:, :-1], xy[:, 1:], mode="support", **step)
        with torch.no_grad():
            cached, _ = model(xy[:, :-1])
            monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "0")  # dense: reads the weights
            dense, _ = model(xy[:, :-1])
            monkeypatch.setenv("SPARSECIRCUITS_SPARSE_BELOW", "1.01")
        torch.testing.assert_close(cached, dense, atol=1e-4, rtol=1e-4)
