"""Families and policy files: defaults load, the policy hash follows the file's bytes, and
unknown tasks, families, actions and fields are one-line errors naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsecircuits.errors import ConfigError
from sparsecircuits.monitor.calibrate import FlagRule
from sparsecircuits.monitor.families import DEFAULT_FAMILIES, load_families
from sparsecircuits.monitor.policy import load_policy
from sparsecircuits.monitor.runtime import Action

POLICY = """\
version: 1
flag: {z: 5.0, k: 2, n: 4}
rules:
  - name: quotes-review
    family: quotes
    action: review
  - family: quotes
    z: 9.0
    action: dampen
    dampen: {mode: scale, factor: 0.5}
"""


def _one_line_error(path: Path, text: str, match: str, **kw) -> str:
    path.write_text(text)
    loader = load_policy if path.name.startswith("policy") else load_families
    with pytest.raises(ConfigError, match=match) as err:
        loader(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_shipped_families_name_registered_tasks():
    fams = load_families()
    assert DEFAULT_FAMILIES.exists()
    assert fams.families["string-literal"].tasks == ["single_double_quote", "fstring_brace"]
    assert fams.families["brackets"].tasks == ["bracket_counting", "bracket_brace"]
    assert "control-flow" in fams.families


def test_bad_families_files_are_one_line_errors(tmp_path):
    p = tmp_path / "families.yaml"
    msg = _one_line_error(p, "version: 1\nfamilies:\n  x:\n    tasks: [no_such_task]\n",
                          "unknown task 'no_such_task'")  # fmt: skip
    assert "families.x.tasks" in msg
    _one_line_error(p, "version: 1\nfamilies:\n  x:\n    tasks: [with_as]\n    colour: red\n",
                    "unknown field 'families.x.colour'")  # fmt: skip
    _one_line_error(p, "version: 2\nfamilies: {}\n", "field 'version'")
    _one_line_error(p, "version: 1\nfamilies: [", "not a readable YAML")
    _one_line_error(p, "version: 1\nfamilies:\n  x:\n    tasks: []\n", "families.x.tasks")


def test_policy_rules_resolve_thresholds(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    pol = load_policy(p, families=["quotes"])
    first, second = pol.rules(FlagRule(z=3.0, k=1, n=1))
    assert (first.name, first.action, first.flag) == ("quotes-review", Action.REVIEW,
                                                      FlagRule(z=5.0, k=2, n=4))  # fmt: skip
    assert second.name == "rules[1]" and second.flag == FlagRule(z=9.0, k=2, n=4)
    assert second.dampen is not None and second.dampen.factor == 0.5


def test_the_policy_hash_changes_when_the_policy_changes(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text(POLICY)
    before = load_policy(p).sha256
    assert load_policy(p).sha256 == before  # same bytes, same hash
    p.write_text(POLICY.replace("factor: 0.5", "factor: 0.25"))
    assert load_policy(p).sha256 != before
    p.write_text(POLICY + "\n")  # even a byte that changes nothing is a different policy
    assert load_policy(p).sha256 != before


def test_bad_policies_are_one_line_errors(tmp_path):
    p = tmp_path / "policy.yaml"
    fams = {"families": ["quotes"]}
    _one_line_error(p, POLICY.replace("family: quotes\n    z:", "family: nope\n    z:"),
                    r"field 'rules.1.family': unknown family 'nope'", **fams)  # fmt: skip
    msg = _one_line_error(p, POLICY.replace("action: review", "action: nuke"),
                          "field 'rules.0.action'", **fams)  # fmt: skip
    assert "nuke" in msg
    _one_line_error(p, POLICY.replace("mode: scale, factor: 0.5", "mode: scale"),
                    "needs a factor", **fams)  # fmt: skip
    _one_line_error(p, POLICY.replace("    dampen: {mode: scale, factor: 0.5}\n", ""),
                    "action 'dampen' needs", **fams)  # fmt: skip
    _one_line_error(p, POLICY.replace("version: 1", "version: 7"), "field 'version'", **fams)
    _one_line_error(p, POLICY.replace("z: 9.0", "zz: 9.0"), "unknown field 'rules.1.zz'", **fams)
    _one_line_error(p, POLICY.replace("z: 9.0", "k: 9"), r"k \(9\) must be <= n \(4\)", **fams)
    _one_line_error(p, POLICY.replace("factor: 0.5", "factor: -1"), "rules.1.dampen.factor",
                    **fams)  # fmt: skip
    with pytest.raises(ConfigError, match="no such policy"):
        load_policy(tmp_path / "missing.yaml")


def test_rule_names_are_unique_and_k_n_resolve_against_the_baseline(tmp_path):
    from sparsecircuits.monitor.calibrate import FlagRule

    p = tmp_path / "policy.yaml"
    two = "version: 1\nrules:\n  - {name: r, family: quotes, action: log}\n" \
          "  - {name: r, family: quotes, action: block}\n"  # fmt: skip
    _one_line_error(p, two, r"'rules.1.name': 'r' names two rules", families=["quotes"])
    clash = "version: 1\nrules:\n  - {family: quotes, action: log}\n" \
            "  - {name: 'rules[0]', family: quotes, action: block}\n"  # fmt: skip
    _one_line_error(p, clash, "names two rules", families=["quotes"])
    p.write_text("version: 1\nrules:\n  - {family: quotes, action: log, k: 10}\n")
    policy = load_policy(p, families=["quotes"])  # n comes from the baseline
    assert policy.rules(FlagRule(z=4, k=3, n=16))[0].flag.k == 10
    with pytest.raises(ConfigError, match=r"k \(10\) must be <= n \(8\)") as err:
        policy.rules(FlagRule(z=4, k=3, n=8))
    assert "\n" not in str(err.value)
