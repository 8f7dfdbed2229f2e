"""The playground's model functions (viz/playground.py) on the tiny viz-test circuit."""

from __future__ import annotations

import pytest
import torch

from sparsecircuits.circuits.masking import Ablation, masked_last_logits
from sparsecircuits.circuits.means import zero_values
from sparsecircuits.circuits.nodes import Location, Node, NodeSpace
from sparsecircuits.circuits.schema import load_circuit
from sparsecircuits.errors import InputError
from sparsecircuits.viz import playground as pg
from sparsecircuits.viz.analysis_schema import load_analysis

TEXT = "def read(path):\n    with open(path) as f:\n        return f.read("


@pytest.fixture(scope="module")
def doc(viz_circuit_dir):
    return load_circuit(viz_circuit_dir)


@pytest.fixture(scope="module")
def zero(viz_lm, doc):
    return pg.circuit_ablation(viz_lm, doc, kind="zero")


def _run(viz_lm, doc, **kw):
    return pg.run_playground(viz_lm.model, viz_lm.tokenizer, kw.pop("text", TEXT), doc=doc, **kw)


def test_node_ids_round_trip(doc):
    for n in doc.nodes:
        node = pg.parse_node_id(n.id)
        assert (node.layer, node.loc, node.index) == (n.layer, n.loc, n.index)
    assert pg.parse_node_id("embed.7") == Node(-1, Location.EMBED, 7)
    for bad in ("0.attn_q", "x.attn_q.1", "0.nope.1", "embed.x", ""):
        with pytest.raises(InputError):
            pg.parse_node_id(bad)


def test_encode_prompt_truncates_and_refuses_empty(viz_lm):
    tok = viz_lm.tokenizer
    ids = pg.encode_prompt(tok, TEXT * 20, block_size=16)
    assert ids == tok.encode(TEXT * 20)[-16:]
    with pytest.raises(InputError, match="empty"):
        pg.encode_prompt(tok, "", block_size=16)


def test_clean_run_matches_the_model(viz_lm, doc):
    model, tok = viz_lm.model, viz_lm.tokenizer
    r = _run(viz_lm, doc, target_ids=(5, 9))
    ids = tok.encode(TEXT)
    assert r.tokens == [tok.id_to_token(i) for i in ids]
    assert r.acts.shape == (len(doc.nodes), len(ids)) and torch.equal(r.acts, r.acts_changed)
    logits, cache = model.run_with_cache(torch.tensor([ids]))
    probs = torch.softmax(logits[0, -1], -1)
    assert [t.id for t in r.top] == probs.topk(10).indices.tolist()
    assert r.top[0].prob == pytest.approx(float(probs.max()), rel=1e-5)
    assert r.top == r.top_changed and not r.changed_nodes
    assert [t.delta for t in r.targets] == [0.0, 0.0]
    assert r.targets[0].clean == pytest.approx(float(logits[0, -1, 5]), abs=1e-5)
    row = r.node_ids.index(next(n.id for n in doc.nodes if n.loc is Location.MLP_NEURON))
    node = pg.parse_node_id(r.node_ids[row])
    assert torch.allclose(r.acts[row], cache[node.site][0, :, node.index], atol=1e-6)


def test_ablation_goes_through_the_circuit_masks(viz_lm, doc, zero):
    model, tok = viz_lm.model, viz_lm.tokenizer
    chosen = [n.id for n in doc.nodes if n.layer == 0 and n.loc is Location.ATTN_OUT][:6]
    targets = (3, 11)
    r = _run(viz_lm, doc, ablation=zero, change=chosen, target_ids=targets)
    for nid in chosen:  # zero ablation: the gated activation is 0 at every position
        assert torch.all(r.acts_changed[r.node_ids.index(nid)] == 0)
    untouched = r.node_ids.index(
        next(n.id for n in doc.nodes if n.layer == 0 and n.loc is Location.ATTN_IN)
    )
    assert torch.equal(r.acts[untouched], r.acts_changed[untouched])  # upstream of the ablation
    space = NodeSpace(model.config, mask_embed=doc.mask_embed)
    gates = torch.ones(space.total)
    for nid in chosen:
        gates[space.flat_index(pg.parse_node_id(nid))] = 0
    ids = tok.encode(TEXT)
    ref = masked_last_logits(
        model, torch.tensor([ids]), torch.tensor([len(ids)]), space=space, gates=gates,
        ablation=Ablation("zero", zero_values(space)),
    )[0]  # fmt: skip
    for t, tid in zip(r.targets, targets, strict=True):
        assert t.changed == pytest.approx(float(ref[tid]), abs=1e-4)
    diff = r.logit_diff
    assert diff == pytest.approx(
        (r.targets[0].clean - r.targets[1].clean, float(ref[3] - ref[11])), abs=1e-4
    )
    assert r.top != r.top_changed or any(abs(t.delta) > 1e-6 for t in r.targets)


def test_patching(viz_lm, doc):
    model, tok = viz_lm.model, viz_lm.tokenizer
    chosen = [n.id for n in doc.nodes if n.layer == 1 and n.loc is Location.MLP_NEURON][:4]
    same = _run(viz_lm, doc, change=chosen, mode="patch", source_text=TEXT, target_ids=(3,))
    assert torch.allclose(same.acts, same.acts_changed) and same.targets[0].delta == pytest.approx(
        0.0, abs=1e-5
    )
    source = "x = {'a': 1}\nprint(x["
    r = _run(viz_lm, doc, change=chosen, mode="patch", source_text=source)
    _, cache = model.run_with_cache(torch.tensor([tok.encode(source)]))
    for nid in chosen:
        node = pg.parse_node_id(nid)
        assert float(r.acts_changed[r.node_ids.index(nid), -1]) == pytest.approx(
            float(cache[node.site][0, -1, node.index]), abs=1e-5
        )


def test_bad_requests(viz_lm, doc, zero):
    one = [doc.nodes[0].id]
    with pytest.raises(InputError, match="ablation values"):
        _run(viz_lm, doc, change=one)
    with pytest.raises(InputError, match="source prompt"):
        _run(viz_lm, doc, change=one, mode="patch")
    with pytest.raises(InputError, match="mode"):
        _run(viz_lm, doc, ablation=zero, change=one, mode="swap")
    with pytest.raises(InputError, match="token nodes"):
        pg.patch_interventions(viz_lm.model, [Node(-1, Location.EMBED, 3)], torch.tensor([[1, 2]]))


def test_task_example_matches_the_analysis_targets(viz_lm, doc, viz_circuit_dir):
    ex = pg.task_example(doc, viz_lm.tokenizer, block_size=viz_lm.model.config.block_size)
    assert ex.prompt_a and ex.prompt_b and ex.target_ids[0] != ex.target_ids[1]
    targets = load_analysis(viz_circuit_dir).targets
    assert targets is not None and list(ex.target_ids) == targets.ids


def test_circuit_ablation_kinds(viz_lm, doc):
    space = NodeSpace(viz_lm.model.config, mask_embed=doc.mask_embed)
    z = pg.circuit_ablation(viz_lm, doc, kind="zero")
    assert z.kind == "zero" and all(float(v.abs().sum()) == 0 for v in z.values.values())
    t = pg.circuit_ablation(viz_lm, doc, kind="task_mean")
    t.check(space)
    assert t.kind == "task_mean" and any(float(v.abs().sum()) > 0 for v in t.values.values())
    assert pg.circuit_ablation(viz_lm, doc).kind == doc.ablation


def _reference_continuation(model, tok, ids, n_new, interventions=None):
    """Greedy decoding written out: a full forward of the whole text every step."""
    idx = torch.tensor([ids])
    for _ in range(n_new):
        if interventions:
            logits = model.run_with_hooks(idx, interventions=interventions)
        else:
            logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1:].argmax(-1)], dim=1)
    new = idx[0, len(ids) :].tolist()
    return tok.decode(new[: new.index(tok.eot_id)] if tok.eot_id in new else new)


def test_greedy_continuation_clean_and_ablated_matches_full_recomputation(viz_lm, doc, zero):
    model, tok = viz_lm.model, viz_lm.tokenizer
    # Every attention write of layer 0 zeroed: enough to change what the model writes next.
    chosen = [n.id for n in doc.nodes if n.layer == 0 and n.loc is Location.ATTN_OUT]
    r = _run(viz_lm, doc, ablation=zero, change=chosen, continue_tokens=12)
    ids = tok.encode(TEXT)
    assert r.continuation == _reference_continuation(model, tok, ids, 12)
    space = NodeSpace(model.config, mask_embed=doc.mask_embed)
    interventions = pg.ablation_interventions(
        model, space, Ablation("zero", zero_values(space)),
        [pg.parse_node_id(c) for c in chosen], torch.tensor([ids]),
    )  # fmt: skip
    assert r.continuation_changed == _reference_continuation(model, tok, ids, 12, interventions)
    assert r.continuation_changed != r.continuation  # the ablation really reached the decoding
    clean_only = _run(viz_lm, doc, continue_tokens=5)
    assert clean_only.continuation_changed is None and clean_only.continuation is not None
