"""Packing a run into a few megabytes and resuming it elsewhere."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sparsecircuits.errors import CheckpointError, DataError
from sparsecircuits.model import load_model
from sparsecircuits.train.carry import pack_run, unpack_run
from sparsecircuits.train.checkpoint import list_checkpoints
from sparsecircuits.train.trainer import Trainer
from tests.data.conftest import write_py_files

from .conftest import tiny_config


@pytest.fixture(scope="module")
def halfway(small_corpus, cache_dir, tmp_path_factory):
    """A finished 12-step run, and a copy cut back to its step-8 checkpoint (as if killed)."""
    root = tmp_path_factory.mktemp("carry")
    cfg = tiny_config(
        small_corpus,
        steps=12,
        checkpoint_every=4,
        keep_checkpoints=3,
        snapshot_every=4,
        eval_every=4,
    )
    full = root / "full"
    Trainer(cfg, run_dir=full, device="cpu", cache_dir=cache_dir).run()
    cut = root / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "model")
    shutil.rmtree(cut / "checkpoints" / "step_00000012")
    shutil.rmtree(cut / "snapshots" / "step_00000012")
    return cfg, full, cut, root


def test_pack_keeps_weights_and_support_moments_exactly(halfway, cache_dir):
    cfg, _, cut, root = halfway
    summary = pack_run(cut, root / "packed")
    assert summary["step"] == 8
    moved = root / "moved"
    state = unpack_run(root / "packed", moved, cache_dir=cache_dir)
    assert state.step == 8 and state.tokens == 8 * cfg.tokens_per_step
    original = list_checkpoints(cut)[-1]
    restored = list_checkpoints(moved)
    assert [p.name for p in restored] == [original.name]
    a, b = load_model(original), load_model(restored[0])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name  # bigram table rebuilt from the data, bit for bit
    opt_a = torch.load(original / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(restored[0] / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    # The optimizer's order: matrices (decayed) first, then vectors (build_optimizer).
    params = [p for p in a.parameters() if p.dim() >= 2] + [
        p for p in a.parameters() if p.dim() < 2
    ]
    for i, p in enumerate(params):
        support = p.detach() != 0
        for key in ("exp_avg", "exp_avg_sq"):
            x, y = opt_a[i][key], opt_b[i][key]
            if support.float().mean() <= 0.25:  # packed sparse: moments kept on the support
                assert torch.equal(x[support], y[support])
                assert not y[~support].any()
            else:
                assert torch.equal(x, y)
        assert float(opt_a[i]["step"]) == float(opt_b[i]["step"])
    # The snapshot made before the cut travels too.
    snap_a = load_model(cut / "snapshots" / "step_00000004")
    snap_b = load_model(moved / "snapshots" / "step_00000004")
    for x, y in zip(snap_a.state_dict().values(), snap_b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_unpacked_run_resumes_to_the_end(halfway, cache_dir):
    cfg, full, cut, root = halfway
    pack_run(cut, root / "packed2")
    moved = root / "moved2"
    unpack_run(root / "packed2", moved, cache_dir=cache_dir)
    result = Trainer(cfg, run_dir=moved, device="cpu", cache_dir=cache_dir, resume=True).run()
    assert result.steps == 12
    reference = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    # Steps 9-12 regrow nothing (regrow_every 20, the anneal ended at step 6): only the
    # support's moments are read, and those travelled exactly, so the run is bit for bit.
    for a, b in zip(reference, resumed, strict=True):
        assert a["train_loss"] == b["train_loss"] and a.get("val_loss") == b.get("val_loss")
    x, y = load_model(full / "model"), load_model(moved / "model")
    for (name, p), (_, q) in zip(x.state_dict().items(), y.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


def test_unpack_refuses_other_data_and_non_empty_targets(halfway, cache_dir, tmp_path):
    _, _, cut, root = halfway
    pack_run(cut, root / "packed3")
    with pytest.raises(CheckpointError, match="not empty"):
        unpack_run(root / "packed3", cut, cache_dir=cache_dir)
    other = tmp_path / "other"
    write_py_files(other, 40)
    forged = tmp_path / "forged"
    shutil.copytree(root / "packed3", forged)
    config = json.loads((forged / "train_config.json").read_text())
    config["corpus"] = str(other)
    (forged / "train_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="changed since the run started"):
        unpack_run(forged, tmp_path / "x", cache_dir=cache_dir)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pack_run(tmp_path / "other", tmp_path / "y")
    # The failed unpack above left nothing that `train --resume` would restart from step 0.
    assert not (tmp_path / "x").exists()


def test_pack_never_replaces_the_run_or_a_foreign_directory(halfway, tmp_path):
    _, _, cut, root = halfway
    for target in (cut, cut / "inside", cut.parent):
        with pytest.raises(CheckpointError, match="outside the run"):
            pack_run(cut, target)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a packed run"):
        pack_run(cut, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert list_checkpoints(cut)  # the run is intact
    pack_run(cut, root / "again")
    pack_run(cut, root / "again")  # an earlier pack is replaced
