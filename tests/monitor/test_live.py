"""The per-request monitor: engagement under the KV cache equals a full pass, the k-of-n rules
escalate the decision at the right token, a dampen decision changes the following passes, and
telemetry carries scores and decisions, never activations."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecircuits.interop.download import file_sha256
from sparsecircuits.model.cache import KVCache
from sparsecircuits.monitor.calibrate import calibrate
from sparsecircuits.monitor.catalog import CATALOG_FILE
from sparsecircuits.monitor.live import CircuitMonitorFactory
from sparsecircuits.monitor.policy import load_policy
from sparsecircuits.monitor.runtime import Action
from sparsecircuits.monitor.scores import engagement


@pytest.fixture(scope="module")
def baseline(planted, catalog, catalog_dir):
    sha = file_sha256(catalog_dir / CATALOG_FILE)
    return calibrate(planted.model, planted.tokenizer, catalog, catalog_sha256=sha, windows=3)


def _factory(planted, catalog, baseline, tmp_path, rules: str):
    p = tmp_path / "policy.yaml"
    p.write_text(f"version: 1\nrules:\n{rules}")
    policy = load_policy(p, families=catalog.monitored())
    return CircuitMonitorFactory(planted.model, catalog, baseline, policy)


def _generate(model, monitor, ids: list[int], steps: int) -> list[int]:
    """Greedy generation with the KV cache, as the server does it."""
    kv = KVCache.for_model(model, batch=1)
    idx = torch.tensor([ids])
    out = list(ids)
    for _ in range(steps):
        hooks = monitor.hooks()
        logits, _ = model(idx, hooks=hooks, cache=kv)
        decision = monitor.observe(hooks.cache, idx[0].tolist())
        if decision.action is Action.BLOCK:
            break
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        idx = torch.tensor([[nxt]])
    return out


def test_engagement_with_the_kv_cache_equals_a_full_pass(planted, catalog, baseline, tmp_path):
    f = _factory(planted, catalog, baseline, tmp_path, "  - {family: quotes, action: log}\n")
    mon = f.start("r1")
    ids = planted.tokenizer.encode("x = 'abc")
    out = _generate(planted.model, mon, ids, steps=5)
    tel = mon.telemetry()
    # The last generated token is emitted but never fed back: it has no activations yet.
    assert tel["n_prompt_tokens"] == len(ids) and tel["n_generated_tokens"] == 4
    _, cache = planted.model.run_with_cache(torch.tensor([out[:-1]]), names=f.sites)
    want = engagement(cache, catalog.family_nodes("quotes"))[0]
    got = tel["families"]["quotes"]["engagement"]
    assert got == pytest.approx(want.tolist(), abs=2e-4)  # telemetry rounds to 4 decimals
    z = baseline.z("quotes", want)
    assert tel["families"]["quotes"]["z"] == pytest.approx(z.tolist(), abs=2e-3)


def _fake_cache(f, values: list[float]) -> dict[str, torch.Tensor]:
    """Activations whose engagement at token t is exactly values[t] (every family node's
    |a| / s equals it)."""
    fam = f.families["quotes"]
    cache = {}
    for site in fam.sites:
        width = int(fam.index[site].max()) + 3
        x = torch.full((1, len(values), width), 1234.5678)  # non-family channels: ignored
        x[0, :, fam.index[site]] = torch.tensor(values)[:, None] * fam.scale[site][None, :]
        cache[site] = x
    return cache


def test_rules_escalate_at_the_right_token(planted, catalog, baseline, tmp_path):
    b = baseline.families["quotes"]
    hot = b.median + 10 * b.sigma  # z = 10
    warm = b.median + 5 * b.sigma  # z = 5
    rules = (
        "  - {name: r-log, family: quotes, action: log, z: 3, k: 1, n: 1}\n"
        "  - {name: r-block, family: quotes, action: block, z: 8, k: 2, n: 3}\n"
    )
    f = _factory(planted, catalog, baseline, tmp_path, rules)
    mon = f.start("r2")
    d = mon.observe(_fake_cache(f, [b.median] * 4), [1, 2, 3, 4])  # the prompt: quiet
    assert d.action is Action.ALLOW and d.policy_sha256 == f.policy.sha256
    d = mon.observe(_fake_cache(f, [warm]), [5])  # generated token 0: log fires
    assert (d.action, d.rule, d.at_token) == (Action.LOG, "r-log", 0)
    d = mon.observe(_fake_cache(f, [hot]), [6])  # token 1: one hot of 3, block needs 2
    assert d.action is Action.LOG
    d = mon.observe(_fake_cache(f, [b.median]), [7])  # token 2
    assert d.action is Action.LOG
    d = mon.observe(_fake_cache(f, [hot]), [8])  # token 3: hot at 1 and 3 -> 2 of the last 3
    assert (d.action, d.rule, d.at_token, d.family) == (Action.BLOCK, "r-block", 3, "quotes")
    d = mon.observe(_fake_cache(f, [b.median]), [9])  # stays blocked: strictest so far
    assert d.action is Action.BLOCK
    tel = mon.telemetry()
    assert tel["families"]["quotes"]["flags"] == {"r-log": [0, 1, 3], "r-block": [3]}
    assert tel["families"]["quotes"]["max_z"] == pytest.approx(10, abs=1e-3)
    assert tel["decision"] == d.to_json()
    text = json.dumps(tel)  # JSON-able
    assert "1234.5678" not in text and "1234.568" not in text  # no activation leaks
    assert len(tel["families"]["quotes"]["engagement"]) == 4 + 5
    assert set(tel["families"]) == {"quotes"}


def test_a_dampen_decision_changes_the_following_passes(planted, catalog, baseline, tmp_path):
    f = _factory(planted, catalog, baseline, tmp_path,
                 "  - family: quotes\n    action: dampen\n    z: 0.0001\n    k: 1\n    n: 1\n"
                 "    dampen: {mode: scale, factor: 0.0}\n")  # fmt: skip
    mon = f.start("r3")
    assert mon.hooks()._interventions == {}
    ids = planted.tokenizer.encode("y = 'abc")
    _generate(planted.model, mon, ids, steps=4)
    tel = mon.telemetry()
    q = tel["families"]["quotes"]
    assert tel["decision"]["action"] == "dampen" and tel["decision"]["at_token"] == -1
    assert q["dampened"] and set(mon.hooks()._interventions) == set(f.families["quotes"].sites)
    # The next pass really writes 0 into every family node ...
    hooks = mon.hooks()
    planted.model(torch.tensor([ids]), hooks=hooks)
    fam = f.families["quotes"]
    for site in fam.sites:
        assert not hooks.cache[site][0, :, fam.index[site]].any(), site
    # ... but engagement is read before the dampening: the request still shows what it drives.
    assert any(v > 0 for v in q["engagement"][len(ids) :])


def test_a_dampen_does_not_blind_a_stricter_rule_on_the_same_family(
    planted, catalog, baseline, tmp_path
):
    """A request that trips the mild rule must still meet the strict one: engagement after the
    dampen is measured on the activations before it (else scale 0 would pin z below any
    threshold for the rest of the request)."""
    f = _factory(planted, catalog, baseline, tmp_path,
                 "  - family: quotes\n    action: dampen\n    z: 0.0001\n    k: 1\n    n: 1\n"
                 "    dampen: {mode: scale, factor: 0.0}\n"
                 "  - family: quotes\n    action: block\n    z: 0.0001\n"
                 "    k: 2\n    n: 2\n")  # fmt: skip
    mon = f.start("r4")
    ids = planted.tokenizer.encode("y = 'abc")[:1]  # one prompt token: block needs two
    _generate(planted.model, mon, ids, steps=6)
    d = mon.telemetry()["decision"]
    assert d["action"] == "block" and d["at_token"] is not None and d["at_token"] >= 0


def test_describe_names_what_is_loaded(planted, catalog, baseline, tmp_path):
    f = _factory(planted, catalog, baseline, tmp_path, "  - {family: quotes, action: review}\n")
    d = f.describe()
    assert d["families"] == ["quotes"] and d["policy_sha256"] == f.policy.sha256
    assert d["weights_hash"] == planted.hash


def test_opt_in_causal_share_where_a_rule_first_fires(planted, catalog, baseline, tmp_path):
    from sparsecircuits.monitor.scores import causal_share

    rules = "  - {family: quotes, action: log, z: 0.0001, k: 2, n: 2}\n"  # fires at >= token 1
    off = _factory(planted, catalog, baseline, tmp_path, rules)
    ids = planted.tokenizer.encode("y = 'abc")
    mon = off.start("c0")
    _generate(planted.model, mon, ids, steps=3)
    assert mon.telemetry()["causal_share"] == {}  # not asked for: nothing computed
    p = tmp_path / "policy.yaml"
    p.write_text(f"version: 1\ncausal_share: true\nrules:\n{rules}")
    on = CircuitMonitorFactory(planted.model, catalog, baseline,
                               load_policy(p, families=catalog.monitored()))  # fmt: skip
    mon = on.start("c1")
    _generate(planted.model, mon, ids, steps=3)
    tel = mon.telemetry()
    (rec,) = tel["causal_share"].values()
    z = tel["families"]["quotes"]["z"]
    first = next(i for i in range(1, len(z)) if z[i - 1] > 0.0001 and z[i] > 0.0001)
    assert rec["at_token"] == -1 and first < len(ids)  # fired on the prompt, at position first
    # equal to measuring it by hand at that position
    want = causal_share(planted.model, torch.tensor([ids[:first]]), ids[first],
                        on.families["quotes"], answers=catalog.answers("quotes"))  # fmt: skip
    assert rec["logprob_change"] == pytest.approx(want["logprob_change"], abs=1e-6)
    assert json.dumps(rec)  # JSON-able


def test_a_dampened_request_survives_the_window_sliding(planted, catalog, baseline, tmp_path):
    from sparsecircuits.serve.engine import SamplingOptions, generate

    f = _factory(planted, catalog, baseline, tmp_path,
                 "  - family: quotes\n    action: dampen\n    z: 0.0001\n    k: 1\n    n: 1\n"
                 "    dampen: {mode: scale, factor: 0.5}\n")  # fmt: skip
    ids = planted.tokenizer.encode("x = 'abc'\n" * 40)[: planted.model.config.block_size - 2]
    mon = f.start("r5")
    opts = SamplingOptions(max_tokens=6, temperature=0)
    list(generate(planted.model, planted.tokenizer, ids, mon, options=opts))
    tel = mon.telemetry()
    assert len(tel["families"]["quotes"]["engagement"]) == len(ids) + tel["n_generated_tokens"]
