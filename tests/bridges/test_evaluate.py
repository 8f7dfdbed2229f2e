"""Bridge fidelity: perfect for identity bridges between a model and itself, not for others;
the ``bridge fit|eval`` commands on the shipped pair, and their one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.evaluate import fidelity, format_table
from sparsecircuits.errors import InputError
from tests.model.helpers import tiny_model, tokens


def test_identity_bridges_to_itself_are_perfect_and_other_bridges_are_not():
    m = tiny_model(0)
    b = Bridges(n_layer=m.config.n_layer, d_dense=m.config.d_model,
                d_sparse=m.config.d_model).set_identity()  # fmt: skip
    doc = fidelity(m, m, b, tokens(batch=5, seq=10), batch=2)
    assert doc["windows"] == 5 and doc["sparse_alone"]["agree"] == pytest.approx(1.0)
    for r in doc["sites"]:
        assert r["enc_nmse"] == pytest.approx(0.0, abs=1e-6)
        assert r["kl_d2s"] == pytest.approx(0.0, abs=1e-5) and r["agree_s2d"] == pytest.approx(1)
    torch.manual_seed(0)
    rand = Bridges(n_layer=m.config.n_layer, d_dense=m.config.d_model, d_sparse=m.config.d_model)
    bad = fidelity(m, tiny_model(1), rand, tokens(batch=5, seq=10), batch=2)
    assert all(r["kl_s2d"] > 1e-3 and r["enc_nmse"] > 0.1 for r in bad["sites"])
    assert bad["sparse_alone"]["kl"] > 1e-3
    assert "sparse alone" in format_table(bad) and "final_resid" in format_table(bad)


@pytest.mark.slow
def test_bridge_commands_on_the_shipped_pair(tmp_path: Path):
    from typer.testing import CliRunner

    from sparsecircuits.cli import app

    out = tmp_path / "br"
    r = CliRunner().invoke(app, ["bridge", "fit", "--out", str(out), "--steps", "2", "--batch",
                                 "1", "--seq-len", "16", "--init-tokens", "64"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["bridge", "eval", str(out), "--windows", "2", "--seq-len", "16",
                                 "--json", str(tmp_path / "f.json")])  # fmt: skip
    assert r.exit_code == 0 and "final_resid" in r.output, r.output
    assert (tmp_path / "f.json").exists()
    # bridges fitted to stdlib-sparse, asked for with another sparse model: one line
    r = CliRunner().invoke(app, ["bridge", "eval", str(out), "--sparse", "stdlib-dense"])
    assert isinstance(r.exception, InputError) and "another sparse model" in str(r.exception)
    r = CliRunner().invoke(app, ["bridge", "fit", "--out", str(out), "--seq-len", "1000"])
    assert isinstance(r.exception, InputError) and "--seq-len" in str(r.exception)
