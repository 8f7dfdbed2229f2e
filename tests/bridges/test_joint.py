"""Joint training of a weight-sparse model with bridges (``bridge train``) on tiny models: the
loss falls; the sparse weights and the bridges train while the dense model stays frozen; the
L0 budgets hold; a killed run resumed equals an uninterrupted one; changed settings and pairs
the bridges cannot join are refused in one line; the batched hybrids equal the per-site ones;
two gloo processes match one; the command end to end, with ``bridge eval`` on its output."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.fit import load_bridges, load_meta
from sparsecircuits.bridges.joint import TERMS, JointConfig, joint_loss, joint_trainer
from sparsecircuits.bridges.losses import (
    hybrid_d2s,
    hybrid_s2d,
    hybrids_d2s,
    hybrids_s2d,
    kl,
    nmse,
    residuals,
)
from sparsecircuits.errors import ConfigError, InputError, SparseCircuitsError
from sparsecircuits.model import load_model
from sparsecircuits.model.io import read_sparsity, save_model, weights_hash
from sparsecircuits.model.sparsity import l0_budget, sparse_parameter_names
from sparsecircuits.train.trainer import Trainer
from tests.model.helpers import tiny_model, tokens
from tests.train.conftest import cache_dir, small_corpus, tiny_config  # noqa: F401

DENSE_SHAPE = dict(n_layer=2, d_model=48, n_head=2, d_head=16, block_size=32)  # != sparse width
STEPS = dict(steps=12, eval_every=6, checkpoint_every=6)  # the anneal ends at step 6
SHORT = dict(steps=4, eval_every=4, checkpoint_every=4)


@pytest.fixture(scope="module")
def dense_dir(small_corpus, cache_dir, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny dense model (L0 fraction 1) trained briefly on the small corpus."""
    run = tmp_path_factory.mktemp("dense") / "run"
    cfg = tiny_config(small_corpus, model=DENSE_SHAPE, sparsity=dict(target_l0=1.0), **SHORT)
    Trainer(cfg, run_dir=run, device="cpu", cache_dir=cache_dir).run()
    return run / "model"


@pytest.fixture(scope="module")
def trained(small_corpus, cache_dir, dense_dir, tmp_path_factory):  # noqa: F811
    run = tmp_path_factory.mktemp("joint") / "run"
    cfg = tiny_config(small_corpus, **STEPS)
    trainer = joint_trainer(cfg, JointConfig(), dense=dense_dir, run_dir=run, device="cpu",
                            cache_dir=cache_dir)  # fmt: skip
    result = trainer.run()
    return trainer, run, result


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _hashes(run: Path, dense: Path) -> dict[str, str]:
    return {"sparse": weights_hash(load_model(run)), "dense": weights_hash(load_model(dense))}


def test_the_joint_loss_falls_and_every_term_is_logged(trained):
    _, run, result = trained
    rec = _records(run)
    assert [r["step"] for r in rec] == list(range(1, 13))
    for key in (*TERMS, "train_loss"):
        assert all(r[key] >= 0 for r in rec), key
    first, last = rec[0]["train_loss"], sum(r["train_loss"] for r in rec[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    # all coefficients 1: the loss is the terms' sum
    assert rec[-1]["train_loss"] == pytest.approx(sum(rec[-1][k] for k in TERMS), rel=1e-5)
    assert result.steps == 12 and result.val_loss == rec[-1]["val_loss"]


def test_sparse_weights_and_bridges_train_the_dense_model_does_not(trained, tmp_path):
    trainer, run, _ = trained
    objective = trainer.objective
    initial, _ = Trainer(trainer.cfg, run_dir=tmp_path / "fresh", device="cpu",
                         cache_dir=trainer.cache_dir).build_model()  # fmt: skip
    final = load_model(run / "model")
    moved = [
        n for n, p in final.state_dict().items() if not torch.equal(p, initial.state_dict()[n])
    ]
    assert {n for n in sparse_parameter_names(final) if n.endswith(".weight")} <= set(moved)
    with torch.random.fork_rng(devices=[]):  # the bridges as JointObjective.bind makes them
        torch.manual_seed(trainer.cfg.seed)
        b0 = Bridges(n_layer=2, d_dense=48, d_sparse=32)
    b1 = load_bridges(run / "bridges", hashes=_hashes(run, _dense_of(run)))
    for name, p in b0.state_dict().items():
        assert not torch.equal(p, b1.state_dict()[name]), name
    dense_now = objective.dense.state_dict()
    for name, p in load_model(_dense_of(run)).state_dict().items():
        assert torch.equal(p, dense_now[name]), name
    assert not any(p.requires_grad for p in objective.dense.parameters())


def _dense_of(run: Path) -> Path:
    return Path(json.loads((run / "bridge_config.json").read_text())["dense"])


def test_every_sparse_matrix_is_at_its_exact_budget(trained):
    trainer, run, _ = trained
    model = load_model(run / "model")
    assert read_sparsity(run / "model")["target_l0"] == trainer.cfg.sparsity.target_l0
    params = dict(model.named_parameters())
    for name in sparse_parameter_names(model):
        p, budget = params[name], l0_budget(params[name].shape, trainer.cfg.sparsity.target_l0)
        if name.endswith("bias"):
            assert int((p != 0).sum()) <= budget  # zero-initialised biases may keep zeros
        else:
            assert int((p != 0).sum()) == budget < p.numel(), name


def test_checkpoints_and_the_run_hold_bridges_bound_to_their_models(trained):
    _, run, _ = trained
    for d in (run / "checkpoints" / "step_00000006", run / "checkpoints" / "step_00000012", run):
        b = load_bridges(d / "bridges", hashes=_hashes(d, _dense_of(run)))
        assert b.sites == ["0.resid_in", "0.resid_mid", "1.resid_in", "1.resid_mid",
                           "final_resid"]  # fmt: skip
    assert load_meta(run / "bridges").steps == 12
    assert load_meta(run / "bridges").config["mode"] == "joint"


def test_a_killed_run_resumed_equals_an_uninterrupted_one(trained, tmp_path):
    trainer, run, _ = trained
    dense, part = _dense_of(run), tmp_path / "part"

    def die(rec: dict) -> None:
        if rec["step"] == 8:  # after the checkpoint at step 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        joint_trainer(trainer.cfg, JointConfig(), dense=dense, run_dir=part, device="cpu",
                      cache_dir=trainer.cache_dir).run(on_record=die)  # fmt: skip
    assert not (part / "model").exists() and not (part / "bridges").exists()
    joint_trainer(trainer.cfg, JointConfig(), dense=dense, run_dir=part, device="cpu",
                  cache_dir=trainer.cache_dir, resume=True).run()  # fmt: skip
    a, b = load_model(run / "model").state_dict(), load_model(part / "model").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    hashes = _hashes(run, dense)
    ba = load_bridges(run / "bridges", hashes=hashes).state_dict()
    bb = load_bridges(part / "bridges", hashes=hashes).state_dict()
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    assert [r["train_loss"] for r in _records(run)] == [r["train_loss"] for r in _records(part)]


def test_changed_settings_on_resume_are_refused_in_one_line(trained, tmp_path):
    trainer, run, _ = trained
    dense = _dense_of(run)
    kw = dict(run_dir=run, device="cpu", cache_dir=trainer.cache_dir, resume=True)
    with pytest.raises(ConfigError, match=r"coef_kl \(was 1.0, now 0.5\)") as err:
        joint_trainer(trainer.cfg, JointConfig(coef_kl=0.5), dense=dense, **kw)
    assert "\n" not in str(err.value)
    other = tmp_path / "other"  # the same shape and tokenizer, other weights
    m = load_model(dense)
    with torch.no_grad():
        m.lm_head.weight.mul_(2.0)
    save_model(m, other)
    shutil.copyfile(dense / "tokenizer.json", other / "tokenizer.json")
    with pytest.raises(ConfigError, match="another dense model") as err:
        joint_trainer(trainer.cfg, JointConfig(), dense=other, **kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["layers", "vocab", "tokenizer", "context"])
def test_a_pair_the_bridges_cannot_join_is_refused_in_one_line(case, small_corpus, cache_dir,  # noqa: F811
                                                              dense_dir, tmp_path):  # fmt: skip
    cfg, dense = tiny_config(small_corpus, **STEPS), dense_dir
    if case == "layers":
        cfg = cfg.replace(model=cfg.model.replace(n_layer=3))
    elif case == "vocab":  # a dense model whose vocabulary is not its tokenizer's
        dense = tmp_path / "dense400"
        save_model(type(load_model(dense_dir))(load_model(dense_dir).config.replace(
            vocab_size=400)), dense)  # fmt: skip
        shutil.copyfile(dense_dir / "tokenizer.json", dense / "tokenizer.json")
    elif case == "tokenizer":
        cfg = cfg.replace(tokenizer="stdlib-sparse")
    else:
        cfg = cfg.replace(model=cfg.model.replace(block_size=64))
    expect = {"layers": "one layer count", "vocab": "one vocabulary",
              "tokenizer": "not the dense model's", "context": "context"}[case]  # fmt: skip
    with pytest.raises(InputError, match=expect) as err:
        joint_trainer(cfg, JointConfig(), dense=dense, run_dir=tmp_path / "run", device="cpu",
                      cache_dir=cache_dir)  # fmt: skip
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("k", [None, 12])
def test_batched_hybrids_and_the_joint_loss_equal_the_per_site_ones(k):
    sparse = tiny_model(0, afrac=0.5, afrac_loctypes="resid_post_attn,mlp_neuron").train()
    dense = tiny_model(1, d_model=40)
    torch.manual_seed(0)
    bridges = Bridges(n_layer=2, d_dense=40, d_sparse=48, k=k)
    x, y = tokens(batch=3, seq=10), tokens(batch=3, seq=10, seed=1)
    _, hd = residuals(dense, x, bridges.sites)
    _, hs = residuals(sparse, x, bridges.sites)
    d2s, s2d = hybrids_d2s(sparse, bridges, hd, x), hybrids_s2d(dense, bridges, hs, x)
    for i, site in enumerate(bridges.sites):
        torch.testing.assert_close(d2s[i], hybrid_d2s(sparse, bridges, site, hd[site], x))
        torch.testing.assert_close(s2d[i], hybrid_s2d(dense, bridges, site, hs[site], x))
    cfg = JointConfig(coef_lm=0.7, coef_nmse=0.3, coef_kl=1.3, k=k)
    params = [*sparse.parameters(), *bridges.parameters()]
    got = joint_loss(sparse, dense, bridges, x, y, cfg)[0]
    g_got = torch.autograd.grad(got, params)
    # the same objective from the per-site functions, one pass per hybrid
    with torch.no_grad():
        dl, hd = residuals(dense, x, bridges.sites)
    _, hs = residuals(sparse, x, bridges.sites)
    want = 0.7 * sparse(x, y)[1]
    for site in bridges.sites:
        b = bridges[site]
        want = want + 0.3 * (nmse(b.encode(hd[site]), hs[site].detach())
                             + nmse(b.decode(hs[site]), hd[site]))  # fmt: skip
        want = want + 1.3 * (kl(dl, hybrid_d2s(sparse, bridges, site, hd[site], x))
                             + kl(dl, hybrid_s2d(dense, bridges, site, hs[site], x)))  # fmt: skip
    g_want = torch.autograd.grad(want, params)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, cfg_json: str, dense: str, run: str, cache: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then a joint run."""
    from sparsecircuits.train.config import TrainConfig
    from sparsecircuits.train.distributed import shutdown

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    cfg = TrainConfig.model_validate_json(cfg_json)
    trainer = joint_trainer(cfg, JointConfig(coef_nmse=0.0), dense=dense, run_dir=run,
                            device="cpu", cache_dir=cache)  # fmt: skip
    try:
        trainer.run()
    finally:
        shutdown(trainer.dist)


def test_two_gloo_processes_match_one(small_corpus, cache_dir, dense_dir, tmp_path):  # noqa: F811
    # float32 regrowth over every token (as tests/train's torchrun test); no NMSE terms: their
    # denominator is each rank's own batch spread, so two half batches differ from one whole
    sparsity = dict(target_l0=1 / 8, anneal_end=0.5, regrow_precision="fp32", regrow_tokens=1.0)
    cfg = tiny_config(small_corpus, steps=6, eval_every=6, checkpoint_every=6, sparsity=sparsity)
    one, two = tmp_path / "one", tmp_path / "two"
    joint_trainer(cfg, JointConfig(coef_nmse=0.0), dense=dense_dir, run_dir=one, device="cpu",
                  cache_dir=cache_dir).run()  # fmt: skip
    args = (_free_port(), cfg.model_dump_json(), str(dense_dir), str(two), str(cache_dir))
    mp.spawn(_rank, args=args, nprocs=2, join=True)
    ma, mb = _records(one), _records(two)
    assert [r["step"] for r in mb] == list(range(1, 7))
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("train_loss", "lm_loss", "kl_d2s", "kl_s2d"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (rb["step"], key)
    hashes = {"dense": weights_hash(load_model(dense_dir))}
    ba = load_bridges(one / "bridges", hashes=hashes).state_dict()
    bb = load_bridges(two / "bridges", hashes=hashes).state_dict()
    for name in ba:
        torch.testing.assert_close(bb[name], ba[name], rtol=1e-3, atol=1e-5)


def _cli():
    from sparsecircuits.cli import app

    return app


def test_the_command_end_to_end_then_bridge_eval(small_corpus, cache_dir, dense_dir, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    cfg_file, run = tmp_path / "cfg.json", tmp_path / "run"
    cfg_file.write_text(tiny_config(small_corpus, **SHORT).model_dump_json())
    base = ["bridge", "train", "--dense", str(dense_dir), "--out", str(run), "--cache-dir",
            str(cache_dir), "--device", "cpu"]  # fmt: skip
    app = _cli()
    r = CliRunner().invoke(app, [*base, "--config", str(cfg_file), "--coef-nmse", "0.5"])
    assert r.exit_code == 0, r.output
    assert "bridges to" in r.output and load_meta(run / "bridges").config["coef_nmse"] == 0.5
    ev = ["bridge", "eval", str(run / "bridges"), "--sparse", str(run), "--dense", str(dense_dir)]
    r = CliRunner().invoke(app, [*ev, "--windows", "2", "--seq-len", "16"])
    assert r.exit_code == 0, r.output
    assert "final_resid" in r.output and (run / "bridges" / "fidelity.json").exists()
    r = CliRunner().invoke(app, [*base, "--resume", "--coef-kl", "0.5"])
    assert isinstance(r.exception, ConfigError) and "coef_kl" in str(r.exception)
    r = CliRunner().invoke(app, [*base, "--resume", "--steps", "20"])
    assert isinstance(r.exception, SparseCircuitsError) and "drop other" in str(r.exception)
    r = CliRunner().invoke(app, [*base, "--resume"])  # the run's own settings: a no-op
    assert r.exit_code == 0, r.output
    assert load_meta(run / "bridges").config["coef_nmse"] == 0.5
