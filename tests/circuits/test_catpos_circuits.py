"""Pruning, edges, analysis and the dashboard on a model with concatenated position channels:
a read location (attn_in, mlp_in) has d_model residual channels followed by d_pos_emb position
channels, and the position channels are nodes like any other (mean-ablated when pruned)."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

from sparsecircuits import cli
from sparsecircuits.circuits.edges import edge_set
from sparsecircuits.circuits.nodes import Location, NodeSpace
from sparsecircuits.circuits.schema import load_circuit
from sparsecircuits.model.io import load_model, save_model
from sparsecircuits.viz.analysis_schema import load_analysis
from tests.circuits.conftest import circuit_model

D_POS = 4
SMALL = ["--steps", "3", "--set", "n_train_pairs=8", "--set", "n_test_pairs=8", "--set",
         "batch_pairs=4", "--ablation", "task_mean", "--set", "target_loss=1e-6"]  # fmt: skip


@pytest.fixture(scope="module")
def catpos_dir(tmp_path_factory, circuit_tokenizer):
    directory = tmp_path_factory.mktemp("catpos_model")
    model = circuit_model(
        circuit_tokenizer.vocab_size, seed=3, d_pos_emb=D_POS, learned_pos_emb=False,
        sinusoidal_cat_pos_emb=True,
    )  # fmt: skip
    save_model(model, directory)
    circuit_tokenizer.save(directory)
    return directory


def test_position_channels_are_read_nodes(catpos_dir):
    model = load_model(catpos_dir)
    c = model.config
    space = NodeSpace(c)
    assert space.group(0, Location.ATTN_IN).size == c.d_model + D_POS
    assert space.group(0, Location.MLP_IN).size == c.d_model + D_POS
    assert space.group(0, Location.ATTN_OUT).size == c.d_model
    # With every node kept, position channels feed q/k/v and neurons, but are never residual
    # links (nothing writes them) nor embedding edges (the token embedding has d_model columns).
    edges = edge_set(
        model, NodeSpace(c, mask_embed=True), torch.arange(NodeSpace(c, mask_embed=True).total)
    )
    es = edges.edges(NodeSpace(c, mask_embed=True))
    pos_src = [e for e in es if e.src.loc in (Location.ATTN_IN, Location.MLP_IN)
               and e.src.index >= c.d_model]  # fmt: skip
    assert {e.kind for e in pos_src} >= {"read_q", "read_k", "read_neuron"}
    into_pos = [e for e in es if e.dst.index >= c.d_model and e.dst.loc in (Location.ATTN_IN,
                Location.MLP_IN)]  # fmt: skip
    assert into_pos == []


def test_prune_analyze_and_dashboard_on_a_catpos_model(catpos_dir, tmp_path, monkeypatch):
    out = tmp_path / "circuit"
    res = CliRunner().invoke(
        cli.app,
        ["prune", "--task", "single_double_quote", "--model", str(catpos_dir), "--out", str(out),
         *SMALL],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = load_circuit(out)
    assert doc.model.d_pos_emb == D_POS
    d_model = doc.model.d_model
    # An unreachable target keeps every node, position channels included.
    assert any(n.loc.value == "attn_in" and n.index >= d_model for n in doc.nodes)
    res = CliRunner().invoke(cli.app, ["analyze", str(out), "--windows", "2"])
    assert res.exit_code == 0, res.output
    analysis = load_analysis(out)
    assert all(int(ch) < d_model for ch in analysis.embeddings.channels)

    from streamlit.testing.v1 import AppTest

    from sparsecircuits.viz.launch import APP

    monkeypatch.setattr(sys, "argv", [str(APP), str(out), "--runs-dir", str(tmp_path)])
    app = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("nodes kept" in m.label for m in app.metric)
