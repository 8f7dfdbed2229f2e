"""The bridges shipped for stdlib-sparse <-> stdlib-dense: they load with the shipped models,
fit the size budget, and their card, fidelity table, steering results and bridged baseline all
belong to these very weights (so none can go stale)."""

from __future__ import annotations

import json

import pytest

from sparsecircuits.bridges.card import CARD_FILE, STEERING_DIR, card_text
from sparsecircuits.bridges.evaluate import FIDELITY_FILE
from sparsecircuits.bridges.fit import load_bridges, load_meta, resolve_bridges_dir
from sparsecircuits.errors import InputError
from sparsecircuits.model.io import PRETRAINED_ROOT, load_model, weights_hash

NAME = "stdlib-bridges"
SHIPPED = PRETRAINED_ROOT / NAME


def test_they_resolve_by_name_and_load_with_the_shipped_models():
    assert resolve_bridges_dir(NAME) == SHIPPED
    s, d = (
        load_model(PRETRAINED_ROOT / "stdlib-sparse"),
        load_model(PRETRAINED_ROOT / "stdlib-dense"),
    )
    b = load_bridges(SHIPPED, hashes={"sparse": weights_hash(s), "dense": weights_hash(d)})
    assert len(b.sites) == 2 * s.config.n_layer + 1
    with pytest.raises(InputError, match="fitted to another sparse model"):
        load_bridges(SHIPPED, hashes={"sparse": weights_hash(d), "dense": weights_hash(d)})
    with pytest.raises(InputError, match="no such bridges directory or shipped bridges"):
        resolve_bridges_dir("no-such-bridges")


def test_they_fit_the_budget():
    total = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert total <= 25 * 2**20, total


def test_every_file_belongs_to_these_weights():
    sha = load_meta(SHIPPED).weights_sha256
    fid = json.loads((SHIPPED / FIDELITY_FILE).read_text())
    assert fid["weights_sha256"] == sha
    assert [r["site"] for r in fid["sites"]] == load_meta(SHIPPED).sites
    runs = sorted((SHIPPED / STEERING_DIR).glob("*.json"))
    assert {p.stem for p in runs} >= {"single_double_quote", "while_return_true"}
    for p in runs:
        assert json.loads(p.read_text())["bridges_sha256"] == sha, p
    base = json.loads((SHIPPED / "baseline.json").read_text())
    assert base["bridge"]["bridges_sha256"] == sha
    # the card is exactly what `bridge card` writes from these files
    text = card_text(SHIPPED, name=NAME, sparse="stdlib-sparse", dense="stdlib-dense")
    assert (SHIPPED / CARD_FILE).read_text() == text


def test_the_dense_model_can_be_served_through_them():
    """Every file the bridged server checks at startup (bridges against both models, fidelity
    against the bridges, the baseline against the catalogue, the bridges and the sites)."""
    from sparsecircuits.serve.launch import bridged_factory

    sd, dd = PRETRAINED_ROOT / "stdlib-sparse", PRETRAINED_ROOT / "stdlib-dense"
    f = bridged_factory(load_model(dd).eval(), dense_dir=dd, companion_dir=sd, bridge=SHIPPED,
                        catalog=sd / "monitor", policy=sd / "monitor" / "policy.yaml",
                        baseline=None)  # fmt: skip
    assert f.describe()["monitoring"] == "bridged"
