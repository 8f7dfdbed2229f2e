"""``analysis.json`` on a tiny circuit: structure, faithfulness to the model, caching and the
weights-hash refusal."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sparsecircuits import cli, tasks
from sparsecircuits.circuits.nodes import READS, WRITES, Node
from sparsecircuits.circuits.schema import load_circuit
from sparsecircuits.errors import CheckpointError
from sparsecircuits.viz.analysis import analyze
from sparsecircuits.viz.analysis_parts import sig, training_metrics
from sparsecircuits.viz.analysis_schema import ANALYSIS_FILE, QUANTILES, load_analysis
from tests.viz.conftest import VIZ_WINDOWS


def _prompt_a0(lm, doc) -> list[int]:
    """Token ids of the task's first train prompt A, as the analysis built it."""
    batch = tasks.get(doc.task).build(
        lm.tokenizer,
        split="train",
        n=doc.n_pairs,
        seed=doc.seed,
        max_len=lm.model.config.block_size,
    )
    return batch.prompts_a[0]


@pytest.fixture(scope="module")
def loaded(viz_circuit_dir):
    return load_circuit(viz_circuit_dir), load_analysis(viz_circuit_dir)


def test_every_node_with_stats_and_snippets(loaded, viz_lm):
    doc, an = loaded
    assert an.circuit_weights_hash == doc.model.weights_hash
    assert an.task == doc.task and an.corpus == "stdlib" and an.n_windows == VIZ_WINDOWS
    assert an.window == viz_lm.model.config.block_size and an.quantiles == list(QUANTILES)
    assert set(an.nodes) == {n.id for n in doc.nodes}
    assert {n.loc for n in doc.nodes} >= {*READS, *WRITES}  # every location is exercised
    for rec in doc.nodes:
        a = an.nodes[rec.id]
        assert a.site == Node(rec.layer, rec.loc, rec.index).site and a.channel == rec.index
        s = a.stats
        assert s.min <= s.mean <= s.max and 0 <= s.frac_nonzero <= 1 and s.std >= 0
        for side in ("top", "bottom"):
            snips = getattr(a.samples, side)
            assert [x.q for x in snips] == list(QUANTILES)
            for x in snips:
                assert len(x.acts) == len(x.tokens) and 0 <= x.focus < len(x.tokens)
                assert x.acts[x.focus] == x.value and s.min <= x.value <= s.max
        tops = [x.value for x in a.samples.top]
        assert tops == sorted(tops, reverse=True)
        assert a.samples.bottom[0].value <= a.samples.top[-1].value


def test_task_activations_match_the_model(loaded, viz_lm):
    doc, an = loaded
    rec = next(n for n in doc.nodes if n.loc.value == "mlp_neuron")
    task = an.nodes[rec.id].task
    assert len(task.a) == len(task.b) == doc.n_pairs
    assert task.mean_a == sig(sum(p.acts[-1] for p in task.a) / len(task.a))
    ids = _prompt_a0(viz_lm, doc)
    _, cache = viz_lm.model.run_with_cache(torch.tensor([ids]), names=[f"{rec.layer}.mlp.post_act"])
    want = cache[f"{rec.layer}.mlp.post_act"][0, :, rec.index]
    assert len(ids) == len(task.a[0].acts)
    assert torch.allclose(torch.tensor(task.a[0].acts), want, rtol=1e-3, atol=1e-4)


def test_attention_pattern_reproduces_head_outputs(loaded, viz_lm):
    doc, an = loaded
    model = viz_lm.model
    d = model.config.d_head
    heads = {(n.layer, n.head) for n in doc.nodes if n.head is not None}
    assert {f"{layer}.{h}" for layer, h in heads} == set(an.attention)
    for key, att in an.attention.items():
        layer, head = map(int, key.split("."))
        ids = _prompt_a0(viz_lm, doc)
        assert att.prompt == [viz_lm.tokenizer.decode([i]) for i in ids]
        t = len(ids)
        pattern = torch.tensor(att.pattern)
        assert pattern.shape == (t, t + 1)
        assert torch.allclose(pattern.sum(1), torch.ones(t), atol=1e-3)
        names = [f"{layer}.attn.v", f"{layer}.attn.y"]
        _, cache = model.run_with_cache(torch.tensor([ids]), names=names)
        sl = slice(head * d, (head + 1) * d)
        y = pattern[:, 1:] @ cache[f"{layer}.attn.v"][0, :, sl]
        assert torch.allclose(y, cache[f"{layer}.attn.y"][0, :, sl], rtol=1e-2, atol=1e-3)
        for rows in att.channels.values():
            assert len(rows) == t and all(len(r) == t for r in rows)
            assert rows[0][1:] == [None] * (t - 1) and rows[-1][-1] is not None


def test_embeddings_targets_and_size(loaded, viz_lm, viz_circuit_dir):
    doc, an = loaded
    cfg = viz_lm.model.config
    used = {str(n.index) for n in doc.nodes if n.loc in (*READS, *WRITES)}
    assert set(an.embeddings.channels) == used
    for ch in an.embeddings.channels.values():
        assert len(ch.top) == len(ch.bottom) == 10 and ch.top[0][1] >= ch.bottom[0][1]
        assert sum(ch.hist.counts) == cfg.vocab_size and len(ch.hist.edges) == 31
    assert len(an.embeddings.wpe) == cfg.block_size and len(an.embeddings.wpe[0]) == cfg.d_model
    assert an.metrics is None  # the test model has no training log
    assert an.targets is not None and len(an.targets.tokens) == 2
    assert set(an.targets.direct) == {n.id for n in doc.nodes if n.loc in WRITES}
    assert (viz_circuit_dir / ANALYSIS_FILE).stat().st_size < 5e6


def test_reuse_force_and_hash_refusal(copy_circuit):
    d = copy_circuit()
    _, _, reused = analyze(d, n_windows=VIZ_WINDOWS)
    assert reused
    _, _, reused = analyze(d, n_windows=VIZ_WINDOWS, force=True)
    assert not reused
    data = json.loads((d / ANALYSIS_FILE).read_text())
    data["circuit_weights_hash"] = "0" * 64
    (d / ANALYSIS_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"analyze .* --force") as err:
        load_analysis(d)
    assert "\n" not in str(err.value)
    _, _, reused = analyze(d, n_windows=VIZ_WINDOWS)  # a stale file is recomputed
    assert not reused and load_analysis(d).circuit_weights_hash != "0" * 64
    with pytest.raises(CheckpointError, match="no analysis file"):
        load_analysis(copy_circuit(with_analysis=False))


def test_cli_analyze(copy_circuit, circuit_model_dir):
    d = copy_circuit(with_analysis=False)
    args = ["analyze", str(d), "--model", str(circuit_model_dir), "--windows", "2"]
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0, res.output
    assert "written" in res.output and load_analysis(d).n_windows == 2
    res = CliRunner().invoke(cli.app, args)
    assert res.exit_code == 0 and "reused" in res.output


def test_training_metrics(tmp_path):
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    assert training_metrics(model) is None
    lines = [
        {"step": 10, "train_loss": 3.21234, "l0_frac": 1.0},
        {"step": 20, "train_loss": 3.0, "val_loss": 3.1, "dead_neurons": [1, 2], "l0": {"a": 1}},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 3'  # torn last line
    (tmp_path / "run" / "metrics.jsonl").write_text(text)
    rows = training_metrics(model)
    assert rows == [
        {"step": 10, "train_loss": 3.212, "val_loss": None, "l0_frac": 1.0, "dead_neurons": None},
        {"step": 20, "train_loss": 3.0, "val_loss": 3.1, "l0_frac": None, "dead_neurons": 3},
    ]
