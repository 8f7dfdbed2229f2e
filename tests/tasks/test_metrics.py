"""Contrast loss by hand, tie handling, final_logits padding, evaluate_tasks output."""

from __future__ import annotations

import math

import pytest
import torch

from sparsecircuits import tasks
from sparsecircuits.errors import InputError
from sparsecircuits.tasks import contrast_loss, evaluate_tasks, final_logits, pad_prompts
from sparsecircuits.tasks.metrics import (
    Calibration,
    calibrated,
    diff_accuracy,
    diff_loss,
    fit_calibration,
    prompt_loss,
)
from tests.tasks.helpers import tiny_model


def test_contrast_loss_matches_hand_computation() -> None:
    # V = 3, N = 2 pairs.
    logits_a = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 1.0]])
    logits_b = torch.tensor([[0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    target_a = torch.tensor([1, 0])
    target_b = torch.tensor([2, 2])
    r = contrast_loss(logits_a, logits_b, target_a, target_b)
    # A0: correct z=2 vs other z=0 -> log(1 + e^-2) = 0.126928, right
    # A1: correct z=1 vs other z=1 -> log 2      = 0.693147, a tie: counted wrong
    # B0: correct z=1 vs other z=0 -> log(1 + e^-1) = 0.313262, right
    # B1: correct z=0 vs other z=3 -> log(1 + e^3)  = 3.048587, wrong
    assert r.loss_a.tolist() == pytest.approx([0.126928, 0.693147], abs=1e-6)
    assert r.loss_b.tolist() == pytest.approx([0.313262, 3.048587], abs=1e-6)
    assert float(r.loss) == pytest.approx((0.126928 + 0.693147 + 0.313262 + 3.048587) / 4, abs=1e-6)
    assert r.accuracy == 0.5
    assert r.correct_a.tolist() == [True, False] and r.correct_b.tolist() == [True, False]


def test_ties_count_as_wrong_and_cost_log2() -> None:
    z = torch.zeros(4, 10)
    t_a, t_b = torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])
    r = contrast_loss(z, z, t_a, t_b)
    assert r.accuracy == 0.0
    assert float(r.loss) == pytest.approx(math.log(2))


def test_explicit_other_tokens_and_gradient() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0]], requires_grad=True)
    t = torch.tensor([1])
    # Against token 0 prompt A is right; against token 2 (the default other) it would be wrong.
    r = contrast_loss(logits, logits, t, torch.tensor([2]), other_a=torch.tensor([0]))
    assert r.correct_a.tolist() == [True] and r.correct_b.tolist() == [True]
    r.loss.backward()
    assert logits.grad is not None and logits.grad[0, 1] < 0


def test_contrast_loss_rejects_bad_shapes() -> None:
    with pytest.raises(InputError):
        contrast_loss(torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([1]), torch.tensor([2]))


def test_final_logits_equal_unpadded_runs() -> None:
    model = tiny_model(50, seed=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50, (n,), generator=gen).tolist() for n in (5, 1, 9, 3, 9, 2, 7)]
    out = final_logits(model, prompts, batch_size=3)
    assert out.shape == (7, 50) and out.dtype == torch.float32
    with torch.no_grad():
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0][0, -1]
            torch.testing.assert_close(out[i], alone, atol=1e-5, rtol=1e-5)


def test_pad_prompts_and_empty_prompt() -> None:
    idx, lengths = pad_prompts([[4, 5, 6], [7]], pad_id=0)
    assert idx.tolist() == [[4, 5, 6], [7, 0, 0]] and lengths.tolist() == [3, 1]
    with pytest.raises(InputError):
        pad_prompts([[1], []])


def test_evaluate_tasks_structure(small_tokenizer) -> None:
    model = tiny_model(small_tokenizer.vocab_size, seed=2)
    names = ["single_double_quote", "bracket_counting", "single_double_quote__inverted"]
    res = evaluate_tasks(model, small_tokenizer, names=names, n_pairs=4, batch_size=5)
    assert list(res) == names
    for name in names:
        assert set(res[name]) == {"train", "test"}
        for split in ("train", "test"):
            m = res[name][split]
            assert set(m) == {"loss", "acc", "n"} and m["n"] == 4
            assert m["loss"] > 0 and 0.0 <= m["acc"] <= 1.0
    # The inverted control swaps the answers, so each prompt's right becomes wrong (no ties).
    base, inv = res["single_double_quote"]["test"], res["single_double_quote__inverted"]["test"]
    assert base["acc"] + inv["acc"] == pytest.approx(1.0)


def test_evaluate_tasks_defaults_to_the_twenty_tasks(small_tokenizer) -> None:
    model = tiny_model(small_tokenizer.vocab_size, seed=3)
    res = evaluate_tasks(model, small_tokenizer, n_pairs=1, splits=("test",))
    assert list(res) == tasks.names(include_controls=False)
    assert all(set(v) == {"test"} for v in res.values())
    with pytest.raises(tasks.TaskError, match="unknown split"):
        evaluate_tasks(model, small_tokenizer, n_pairs=1, splits=("val",))  # type: ignore[arg-type]


def _logistic_data(a: float, b: float, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffs d and signs s whose likelihood-optimal calibration is about (a, b).

    Each prompt's outcome is drawn with P(correct) = sigmoid(a*x + b*s); a prompt whose other
    token won is stored from the winner's side (diff -x, sign -s), as PromptSet would see it.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    s = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0).double()
    won = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(a * x + b * s)
    flip = torch.where(won, 1.0, -1.0).double()
    return (x * flip).float(), s * flip


@pytest.mark.parametrize(("a", "b"), [(0.5, 1.0), (2.0, -0.7), (1.0, 0.0), (0.3, 0.2)])
def test_calibrate_recovers_scale_and_shift(a, b):
    d, s = _logistic_data(a, b, 20000, seed=int(10 * a + 100 * b) % 97)
    cal = fit_calibration(d, s)
    assert cal.scale == pytest.approx(a, abs=0.08)
    assert cal.shift == pytest.approx(b, abs=0.08)
    assert _cal_loss(d, s, cal) <= _cal_loss(d, s, None) + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_calibration_never_increases_loss(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 40, (1,), generator=gen))
    d = torch.randn(n, generator=gen) * float(torch.rand(1, generator=gen) * 5)
    s = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0)
    cal = fit_calibration(d, s)
    assert math.isfinite(cal.scale) and math.isfinite(cal.shift) and cal.scale > 0
    assert _cal_loss(d, s, cal) <= _cal_loss(d, s, None) + 1e-9


def _cal_loss(d: torch.Tensor, s: torch.Tensor, cal: Calibration | None) -> float:
    return diff_loss(calibrated(d.double(), s.double(), cal))


def test_calibration_cannot_invert_a_circuit():
    """An inverted control (every prompt prefers the wrong token) must stay at or above chance:
    an unconstrained scale would fit a = -|a| and reach ~0 loss."""
    gen = torch.Generator().manual_seed(0)
    d = -(1.0 + torch.rand(200, generator=gen) * 3)  # the wrong token always wins
    s = torch.where(torch.rand(200, generator=gen) < 0.5, 1.0, -1.0)
    cal = fit_calibration(d, s)
    assert cal.scale > 0
    assert _cal_loss(d, s, cal) >= math.log(2) - 0.02


def test_loss_formulas_agree():
    """prompt_loss, contrast_loss and diff_loss are one formula: softplus(z_o - z_c)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 9, generator=gen) * 4
    correct, other = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([8, 7, 6, 5, 4, 3])
    losses, ok = prompt_loss(logits, correct, other)
    d = logits[torch.arange(6), correct] - logits[torch.arange(6), other]
    want = torch.log1p(torch.exp(-d.double())).float()
    assert torch.allclose(losses, want, atol=1e-6)
    assert torch.equal(ok, d > 0)
    assert diff_loss(d) == pytest.approx(float(want.mean()), abs=1e-6)
    assert diff_accuracy(d) == float((d > 0).float().mean())
