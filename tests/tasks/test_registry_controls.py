"""Registry errors and the negative controls."""

from __future__ import annotations

import pytest

from sparsecircuits import tasks
from sparsecircuits.tasks import ControlTask, Task, TaskError, Template


def test_unknown_task_lists_close_matches() -> None:
    with pytest.raises(TaskError, match="did you mean single_double_quote") as err:
        tasks.get("single_double_qoute")
    assert "\n" not in str(err.value)


def test_duplicate_registration_is_refused() -> None:
    existing = tasks.get("for_while")
    with pytest.raises(TaskError, match="for_while is already registered"):
        tasks.register(existing)
    probe = Task("probe_registry", "", (Template("x = '", "'\n", 'x = "', '"\n'),),
                 (Template("y = '", "'\n", 'y = "', '"\n'),))  # fmt: skip
    try:
        tasks.register(probe)
        assert tasks.get("probe_registry") is probe
        assert tasks.register(probe, replace=True) is probe
    finally:
        tasks.unregister("probe_registry")
    with pytest.raises(TaskError):
        tasks.get("probe_registry")


def test_controls_exist_for_three_tasks_and_are_marked() -> None:
    controls = [tasks.get(n) for n in tasks.names() if n not in tasks.names(include_controls=False)]
    assert all(isinstance(c, ControlTask) and c.control for c in controls)
    assert len({c.base.name for c in controls}) >= 3
    assert {c.kind for c in controls} == {"constant", "arbitrary", "inverted"}
    assert "single_double_quote__constant" in tasks.names()


@pytest.mark.parametrize(
    "name",
    [
        "single_double_quote__constant",
        "single_double_quote__arbitrary",
        "bracket_counting__inverted",
    ],
)
def test_controls_keep_prompts_and_change_targets(name: str, run_tokenizer) -> None:
    control = tasks.get(name)
    assert isinstance(control, ControlTask)
    base = control.base.build(run_tokenizer, split="test", n=8, seed=4)
    ctl = control.build(run_tokenizer, split="test", n=8, seed=4)
    assert ctl.prompts_a == base.prompts_a and ctl.prompts_b == base.prompts_b
    assert not set(ctl.target_a.tolist()) & set(base.target_a.tolist())
    when, is_ = run_tokenizer.encode(" when")[0], run_tokenizer.encode(" is")[0]
    if control.kind == "constant":
        # Every prompt, A or B: ' when' is right and ' is' wrong, whatever the class.
        w, i = run_tokenizer.id_to_token(when), run_tokenizer.id_to_token(is_)
        assert ctl.describe() == [f"A {w!r} over {i!r}, B {w!r} over {i!r}  (8 pairs)"]
        assert set(ctl.target_a.tolist()) == set(ctl.target_b.tolist()) == {when}
        assert set(ctl.other_a.tolist()) == set(ctl.other_b.tolist()) == {is_}
    elif control.kind == "arbitrary":
        assert set(ctl.target_a.tolist()) == {is_} and set(ctl.target_b.tolist()) == {when}
        assert ctl.other_a.tolist() == ctl.target_b.tolist()
    else:
        assert ctl.target_a.tolist() == base.target_b.tolist()
        assert ctl.other_a.tolist() == base.target_a.tolist()


def test_control_tokens_must_differ(small_tokenizer) -> None:
    same = tasks.constant_target(tasks.get("for_while"), token_a=" is", token_b=" is")
    with pytest.raises(TaskError, match="for_while__constant: control tokens"):
        same.build(small_tokenizer, n=2)
