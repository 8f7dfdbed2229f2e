"""Node masks: the Heaviside straight-through gate, the masked forward and frozen norms."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.circuits.masking import (
    Ablation,
    frozen_norms,
    heaviside,
    mask_interventions,
    masked_last_logits,
    norm_scales,
)
from sparsecircuits.circuits.means import activation_means, zero_values
from sparsecircuits.circuits.nodes import SITE, Location, Node, NodeSpace
from sparsecircuits.errors import InputError
from tests.model.helpers import TINY, tiny_model, tokens

VOCAB = TINY["vocab_size"]


def _prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts of different lengths (pad id 0 after each prompt's end)."""
    idx = tokens(4, 10, seed=seed)
    lengths = torch.tensor([10, 3, 7, 1])
    for row, n in enumerate(lengths.tolist()):
        idx[row, n:] = 0
    return idx, lengths


def _ablation(model, space: NodeSpace, kind: str) -> Ablation:
    if kind == "zero":
        return Ablation("zero", zero_values(space))
    values = activation_means(model, tokens(3, 12, seed=7), space=space)
    return Ablation("mean", values)


# ------------------------------------------------------------------------------ Heaviside STE
def test_heaviside_forward_is_exact_step():
    tau = torch.tensor([-1.0, -1e-7, 0.0, 1e-7, 0.5, -0.0])
    out = heaviside(tau)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]))
    assert out.dtype == tau.dtype


@pytest.mark.parametrize("temp", [0.1, 0.5, 1.0, 3.0])
def test_heaviside_backward_is_sigmoid_derivative(temp):
    gen = torch.Generator().manual_seed(0)
    tau = (torch.rand(50, generator=gen, dtype=torch.float64) - 0.5) * 4
    tau.requires_grad_(True)
    upstream = torch.randn(50, generator=gen, dtype=torch.float64)
    (heaviside(tau, temperature=temp) * upstream).sum().backward()
    want = []
    for t, g in zip(tau.detach().tolist(), upstream.tolist(), strict=True):
        s = 1.0 / (1.0 + torch.exp(torch.tensor(-t / temp, dtype=torch.float64)).item())
        want.append(g * s * (1 - s) / temp)
    torch.testing.assert_close(tau.grad, torch.tensor(want, dtype=torch.float64))


def test_heaviside_rejects_nonpositive_temperature():
    with pytest.raises(InputError, match="temperature"):
        heaviside(torch.zeros(3), temperature=0.0)


# ----------------------------------------------------------------------- masked forward pass
def test_forward_last_matches_full_forward_at_last_real_position():
    model = tiny_model()
    idx, lengths = _prompts()
    with torch.no_grad():
        full, _ = model(idx)
        last = model.forward_last(idx, lengths)
    want = full[torch.arange(len(lengths)), lengths - 1]
    torch.testing.assert_close(last, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mean", "zero"])
@pytest.mark.parametrize("mask_embed", [False, True])
def test_all_ones_gates_reproduce_unmasked_logits_exactly(kind, mask_embed):
    model = tiny_model()
    space = NodeSpace(model.config, mask_embed=mask_embed)
    ablation = _ablation(model, space, kind)
    idx, lengths = _prompts()
    gates = torch.ones(space.total)
    with torch.no_grad():
        want = model.forward_last(idx, lengths)
        got = masked_last_logits(
            model, idx, lengths, space=space, gates=gates, ablation=ablation, skip_full=False
        )
    assert torch.equal(got, want)
    # The interventions really ran: every group, plus the embedding swap when masked.
    names = mask_interventions(model, space, gates, ablation, idx=idx, skip_full=False)
    assert len(names) == len(space.groups)
    assert ("0.resid_in" in names) == mask_embed
    # ... and gates of all zeros do change the logits (so equality above is not vacuous).
    with torch.no_grad():
        zero = masked_last_logits(
            model, idx, lengths, space=space, gates=torch.zeros(space.total), ablation=ablation
        )
    assert not torch.allclose(zero, want)


@pytest.mark.parametrize(
    ("layer", "loc", "index"),
    [(0, Location.MLP_NEURON, 5), (1, Location.ATTN_Q, 3), (0, Location.ATTN_OUT, 11)],
)
def test_zero_gate_replaces_activation_by_ablation_value(layer, loc, index):
    model = tiny_model()
    space = NodeSpace(model.config)
    ablation = _ablation(model, space, "mean")
    mu = ablation.values[f"{layer}.{loc.value}"][index]
    assert mu != 0
    gates = torch.ones(space.total)
    flat = space.flat_index(Node(layer, loc, index))
    gates[flat] = 0.0
    idx = tokens(2, 9, seed=3)
    site = f"{layer}.{SITE[loc]}"
    inter = mask_interventions(model, space, gates, ablation, idx=idx, skip_full=True)
    assert set(inter) == {site}  # skip_full leaves out groups whose gates are all 1
    with torch.no_grad():
        _, plain = model.run_with_cache(idx, names=[site])
        _, cache = model.run_with_cache(idx, names=[site], interventions=inter)
    act = cache[site]
    assert torch.equal(act[..., index], torch.full_like(act[..., index], float(mu)))
    others = [c for c in range(act.shape[-1]) if c != index]
    assert torch.equal(act[..., others], plain[site][..., others])


def test_zero_embed_gate_swaps_token_embedding_for_mean():
    model = tiny_model()
    space = NodeSpace(model.config, mask_embed=True)
    ablation = _ablation(model, space, "mean")
    idx = tokens(2, 9, seed=4)
    tok = int(idx[0, 2])
    gates = torch.ones(space.total)
    gates[space.flat_index(Node(-1, Location.EMBED, tok))] = 0.0
    inter = mask_interventions(model, space, gates, ablation, idx=idx)
    with torch.no_grad():
        _, plain = model.run_with_cache(idx, names=["0.resid_in"])
        _, cache = model.run_with_cache(idx, names=["0.resid_in"], interventions=inter)
    wte = model.transformer.wte.weight
    hit = idx == tok
    delta = cache["0.resid_in"] - plain["0.resid_in"]
    want = (ablation.values["embed"] - wte[tok]).expand(int(hit.sum()), -1)
    torch.testing.assert_close(delta[hit], want)
    assert torch.equal(delta[~hit], torch.zeros_like(delta[~hit]))


def test_embedding_mask_needs_token_ids_and_right_gate_count():
    model = tiny_model()
    space = NodeSpace(model.config, mask_embed=True)
    abl = _ablation(model, space, "zero")
    with pytest.raises(InputError, match="token ids"):
        mask_interventions(model, space, torch.ones(space.total), abl)
    with pytest.raises(InputError, match="gates"):
        mask_interventions(model, space, torch.ones(space.total - 1), abl, idx=tokens())


# ------------------------------------------------------------------------------- frozen norms
@pytest.mark.parametrize("rms_norm", [True, False])
def test_frozen_norms_reproduce_unmasked_and_differ_once_ablated(rms_norm):
    model = tiny_model(rms_norm=rms_norm)
    space = NodeSpace(model.config)
    ablation = _ablation(model, space, "mean")
    idx, lengths = _prompts()
    with torch.no_grad():
        want = model.forward_last(idx, lengths)
        scales = norm_scales(model, idx, lengths)
        assert set(scales) == {"0.ln_1", "0.ln_2", "1.ln_1", "1.ln_2", "ln_f"}
        with frozen_norms(model, scales):
            frozen = model.forward_last(idx, lengths)
        torch.testing.assert_close(frozen, want, rtol=1e-4, atol=1e-5)
        # Ablate half of the layer-0 MLP writes: live and frozen norms now disagree.
        gates = torch.ones(space.total)
        g = space.group(0, Location.MLP_OUT)
        gates[g.offset : g.offset + g.size // 2] = 0.0
        kw = dict(space=space, gates=gates, ablation=ablation)
        live = masked_last_logits(model, idx, lengths, **kw)
        with frozen_norms(model, scales):
            fixed = masked_last_logits(model, idx, lengths, **kw)
        # The hooks are gone after the block: a plain pass equals the live one again.
        again = masked_last_logits(model, idx, lengths, **kw)
    assert not torch.allclose(live, fixed, atol=1e-4)
    assert torch.equal(again, live)
