"""The bridges card is written from the directory's own files and refuses numbers measured on
other bridges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsecircuits.bridges.card import card_text
from sparsecircuits.bridges.evaluate import FIDELITY_FILE, fidelity, format_table
from sparsecircuits.bridges.fit import FitConfig, fit, load_bridges, load_meta
from sparsecircuits.errors import InputError
from tests.bridges.test_fit import HASHES, Windows
from tests.model.helpers import tiny_model, tokens


@pytest.fixture
def bridges_dir(tmp_path: Path) -> Path:
    s, d = tiny_model(0), tiny_model(1)
    cfg = FitConfig(steps=2, batch=2, seq_len=8, init_tokens=64)
    fit(s, d, Windows(s.config.vocab_size), tmp_path, cfg, hashes=HASHES)
    doc = fidelity(s, d, load_bridges(tmp_path, hashes=HASHES), tokens(batch=2, seq=8))
    doc["weights_sha256"] = load_meta(tmp_path).weights_sha256
    (tmp_path / FIDELITY_FILE).write_text(json.dumps(doc))
    return tmp_path


def test_the_card_carries_the_fidelity_table_and_the_commands(bridges_dir: Path):
    text = card_text(bridges_dir, name="tiny-bridges", sparse="S", dense="D")
    fid = json.loads((bridges_dir / FIDELITY_FILE).read_text())
    assert format_table(fid) in text
    assert "sparsecircuits bridge fit --out DIR --sparse S --dense D --steps 2" in text
    assert "--init lstsq" in text and load_meta(bridges_dir).weights_sha256 in text


def test_numbers_of_other_bridges_are_refused(bridges_dir: Path):
    fid = json.loads((bridges_dir / FIDELITY_FILE).read_text())
    (bridges_dir / FIDELITY_FILE).write_text(json.dumps({**fid, "weights_sha256": "0" * 64}))
    with pytest.raises(InputError, match="measured other bridges"):
        card_text(bridges_dir, name="x", sparse="S", dense="D")
    (bridges_dir / FIDELITY_FILE).write_text(json.dumps(fid))
    (bridges_dir / "steering").mkdir()
    (bridges_dir / "steering" / "t.json").write_text(json.dumps({"bridges_sha256": "0" * 64}))
    with pytest.raises(InputError, match="other bridges"):
        card_text(bridges_dir, name="x", sparse="S", dense="D")
