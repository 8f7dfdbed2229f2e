"""``policy-check``: each dampen rule's effect on the family's own tasks, on every other task
and on held-out loss."""

from __future__ import annotations

import pytest

from sparsecircuits.circuits import testing as T
from sparsecircuits.monitor.policy import load_policy
from sparsecircuits.monitor.policy_check import policy_check
from tests.monitor.conftest import TASK_B

RULES = """\
version: 1
rules:
  - {name: zero, family: quotes, action: dampen, dampen: {mode: scale, factor: 0.0}}
  - {name: identity, family: quotes, action: dampen, dampen: {mode: scale, factor: 1.0}}
  - {name: mean, family: quotes, action: dampen, dampen: {mode: mean_ablate}}
  - {name: not-a-dampen, family: quotes, action: block}
"""


def test_policy_check_reports_each_dampen_rules_side_effects(planted, catalog, tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text(RULES)
    pol = load_policy(p, families=catalog.monitored())
    names = [T.TASK, TASK_B, "with_as"]
    off, identity, mean = policy_check(planted.model, planted.tokenizer, catalog, pol,
                                       task_names=names, n_pairs=8, loss_windows=2)  # fmt: skip
    assert [r["rule"] for r in (off, identity, mean)] == ["zero", "identity", "mean"]
    for r in (off, identity, mean):
        assert set(r["own_tasks"]) == {T.TASK, TASK_B} and set(r["other_tasks"]) == {"with_as"}
        assert r["heldout_loss"]["plain"] > 0
    # Scaling by 1 changes nothing: every delta is exactly 0.
    assert identity["heldout_loss"]["delta"] == 0.0
    assert all(v["delta_acc"] == 0.0 for v in {**identity["own_tasks"],
                                               **identity["other_tasks"]}.values())  # fmt: skip
    # Switching the planted circuit off or to its means costs the quote task its answer.
    for r in (off, mean):
        own = r["own_tasks"][T.TASK]
        assert own["acc"] == 1.0 and own["acc_dampened"] <= 0.5, r["rule"]
        assert own["loss_dampened"] > own["loss"] + 0.3
        assert r["heldout_loss"]["delta"] != 0.0
    assert off["dampen"] == {"mode": "scale", "factor": 0.0}
    assert mean["own_tasks"][T.TASK]["delta_acc"] == pytest.approx(
        mean["own_tasks"][T.TASK]["acc_dampened"] - 1.0)  # fmt: skip
