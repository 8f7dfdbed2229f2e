import json
import math
import shutil

import pytest
import torch

from sparsecircuits.errors import ConfigError, DataError
from sparsecircuits.model import load_model
from sparsecircuits.model.io import read_sparsity
from sparsecircuits.model.sparsity import l0_budget, sparse_parameter_names
from sparsecircuits.train.checkpoint import list_checkpoints
from sparsecircuits.train.trainer import Trainer

from .conftest import tiny_config


@pytest.fixture(scope="module")
def trained(small_corpus, cache_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "tiny"
    cfg = tiny_config(small_corpus)
    result = Trainer(cfg, run_dir=run, device="cpu", cache_dir=cache_dir).run()
    return cfg, run, result


def test_training_reduces_loss_and_reports_validation(trained):
    cfg, run, result = trained
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, cfg.steps + 1))
    for key in ("tokens", "train_loss", "lr", "l0_frac", "tokens_per_s", "grad_rms"):
        assert key in records[0]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert set(evals[0]["l0"]) == set(sparse_parameter_names(load_model(run / "model")))
    assert len(evals[0]["dead_neurons"]) == cfg.model.n_layer
    assert math.isfinite(result.val_loss)
    assert result.val_loss == evals[-1]["val_loss"]
    # better than a uniform guess over the vocabulary, and better than at the start
    assert result.val_loss < math.log(320)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result.tokens == cfg.steps * cfg.batch_size * cfg.model.block_size


def test_every_sparse_matrix_has_exactly_its_budget(trained):
    cfg, run, _ = trained
    model = load_model(run / "model")
    sp = read_sparsity(run / "model")
    assert sp["target_l0"] == cfg.sparsity.target_l0
    params = dict(model.named_parameters())
    for name in sparse_parameter_names(model):
        p = params[name]
        budget = l0_budget(p.shape, cfg.sparsity.target_l0)
        nz = int((p != 0).sum())
        if name.endswith("bias"):
            assert nz <= budget  # zero-initialised biases may keep exact zeros
            continue
        assert nz == budget, name
        assert budget < p.numel()
        if p.dim() == 2:
            assert int((p != 0).sum(dim=1).min()) >= min(4, p.shape[1]), name


def test_final_model_and_checkpoints_are_loadable(trained):
    _cfg, run, _ = trained
    ckpts = list_checkpoints(run)
    assert [c.name for c in ckpts] == ["step_00000016", "step_00000024"]  # keep 2
    final = load_model(run / "model")
    last = load_model(ckpts[-1])
    for (n, a), (_, b) in zip(final.state_dict().items(), last.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert (run / "model" / "tokenizer.json").exists()


def test_existing_run_is_never_overwritten(trained):
    cfg, run, _ = trained
    before = (run / "model" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg, run_dir=run, device="cpu")
    changed = cfg.replace(steps=cfg.steps + 1)
    with pytest.raises(ConfigError, match="different config"):
        Trainer(changed, run_dir=run, device="cpu", resume=True)
    assert (run / "model" / "model.safetensors").read_bytes() == before


def test_resume_of_finished_run_is_a_no_op(trained, cache_dir):
    cfg, run, result = trained
    again = Trainer(cfg, run_dir=run, device="cpu", cache_dir=cache_dir, resume=True).run()
    assert again.steps == cfg.steps
    assert again.val_loss == result.val_loss


def test_in_process_resume_matches_uninterrupted(small_corpus, cache_dir, tmp_path, trained):
    cfg, run, _ = trained
    # Stop at step 16 by training a config whose schedule is identical but which we cut short:
    # copy the step-16 checkpoint into a fresh run and resume from there.
    import shutil

    part = tmp_path / "part"
    part.mkdir()
    shutil.copyfile(run / "train_config.json", part / "train_config.json")
    shutil.copyfile(run / "tokenizer.json", part / "tokenizer.json")
    shutil.copytree(run / "checkpoints" / "step_00000016", part / "checkpoints" / "step_00000016")
    stale = part / "checkpoints" / ".tmp-step_00000017-x"  # as a kill mid-checkpoint leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    Trainer(cfg, run_dir=part, device="cpu", cache_dir=cache_dir, resume=True).run()
    assert not stale.exists()
    a, b = load_model(run / "model").state_dict(), load_model(part / "model").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_empty_corpus_is_a_clear_error(tmp_path, cache_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(empty)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"no \.py files") as info:
        Trainer(cfg, run_dir=out, device="cpu", cache_dir=cache_dir).run()
    assert "\n" not in str(info.value)
    assert str(empty) in str(info.value)


def test_batch_must_split_over_processes(small_corpus):
    with pytest.raises(ConfigError, match="batch_size"):
        tiny_config(small_corpus, batch_size=0)


def test_fresh_run_refuses_leftovers_of_an_earlier_run(small_corpus, tmp_path):
    cfg = tiny_config(small_corpus)
    for leftover in ("checkpoints", "tokenizer.json", "metrics.jsonl"):
        run = tmp_path / leftover.replace(".", "_")
        run.mkdir()
        target = run / leftover
        target.mkdir() if leftover == "checkpoints" else target.write_text("{}")
        with pytest.raises(ConfigError, match=leftover):
            Trainer(cfg, run_dir=run, device="cpu")


def test_bad_values_fail_before_anything_is_written(small_corpus, tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="lr must be > 0"):
        tiny_config(small_corpus, optim=dict(lr=-1.0))
    with pytest.raises(ConfigError, match="multiple of log_every"):
        tiny_config(small_corpus, log_every=3, checkpoint_every=8)
    with pytest.raises(ConfigError, match=r"CUDA is not available|not a device"):
        Trainer(tiny_config(small_corpus), run_dir=tmp_path / "r", device="nonsense")
    # a context longer than the validation split: refused before the run directory is made
    long_ctx = tiny_config(
        small_corpus, model=dict(n_layer=1, d_model=32, n_head=2, d_head=16, block_size=65536)
    )
    out = tmp_path / "long"
    with pytest.raises(DataError, match="fewer than one window"):
        Trainer(long_ctx, run_dir=out, device="cpu", cache_dir=cache_dir).run()
    assert not out.exists()


def test_resume_falls_back_past_a_corrupt_checkpoint(trained, cache_dir, tmp_path):
    import shutil

    cfg, run, _ = trained
    part = tmp_path / "part"
    shutil.copytree(run, part)
    shutil.rmtree(part / "model")
    newest = part / "checkpoints" / "step_00000024"
    (newest / "optimizer.pt").write_bytes(b"")  # e.g. after an OS crash
    Trainer(cfg, run_dir=part, device="cpu", cache_dir=cache_dir, resume=True).run()
    a, b = load_model(run / "model").state_dict(), load_model(part / "model").state_dict()
    for name in a:  # resumed from step 16 and retrained 17..24 identically
        assert torch.equal(a[name], b[name]), name


def test_resume_of_a_finished_run_without_checkpoints_refuses(trained, tmp_path):
    import shutil

    from sparsecircuits.errors import CheckpointError

    cfg, run, _ = trained
    part = tmp_path / "done"
    shutil.copytree(run, part)
    shutil.rmtree(part / "checkpoints")
    before = (part / "model" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(cfg, run_dir=part, device="cpu", resume=True).run()
    assert (part / "model" / "model.safetensors").read_bytes() == before


def test_resume_refuses_changed_data(trained, tmp_path):
    import json as _json
    import shutil

    cfg, run, _ = trained
    part = tmp_path / "changed"
    shutil.copytree(run, part)
    data = _json.loads((part / "data.json").read_text())
    assert data["train_tokens"] > 0 and data["corpus"] == cfg.corpus
    data["corpus_fingerprint"] = "0" * 64
    (part / "data.json").write_text(_json.dumps(data))
    with pytest.raises(DataError, match="changed since the run started"):
        Trainer(cfg, run_dir=part, device="cpu", resume=True).run()


def test_tokenizer_may_be_named_by_a_shipped_model(small_corpus, cache_dir, tmp_path):
    from sparsecircuits.data import Tokenizer
    from sparsecircuits.model.io import resolve_model_dir

    shipped = Tokenizer.load(resolve_model_dir("stdlib-sparse"))
    cfg = tiny_config(small_corpus, tokenizer="stdlib-sparse", steps=2, eval_every=2)
    run = tmp_path / "run"
    Trainer(cfg, run_dir=run, device="cpu", cache_dir=cache_dir).run()
    assert Tokenizer.load(run).fingerprint() == shipped.fingerprint()
    bad = tiny_config(small_corpus, tokenizer="no-such-model", steps=2, eval_every=2)
    with pytest.raises(Exception, match="no-such-model: no such model directory"):
        Trainer(bad, run_dir=tmp_path / "bad", device="cpu", cache_dir=cache_dir).run()


def _names(run):
    return [p.name for p in list_checkpoints(run)]


def test_checkpoint_minutes_adds_time_based_checkpoints(small_corpus, cache_dir, tmp_path):
    kw = dict(steps=6, log_every=2, eval_every=6, checkpoint_every=100, keep_checkpoints=5)
    exact = dict(sparsity=dict(target_l0=1 / 8, anneal_end=0.5, weight_grad="exact"))
    plain = tmp_path / "plain"
    Trainer(tiny_config(small_corpus, **kw, **exact), run_dir=plain, cache_dir=cache_dir).run()
    assert _names(plain) == ["step_00000006"]
    timed = tmp_path / "timed"
    cfg = tiny_config(small_corpus, checkpoint_minutes=1e-9, **kw, **exact)
    Trainer(cfg, run_dir=timed, cache_dir=cache_dir).run()
    # Due at every log step, never between them.
    assert _names(timed) == ["step_00000002", "step_00000004", "step_00000006"]
    slow = tmp_path / "slow"
    cfg = tiny_config(small_corpus, checkpoint_minutes=60, **kw, **exact)
    Trainer(cfg, run_dir=slow, cache_dir=cache_dir).run()
    assert _names(slow) == ["step_00000006"]  # minutes, not seconds: none due
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        tiny_config(small_corpus, checkpoint_minutes=0)


def test_time_based_checkpoints_leave_the_fast_mode_run_unchanged(
    small_corpus, cache_dir, tmp_path
):
    kw = dict(steps=12, log_every=2, eval_every=12, checkpoint_every=100, keep_checkpoints=9)
    fast = dict(sparsity=dict(target_l0=1 / 8, anneal_end=0.25, regrow_every=4))
    plain, timed = tmp_path / "plain", tmp_path / "timed"
    Trainer(tiny_config(small_corpus, **kw, **fast), run_dir=plain, cache_dir=cache_dir).run()
    cfg = tiny_config(small_corpus, checkpoint_minutes=1e-9, **kw, **fast)
    Trainer(cfg, run_dir=timed, cache_dir=cache_dir).run()
    # Only at log steps that a regrowth step follows (4 and 8; the anneal's steps 1-2 too).
    assert _names(timed) == [f"step_{s:08d}" for s in (2, 4, 8, 12)]
    a, b = load_model(plain / "model"), load_model(timed / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_snapshots_are_kept_compact_and_loadable(small_corpus, cache_dir, tmp_path):
    cfg = tiny_config(small_corpus, steps=8, snapshot_every=4, keep_checkpoints=1)
    run = tmp_path / "run"
    Trainer(cfg, run_dir=run, cache_dir=cache_dir).run()
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["step_00000004", "step_00000008"]
    final = load_model(run / "model")
    last = load_model(run / "snapshots" / "step_00000008")
    pairs = zip(final.state_dict().items(), last.state_dict().items(), strict=True)
    for (name, a), (_, b) in pairs:
        assert torch.equal(a, b), name
    early = load_model(run / "snapshots" / "step_00000004")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(early.state_dict().values(), final.state_dict().values(), strict=True)
    )
    # A fresh run refuses a directory that holds snapshots of an earlier one.
    shutil.rmtree(run / "model")
    for name in ("checkpoints", "metrics.jsonl", "train_config.json", "tokenizer.json"):
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (run / "data.json").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="snapshots"):
        Trainer(cfg, run_dir=run, cache_dir=cache_dir).run()
