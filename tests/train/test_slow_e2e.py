"""End-to-end runs in subprocesses: kill -9 and resume, and torchrun data parallelism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsecircuits.model import load_model
from sparsecircuits.train.checkpoint import list_checkpoints

from .conftest import tiny_config

pytestmark = pytest.mark.slow


def _train_cmd(cfg_file: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sparsecircuits.cli",
        "train",
        "--config",
        str(cfg_file),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--device",
        "cpu",
        *extra,
    ]


def _env() -> dict[str, str]:
    # Same thread count in every process so CPU arithmetic is bit-identical across runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _write_cfg(path: Path, cfg) -> Path:
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return path


def test_kill_9_then_resume_equals_uninterrupted(small_corpus, cache_dir, tmp_path):
    cfg = tiny_config(
        small_corpus,
        steps=400,
        checkpoint_every=20,
        eval_every=100,
        log_every=10,
        model=dict(n_layer=2, d_model=64, n_head=4, d_head=16, block_size=32),
    )
    cfg_file = _write_cfg(tmp_path / "cfg.json", cfg)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(
        _train_cmd(cfg_file, full, cache_dir), check=True, env=_env(), capture_output=True
    )

    proc = subprocess.Popen(
        _train_cmd(cfg_file, killed, cache_dir),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(killed)) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    ckpts = list_checkpoints(killed)
    assert ckpts, "no checkpoint was written before the kill"
    for c in ckpts:  # every checkpoint visible after a kill is complete and loadable
        load_model(c)
    assert ckpts[-1].name < "step_00000400"

    subprocess.run(
        _train_cmd(cfg_file, killed, cache_dir, "--resume"),
        check=True,
        env=_env(),
        capture_output=True,
    )
    a = load_model(full / "model").state_dict()
    b = load_model(killed / "model").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the metrics log has each step once and matches the uninterrupted run
    ma = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    assert [r["train_loss"] for r in ma] == [r["train_loss"] for r in mb]


def test_torchrun_two_processes_matches_one(small_corpus, cache_dir, tmp_path):
    # float32 regrowth products: bfloat16 ones round each rank's half-batch gradient apart
    # from the whole batch's (~3e-3), which may change a top-k choice; this test is about
    # the gradient averaging, which must match to float32 rounding; every token in the
    # regrowth products too (a share is taken per rank: other sequences than one process's)
    sparsity = dict(target_l0=1 / 8, anneal_end=0.5, regrow_precision="fp32", regrow_tokens=1.0)
    cfg = tiny_config(small_corpus, steps=12, eval_every=6, checkpoint_every=6, sparsity=sparsity)
    cfg_file = _write_cfg(tmp_path / "cfg.json", cfg)
    one, two = tmp_path / "one", tmp_path / "two"
    # the CSR kernels for every layer, so that the support steps after the anneal average
    # sparse weight gradients across the ranks
    env = {**_env(), "SPARSECIRCUITS_SPARSE_BELOW": "1.01"}
    subprocess.run(_train_cmd(cfg_file, one, cache_dir), check=True, env=env, capture_output=True)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sparsecircuits.cli",
    ]
    cmd = torchrun + _train_cmd(cfg_file, two, cache_dir)[3:]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ma = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, 13))
    for ra, rb in zip(ma, mb, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4, abs=1e-5)
    assert mb[-1]["val_loss"] == pytest.approx(ma[-1]["val_loss"], rel=1e-4)
