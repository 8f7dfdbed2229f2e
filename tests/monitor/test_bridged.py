"""Monitoring a dense model through bridges (``monitor/bridged.py``), on the planted model used
as both the "dense" model and its companion: an identity bridge makes the bridged scores the
direct ones (the wiring, across the KV cache and the sliding window), every score and decision
carries its site's fidelity, files that do not belong together are refused in one line, the
site rule, and a flag that needs the bridge's real weights to fire."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsecircuits.bridges.bridge import Bridges, bridge_sites
from sparsecircuits.bridges.evaluate import fidelity
from sparsecircuits.bridges.fit import _save, load_meta
from sparsecircuits.errors import ConfigError
from sparsecircuits.interop.download import file_sha256
from sparsecircuits.monitor.bridged import (
    FIDELITY_FILE,
    BridgedMonitorFactory,
    bridge_site,
    calibrate_bridged,
    load_fidelity,
)
from sparsecircuits.monitor.calibrate import calibrate, save_baseline
from sparsecircuits.monitor.catalog import CATALOG_FILE, CatalogDoc
from sparsecircuits.monitor.live import CircuitMonitorFactory
from sparsecircuits.monitor.policy import load_policy
from sparsecircuits.serve.engine import SamplingOptions, generate
from sparsecircuits.serve.launch import bridged_factory


def identity(planted) -> Bridges:
    c = planted.model.config
    return Bridges(n_layer=c.n_layer, d_dense=c.d_model, d_sparse=c.d_model).set_identity()


def write_bridges(directory: Path, bridges: Bridges, planted) -> str:
    """Bridges as ``bridge fit`` writes them, and a fidelity.json naming them whose numbers
    differ per site (so a test sees which site's row a score carries). Returns their sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "sparsecircuits.bridges", "format_version": 1, "sites": bridges.sites,
            "d_dense": bridges.d_dense, "d_sparse": bridges.d_sparse, "k": bridges.k,
            "hashes": {"sparse": planted.hash, "dense": planted.hash}}  # fmt: skip
    _save(directory, bridges, meta)  # as `bridge fit` writes them
    sha = load_meta(directory).weights_sha256
    rows = [{"site": s, "enc_nmse": 0.01 * (i + 1), "dec_nmse": 0.02 * (i + 1),
             "kl_d2s": 0.1 * (i + 1), "kl_s2d": 0.2, "agree_d2s": 0.9 - 0.01 * i,
             "agree_s2d": 0.8} for i, s in enumerate(bridges.sites)]  # fmt: skip
    doc = {"windows": 2, "seq_len": 8, "sites": rows, "sparse_alone": {"kl": 1.0, "agree": 0.5},
           "weights_sha256": sha}  # fmt: skip
    (directory / FIDELITY_FILE).write_text(json.dumps(doc))
    return sha


def with_late_family(catalog: CatalogDoc) -> CatalogDoc:
    """The catalogue plus a family holding only the quotes family's layer-1 MLP nodes: it
    crosses at 1.resid_mid while quotes crosses at 0.resid_in, and both read 1.mlp.post_act."""
    q = catalog.families["quotes"]
    keep = [s for s in q.nodes if s.startswith("1.mlp.")]
    pick = lambda d: {s: d[s] for s in keep}  # noqa: E731
    late = q.model_copy(update={"nodes": pick(q.nodes), "scale": pick(q.scale),
                                "mean": pick(q.mean),
                                "n_nodes": sum(len(q.nodes[s]) for s in keep)})  # fmt: skip
    return catalog.model_copy(update={"families": {**catalog.families, "late": late}})


def policy_file(tmp_path: Path, rules: str, extra: str = "") -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(f"version: 1\n{extra}rules:\n{rules}")
    return p


@pytest.fixture(scope="module")
def bridged(planted, catalog, catalog_dir, tmp_path_factory):
    """Identity bridges on disk with their fidelity, and a baseline calibrated through them."""
    d = tmp_path_factory.mktemp("bridges")
    b = identity(planted)
    sha = write_bridges(d, b, planted)
    base = calibrate_bridged(planted.model, planted.model, b, planted.tokenizer, catalog,
                             catalog_sha256=file_sha256(catalog_dir / CATALOG_FILE),
                             bridges_sha256=sha, dense_hash=planted.hash, windows=3)  # fmt: skip
    save_baseline(base, d)
    return d, b, sha, base


def factory(planted, catalog, base, policy, bridges, sha, d) -> BridgedMonitorFactory:
    return BridgedMonitorFactory(
        planted.model, planted.model, bridges, catalog, base, policy,
        fidelity=load_fidelity(d, weights_sha256=sha),
        hashes={"sparse": planted.hash, "dense": planted.hash}, bridges_sha256=sha,
        companion_name="planted",
    )  # fmt: skip


def run(planted, f, prompt: list[int], n: int):
    mon = f.start("r")
    opts = SamplingOptions(max_tokens=n, temperature=0)
    last = list(generate(planted.model, planted.tokenizer, prompt, mon, options=opts))[-1]
    return last.decision, mon.telemetry()


def test_site_rule_latest_bridge_site_at_or_before_the_earliest_node():
    sites = bridge_sites(2)
    assert bridge_site(["0.attn.k", "1.mlp.post_act"], sites, 2) == "0.resid_in"
    assert bridge_site(["0.mlp.act_in", "1.attn.q"], sites, 2) == "0.resid_mid"
    assert bridge_site(["1.attn.v"], sites, 2) == "1.resid_in"
    assert bridge_site(["1.mlp.resid_delta", "1.mlp.post_act"], sites, 2) == "1.resid_mid"
    assert bridge_site(["1.attn.resid_delta"], sites, 2) == "1.resid_in"  # before resid_mid
    assert bridge_site(["1.resid_mid"], sites, 2) == "1.resid_mid"  # at the site itself
    with pytest.raises(ConfigError, match="not a site"):
        bridge_site(["7.mlp.post_act"], sites, 2)


def test_an_identity_bridge_gives_the_direct_scores(planted, catalog, tmp_path):
    """Same model as dense and companion, identity bridges: the bridged baseline and every
    per-token score equal direct monitoring's, for a family crossing at 0.resid_in and one at
    1.resid_mid, through the prompt, the KV-cached tokens and the window sliding past the
    context (120 + 14 > 128 tokens)."""
    cat = with_late_family(catalog)
    b = identity(planted)
    d = tmp_path / "b"
    sha = write_bridges(d, b, planted)
    plain = calibrate(planted.model, planted.tokenizer, cat, catalog_sha256="c", windows=2)
    base = calibrate_bridged(planted.model, planted.model, b, planted.tokenizer, cat,
                             catalog_sha256="c", bridges_sha256=sha, dense_hash=planted.hash,
                             windows=2)  # fmt: skip
    for name in ("quotes", "late"):
        p, q = plain.families[name], base.families[name]
        assert (q.median, q.mad, q.p99) == pytest.approx((p.median, p.mad, p.p99), abs=1e-5)
    rules = ("  - {family: quotes, action: log, z: 3, k: 1, n: 1}\n"
             "  - {family: late, action: review, z: 2, k: 2, n: 3}\n")  # fmt: skip
    pol = load_policy(policy_file(tmp_path, rules), families=cat.monitored())
    bf = factory(planted, cat, base, pol, b, sha, d)
    assert bf.path.site_of == {"quotes": "0.resid_in", "late": "1.resid_mid"}
    prompt = planted.tokenizer.encode("x = 'abc'\n" * 40)[:120]
    d1, direct = run(planted, CircuitMonitorFactory(planted.model, cat, plain, pol), prompt, 14)
    d2, via = run(planted, bf, prompt, 14)
    assert via["n_generated_tokens"] == direct["n_generated_tokens"] == 14
    assert len(prompt) + 14 > planted.model.config.block_size  # the window slid
    for name in ("quotes", "late"):
        got, want = via["families"][name], direct["families"][name]
        assert got["engagement"] == pytest.approx(want["engagement"], abs=2e-4), name
        assert got["z"] == pytest.approx(want["z"], abs=2e-3), name
        assert got["flags"] == want["flags"] and any(got["flags"].values()), name
    assert {k: v for k, v in d2.to_json().items() if k != "bridge"} == d1.to_json()


def test_every_score_and_decision_carries_its_site_and_fidelity(planted, catalog, bridged,
                                                                tmp_path):  # fmt: skip
    d, b, sha, base = bridged
    pol = load_policy(policy_file(tmp_path, "  - {family: quotes, action: log, z: 3, k: 1, "
                                  "n: 1}\n"), families=catalog.monitored())  # fmt: skip
    f = factory(planted, catalog, base, pol, b, sha, d)
    decision, tel = run(planted, f, planted.tokenizer.encode("x = 'abc"), 3)
    row = json.loads((d / FIDELITY_FILE).read_text())["sites"][0]  # 0.resid_in
    want = {"site": "0.resid_in", **{k: row[k] for k in ("enc_nmse", "dec_nmse", "kl_d2s",
                                                         "agree_d2s")}}  # fmt: skip
    assert tel["families"]["quotes"]["bridge"] == want
    assert all("bridge" in rec for rec in tel["families"].values())
    assert decision.action.value == "log" and decision.to_json()["bridge"] == want
    assert tel["decision"]["bridge"] == want
    assert tel["monitoring"] == {"mode": "bridged", "companion": "planted",
                                 "companion_weights_hash": planted.hash,
                                 "dense_weights_hash": planted.hash,
                                 "bridges_sha256": sha}  # fmt: skip
    desc = f.describe()
    assert desc["monitoring"] == "bridged" and desc["bridge"]["bridges_sha256"] == sha
    assert desc["bridge_sites"] == {"quotes": want}
    json.dumps(tel)


def test_a_flag_needs_the_bridge_weights(planted, catalog, bridged, tmp_path):
    """The planted quote drives the family far past z 10 through the identity bridge; with
    the encoders zeroed (bridges corrupted after calibration) the same input flags nothing."""
    d, b, sha, base = bridged
    pol = load_policy(policy_file(tmp_path, "  - {family: quotes, action: block, z: 10, k: 1, "
                                  "n: 1}\n"), families=catalog.monitored())  # fmt: skip
    prompt = planted.tokenizer.encode("x = 'abc")
    decision, _ = run(planted, factory(planted, catalog, base, pol, b, sha, d), prompt, 2)
    assert decision.action.value == "block" and decision.at_token == -1
    zeroed = identity(planted)
    with torch.no_grad():
        for site in zeroed.by_site:
            site.enc.weight.zero_()
    decision, tel = run(planted, factory(planted, catalog, base, pol, zeroed, sha, d), prompt, 2)
    assert decision.action.value == "allow"
    assert max(tel["families"]["quotes"]["z"]) < 10


def test_what_bridge_eval_writes_is_read(planted, tmp_path):
    """``bridges/evaluate.py``'s document, as ``bridge eval`` stores it, loads by site (an
    identity bridge: no error, full agreement)."""
    b = identity(planted)
    sha = write_bridges(tmp_path, b, planted)
    doc = fidelity(planted.model, planted.model, b, torch.randint(0, 50, (2, 8)))
    (tmp_path / FIDELITY_FILE).write_text(json.dumps({**doc, "weights_sha256": sha}))
    rows = load_fidelity(tmp_path, weights_sha256=sha)
    assert list(rows) == b.sites
    ev = rows["1.resid_mid"].evidence()
    assert ev["enc_nmse"] == 0.0 and ev["agree_d2s"] == 1.0 and ev["kl_d2s"] == 0.0


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_files_that_do_not_belong_together_are_refused_in_one_line(planted, catalog_dir,
                                                                   bridged, tmp_path):  # fmt: skip
    d, b, sha, _ = bridged
    pdir = planted.directory
    ok = policy_file(tmp_path, "  - {family: quotes, action: block}\n")
    kw = dict(dense_dir=pdir, companion_dir=pdir, catalog=catalog_dir)
    f = bridged_factory(planted.model, bridge=d, policy=ok, baseline=None, **kw)
    assert f.bridges_sha256 == sha  # the baseline beside the bridges by default
    other = tmp_path / "other"
    write_bridges(other, b, planted)
    save_baseline(json_baseline(d), other)
    (other / FIDELITY_FILE).unlink()
    with pytest.raises(ConfigError) as err:
        bridged_factory(planted.model, bridge=other, policy=ok, baseline=None, **kw)
    assert "bridge eval" in _one_line(err) and "no bridge-derived flag" in str(err.value)
    doc = json.loads((d / FIDELITY_FILE).read_text())
    (other / FIDELITY_FILE).write_text(json.dumps({**doc, "weights_sha256": "f" * 64}))
    with pytest.raises(ConfigError) as err:
        bridged_factory(planted.model, bridge=other, policy=ok, baseline=None, **kw)
    assert "measured other bridges" in _one_line(err)
    plain = tmp_path / "plain.json"  # the sparse model's own baseline: another path
    save_baseline(calibrate(planted.model, planted.tokenizer, _cat(catalog_dir),
                            catalog_sha256=file_sha256(catalog_dir / CATALOG_FILE),
                            windows=1), plain)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        bridged_factory(planted.model, bridge=d, policy=ok, baseline=plain, **kw)
    assert "--bridge DIR --dense MODEL" in _one_line(err)
    damp = policy_file(tmp_path, "  - {family: quotes, action: dampen, "
                       "dampen: {mode: mean_ablate}}\n")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        bridged_factory(planted.model, bridge=d, policy=damp, baseline=None, **kw)
    assert "dampens 'quotes'" in _one_line(err)
    causal = policy_file(tmp_path, "  - {family: quotes, action: log}\n", "causal_share: true\n")
    with pytest.raises(ConfigError) as err:
        bridged_factory(planted.model, bridge=d, policy=causal, baseline=None, **kw)
    assert "causal_share" in _one_line(err)
    from sparsecircuits.serve.launch import monitor_factory

    with pytest.raises(ConfigError) as err:  # and the other way: a bridged baseline, direct
        monitor_factory(planted.model, catalog=catalog_dir, policy=ok, baseline=d / "baseline.json")
    assert "serve it with --bridge" in _one_line(err)


def _cat(catalog_dir: Path) -> CatalogDoc:
    from sparsecircuits.monitor.catalog import load_catalog

    return load_catalog(catalog_dir)


def json_baseline(d: Path):
    from sparsecircuits.monitor.calibrate import load_baseline

    return load_baseline(d)
