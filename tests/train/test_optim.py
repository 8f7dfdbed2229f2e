import math

import numpy as np
import pytest
import torch

from sparsecircuits.train.bigram import bigram_log_probs
from sparsecircuits.train.config import OptimConfig
from sparsecircuits.train.metrics import MetricsLog
from sparsecircuits.train.optim import build_optimizer, control_grad_rms_


def _params_with_grads(scale: float) -> list[torch.nn.Parameter]:
    ps = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    g = torch.Generator().manual_seed(0)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return ps


def _rms(ps) -> float:
    sq = sum(float(p.grad.pow(2).sum()) for p in ps)
    return math.sqrt(sq / sum(p.numel() for p in ps))


@pytest.mark.parametrize("scale", [1e-4, 10.0])
def test_normalize_rescales_to_target_rms(scale):
    ps = _params_with_grads(scale)
    before = _rms(ps)
    got = control_grad_rms_(ps, OptimConfig(grad_rms_mode="normalize", grad_rms=1.0))
    assert got == pytest.approx(before)
    assert _rms(ps) == pytest.approx(1.0, rel=1e-5)


def test_clip_only_scales_down_and_none_leaves_gradients():
    small = _params_with_grads(1e-3)
    before = [p.grad.clone() for p in small]
    control_grad_rms_(small, OptimConfig(grad_rms_mode="clip"))
    assert all(torch.equal(a, p.grad) for a, p in zip(before, small, strict=True))
    big = _params_with_grads(10.0)
    control_grad_rms_(big, OptimConfig(grad_rms_mode="clip"))
    assert _rms(big) == pytest.approx(1.0, rel=1e-5)
    none = _params_with_grads(10.0)
    control_grad_rms_(none, OptimConfig(grad_rms_mode="none"))
    assert _rms(none) > 5


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1, eps=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.dim() for p in decay["params"]] == [2]
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3
    assert opt.defaults["eps"] == 0.1 and opt.defaults["betas"] == (0.9, 0.95)


class _Store:
    def __init__(self, *shards):
        self.shards = [np.asarray(s, dtype=np.uint16) for s in shards]


def test_bigram_table_is_smoothed_conditional_log_probs():
    table = bigram_log_probs(_Store([0, 1, 0, 1, 2], [2, 2]), vocab_size=3, alpha=0.5)
    probs = table.exp()
    assert torch.allclose(probs.sum(1), torch.ones(3))
    # counts: 0->1 twice, 1->0 once, 1->2 once, 2->2 once (pairs never cross shards)
    assert probs[0, 1] == pytest.approx((2 + 0.5) / (2 + 1.5))
    assert probs[1, 0] == pytest.approx(probs[1, 2]) and probs[1, 1] < probs[1, 0]
    assert probs[2, 2] == pytest.approx((1 + 0.5) / (1 + 1.5))


def test_metrics_truncation_drops_later_steps_and_partial_lines(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "train_loss": float(step)})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "train_lo')  # cut short by a kill
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_runs_in_each_precision(precision):
    from sparsecircuits.model import GPT, GPTConfig, WeightSparsity, sparse_parameter_names
    from sparsecircuits.train.trainer import train_step

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, d_head=16, block_size=16, vocab_size=64))
    opt = build_optimizer(model, OptimConfig())
    ws = WeightSparsity(model, sparse_parameter_names(model))
    xy = torch.randint(0, 64, (4, 17))
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    loss, rms = train_step(
        model,
        opt,
        ws,
        xy[:, :-1],
        xy[:, 1:],
        lr=1e-3,
        frac=0.5,
        optim=OptimConfig(),
        precision=precision,
    )
    assert math.isfinite(loss) and rms > 0
    w = model.transformer.h[0].mlp.c_fc.weight
    assert w.dtype == torch.float32 and not torch.equal(w, before)
    assert int((w != 0).sum()) == w.numel() // 2  # projected to half after the step
