"""Steering through a bridge on tiny models: with an identity bridge into the same model the
bridged steering is exactly the sparse model's own; a zeroed decoder carries nothing; the random
control matches norms; node ids and sides are checked in one line each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.fit import FitConfig, fit
from sparsecircuits.bridges.steer import (
    Prompts,
    check_sides,
    flips,
    next_site,
    parse_node,
    random_like,
    rank_nodes,
)
from sparsecircuits.bridges.steer_run import format_steering, run_steering
from sparsecircuits.data import Tokenizer, stdlib_dir, train_tokenizer
from sparsecircuits.errors import InputError
from sparsecircuits.model.io import save_model, weights_hash
from sparsecircuits.tasks import registry
from tests.bridges.test_fit import Windows
from tests.circuits.conftest import _FILES, circuit_model

TASK = "single_double_quote"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [(stdlib_dir() / n).read_text(encoding="utf-8") for n in _FILES]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture(scope="module")
def model(tok):
    return circuit_model(tok.vocab_size, seed=0, block_size=128)


def _identity(m) -> Bridges:
    return Bridges(n_layer=m.config.n_layer, d_dense=m.config.d_model,
                   d_sparse=m.config.d_model).set_identity()  # fmt: skip


def _run(m, d, b, tok, node: str, scales, **kw):
    return run_steering(m, d, b, tok, task=TASK, node=parse_node(node, m), src="a", dst="b",
                        scales=scales, seeds=[0, 1], n_pairs=12, side_pairs=4,
                        side_tasks=kw.pop("side_tasks", []), **kw)  # fmt: skip


def test_node_ids_are_checked_in_one_line(model):
    assert parse_node("1.mlp_neuron.5", model).site == "1.mlp.post_act"
    for bad, why in [("x", "LAYER.LOCATION.INDEX"), ("0.attn_zz.1", "not one of"),
                     ("9.attn_out.1", "layers 0..1"), ("0.attn_out.999", "outside"),
                     ("0.mlp_neuron.64", "outside"), ("-1.attn_out.1", "LAYER")]:  # fmt: skip
        with pytest.raises(InputError, match=why) as err:
            parse_node(bad, model)
        assert "\n" not in str(err.value) and "--node" in str(err.value)
    with pytest.raises(InputError, match="two sides"):
        check_sides("a", "a")
    with pytest.raises(InputError, match="two sides"):
        check_sides("a", "c")


def test_the_residual_site_after_each_sublayer(model):
    n = model.config.n_layer
    assert next_site(parse_node("0.attn_q.3", model), n) == "0.resid_mid"
    assert next_site(parse_node("0.mlp_out.3", model), n) == "1.resid_in"
    assert next_site(parse_node("1.mlp_neuron.3", model), n) == "final_resid"


@pytest.mark.parametrize("node", ["1.attn_out.23", "0.mlp_neuron.23", "1.attn_v.2"])
def test_an_identity_bridge_into_the_same_model_steers_as_the_sparse_model(model, tok, node):
    """The bridged path (carry to the next site, decode, add in the dense model) must equal
    moving the node in place when the "dense" model is the sparse one and the bridge the
    identity: a wrong site, position or sign would show."""
    doc = _run(model, model, _identity(model), tok, node, [0.0, 3.0, 300.0])
    zero, *moved = doc["rows"]
    assert zero["bridged"]["flip"] == 0 and zero["bridged"]["dlogit"] == 0
    assert zero["random"]["flip_max"] == 0
    for r in moved:
        assert r["bridged"]["dlogit"] == pytest.approx(r["sparse"]["dlogit"], abs=1e-4)
        assert r["bridged"]["flip"] == r["sparse"]["flip"]
    assert moved[-1]["bridged"]["dlogit"] != 0  # the move does something at all
    assert doc["value_from"] != doc["value_to"]


def test_a_zeroed_decoder_carries_nothing(model, tok):
    """A check that can fail: the same move through a decoder of zeros leaves the dense model
    unchanged while the sparse model itself moves."""
    b = _identity(model)
    with torch.no_grad():
        for sb in b.by_site:
            sb.dec.weight.zero_()
    r = _run(model, model, b, tok, "1.attn_out.23", [300.0])["rows"][0]
    assert r["bridged"]["dlogit"] == 0 and r["bridged"]["flip"] == 0
    assert r["sparse"]["dlogit"] != 0


def test_side_effects_and_the_table(model, tok):
    windows = torch.randint(0, tok.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    others = ["bracket_counting", "while_return_true"]
    doc = _run(model, model, _identity(model), tok, "1.attn_out.23", [0.0, 300.0],
               windows=windows, side_tasks=others)  # fmt: skip
    zero, big = doc["rows"]
    assert list(zero["side_effects"]["tasks"]) == others
    for a in zero["side_effects"]["tasks"].values():  # no move: nothing changes
        assert a["before"] == a["after"]
    ho = zero["side_effects"]["heldout_loss"]
    assert ho["before"] == pytest.approx(ho["after"])
    assert big["side_effects"]["heldout_loss"]["after"] != pytest.approx(ho["before"])
    text = format_steering(doc)
    assert "1.attn_out.23" in text and len(text.splitlines()) == 5
    json.dumps(doc)  # JSON-ready


def test_flips_by_hand():
    before = torch.tensor([1.0, 2.0, -1.0, 0.5])
    after = torch.tensor([-1.0, 3.0, -2.0, 0.0])  # 0.0 is a tie: no longer the from-answer
    got = flips(before, after)
    assert got["n"] == 3 and got["flip"] == pytest.approx(2 / 3)
    assert got["dlogit"] == pytest.approx((-2 + 1 - 1 - 0.5) / 4)


def test_the_random_control_matches_norms_position_by_position():
    delta = torch.randn(3, 5, 8)
    delta[0, 0] = 0
    r0, r0b, r1 = random_like(delta, seed=0), random_like(delta, seed=0), random_like(delta, seed=1)
    assert torch.allclose(r0.norm(dim=-1), delta.norm(dim=-1), atol=1e-5)
    assert torch.equal(r0, r0b) and not torch.allclose(r0, r1)
    u = r0[1, 1] / r0[1, 1].norm()  # one direction for every position
    assert torch.allclose(r0[2, 3] / r0[2, 3].norm(), u, atol=1e-5)


def test_positions_last_and_all():
    p = Prompts.of([[1, 2, 3], [4, 5]], "last", "cpu")
    assert p.mask.tolist() == [[False, False, True], [False, True, False]]
    p = Prompts.of([[1, 2, 3], [4, 5]], "all", "cpu")
    assert p.mask.tolist() == [[True, True, True], [True, True, False]]


def test_rank_nodes_puts_a_class_separating_node_first(model, tok):
    train = registry.get(TASK).build(tok, split="train", n=12, max_len=128)
    nodes = [parse_node(n, model) for n in ("0.attn_out.7", "0.mlp_neuron.11", "1.attn_v.2")]
    rows = rank_nodes(model, nodes, train, positions="last", top=2)
    assert len(rows) == 2 and rows[0]["separation"] >= rows[1]["separation"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsecircuits.cli", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_bridge_steer_on_the_command_line(tmp_path: Path, model, tok):
    """End to end on saved tiny models: a result with its controls, then a one-line error for
    a node that does not exist (bridges of another model: test_fit)."""
    dense = circuit_model(tok.vocab_size, seed=1, block_size=128)
    sd, dd, bd = tmp_path / "s", tmp_path / "d", tmp_path / "b"
    for m, d in ((model, sd), (dense, dd)):
        save_model(m, d)
        tok.save(d)
    cfg = FitConfig(steps=2, batch=2, seq_len=8, init_tokens=256)
    fit(model, dense, Windows(tok.vocab_size), bd, cfg,
        hashes={"sparse": weights_hash(model), "dense": weights_hash(dense)})  # fmt: skip
    common = ["--prompts", TASK, "--sparse", str(sd), "--dense", str(dd), "--pairs", "8",
              "--side-pairs", "0", "--heldout-windows", "0", "--seeds", "2"]  # fmt: skip
    out = tmp_path / "steer.json"
    res = _cli("bridge", "steer", str(bd), "--node", "0.attn_out.7", "--scale", "1",
               "--scale", "4", "--json", str(out), *common)  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    assert [r["scale"] for r in doc["rows"]] == [1.0, 4.0] and "bridges_sha256" in doc
    res = _cli("bridge", "steer", str(bd), "--node", "0.attn_out.999", *common)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [x for x in res.stderr.splitlines() if x.startswith("error:")] == [
        "error: --node '0.attn_out.999': node index 999 outside [0, 32) at 0.attn_out"
    ]
