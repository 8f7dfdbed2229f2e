"""Review (session 15) of the bridges work of issue 23: each test was a strict xfail showing one
bug, now fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsecircuits.bridges.steer import Prompts, _add_at, parse_node, sparse_delta
from sparsecircuits.errors import SparseCircuitsError
from sparsecircuits.model.hooks import Hooks
from tests.circuits.conftest import circuit_model


def _measured(m, node, amount: float, site: str, p: Prompts) -> torch.Tensor:
    """The change of the residual at ``site`` when the node is moved, by running the model."""
    plain = Hooks(cache_names=[site])
    steered = Hooks(cache_names=[site],
                    interventions={node.site: _add_at(p.mask, amount, node.index)})  # fmt: skip
    m(p.idx, hooks=plain)
    m(p.idx, hooks=steered)
    return steered.cache[site] - plain.cache[site]


@pytest.mark.parametrize("cfg", [
    {"residual_activation_type": "relu"},
    {"afrac_loctypes": "attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out,"
                       "resid_post_attn,resid_post_mlp"},
])  # fmt: skip
def test_a_write_nodes_carried_change_is_the_models_own(cfg):
    """For a residual write the "direct decode" shortcut assumes the write reaches the next
    site unchanged; with a ReLU residual or a residual AbsTopK (both supported configs; bridge
    fit/train even ask for the encoder's k for the latter) it does not, and the bridged arm
    then steers with a change the sparse model never makes."""
    m = circuit_model(512, seed=0, block_size=64, **cfg)
    node = parse_node("0.attn_out.5", m)
    p = Prompts.of([[1, 2, 3, 4, 5], [6, 7, 8]], "last", "cpu")
    got = sparse_delta(m, node, -3.0, "0.resid_mid", p)
    torch.testing.assert_close(got, _measured(m, node, -3.0, "0.resid_mid", p))


def test_bridged_scores_on_spans_carry_their_sites_fidelity():
    """Issue 23: every bridge-derived score carries its site's fidelity, no bridge-derived flag
    without it. The OpenTelemetry span gets circuit.family.<name>.score/.flagged (and the
    decision's family) for a bridged family with nothing of its site or fidelity."""
    from sparsecircuits.monitor.runtime import Action, Decision
    from sparsecircuits.serve.tracing import circuit_attributes

    ev = {"site": "0.resid_in", "enc_nmse": 0.46, "dec_nmse": 0.44, "kl_d2s": 0.63,
          "agree_d2s": 0.5}  # fmt: skip
    tel = {"families": {"quotes": {"max_z": 7.5, "flags": {"r": [3]}, "bridge": ev}},
           "monitoring": {"mode": "bridged"}}  # fmt: skip
    d = Decision(Action.REVIEW, policy_sha256="p", family="quotes", rule="r", at_token=3,
                 bridge=ev)  # fmt: skip
    attrs = circuit_attributes(decision=d, telemetry=tel)
    assert "circuit.family.quotes.flagged" in attrs  # the flag is exported ...
    assert any("bridge" in k or "fidelity" in k or "kl_d2s" in k for k in attrs)  # ... with it


def test_bridge_steer_with_a_malformed_fidelity_file_is_one_line(tmp_path: Path, capsys):
    from sparsecircuits.bridges.evaluate import FIDELITY_FILE
    from sparsecircuits.bridges.fit import FitConfig, fit
    from sparsecircuits.cli.bridge import steer_cmd
    from sparsecircuits.data import stdlib_dir, train_tokenizer
    from sparsecircuits.model.io import save_model, weights_hash
    from tests.bridges.test_fit import Windows
    from tests.circuits.conftest import _FILES

    tok = train_tokenizer([(stdlib_dir() / n).read_text(encoding="utf-8") for n in _FILES],
                          vocab_size=512)  # fmt: skip
    s, d = (
        circuit_model(tok.vocab_size, seed=0, block_size=128),
        circuit_model(tok.vocab_size, seed=1, block_size=128),
    )
    sd, dd, bd = tmp_path / "s", tmp_path / "d", tmp_path / "b"
    for m, out in ((s, sd), (d, dd)):
        save_model(m, out)
        tok.save(out)
    fit(s, d, Windows(tok.vocab_size), bd, FitConfig(steps=1, batch=2, seq_len=8, init_tokens=64),
        hashes={"sparse": weights_hash(s), "dense": weights_hash(d)})  # fmt: skip
    (bd / FIDELITY_FILE).write_text("{not json")
    out = tmp_path / "steer.json"
    # the result stands without a site fidelity; one line says why (no traceback)
    steer_cmd(str(bd), node="0.attn_out.7", prompts="single_double_quote", src="a",
              dst="b", scale=[1.0], seeds=1, pairs=4, side_pairs=0, heldout_windows=0,
              positions="last", sparse=str(sd), dense=str(dd), json_out=out)  # fmt: skip
    err = capsys.readouterr().err
    assert "no site fidelity recorded" in err and "not valid JSON" in err
    assert "Traceback" not in err and "site_fidelity" not in json.loads(out.read_text())


def test_sanity_the_shortcut_holds_for_an_identity_residual():
    """(Passes today.) The shortcut is exact when nothing acts on the residual after a write,
    as in the shipped models: the other configurations are the test above."""
    m = circuit_model(512, seed=0, block_size=64)
    node = parse_node("0.attn_out.5", m)
    p = Prompts.of([[1, 2, 3, 4, 5], [6, 7, 8]], "last", "cpu")
    got = sparse_delta(m, node, -3.0, "0.resid_mid", p)
    torch.testing.assert_close(got, _measured(m, node, -3.0, "0.resid_mid", p))
    json.dumps({"ok": True})


from tests.bridges.test_joint import dense_dir  # noqa: E402,F401
from tests.train.conftest import cache_dir, small_corpus, tiny_config  # noqa: E402,F401


def test_a_plain_resume_of_a_joint_run_is_refused(small_corpus, cache_dir, dense_dir,  # noqa: F811
                                                  tmp_path):  # fmt: skip
    from sparsecircuits.bridges.joint import JointConfig, joint_trainer
    from sparsecircuits.train.trainer import Trainer, read_run_config

    run = tmp_path / "run"
    cfg = tiny_config(small_corpus, steps=6, eval_every=3, checkpoint_every=3)

    def die(rec: dict) -> None:
        if rec["step"] == 4:  # after the checkpoint at step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        joint_trainer(cfg, JointConfig(), dense=dense_dir, run_dir=run, device="cpu",
                      cache_dir=cache_dir).run(on_record=die)  # fmt: skip
    # what `sparsecircuits train --resume --out RUN` does: the run's own config, no objective
    with pytest.raises(SparseCircuitsError):
        Trainer(read_run_config(run), run_dir=run, device="cpu", cache_dir=cache_dir,
                resume=True).run()  # fmt: skip
