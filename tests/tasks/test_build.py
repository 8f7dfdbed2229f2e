"""Task generation and resolution: determinism, validity, disjoint splits, targets, errors."""

from __future__ import annotations

import ast

import pytest

from sparsecircuits import tasks
from sparsecircuits.data import Tokenizer
from sparsecircuits.tasks import RawPair, Task, TaskError, Template

BUILTIN = tasks.names(include_controls=False)


def test_the_twenty_builtin_tasks_are_registered_in_paper_order() -> None:
    assert list(tasks.builtin.ORDER) == BUILTIN
    assert len(BUILTIN) == 20
    assert BUILTIN[:2] == ["single_double_quote", "bracket_counting"]


@pytest.mark.parametrize("name", BUILTIN)
def test_same_seed_same_batch_other_seed_other_prompts(name: str, small_tokenizer) -> None:
    task = tasks.get(name)
    one = task.build(small_tokenizer, split="train", n=6, seed=3)
    two = task.build(small_tokenizer, split="train", n=6, seed=3)
    other = task.build(small_tokenizer, split="train", n=6, seed=4)
    assert one.prompts_a == two.prompts_a and one.prompts_b == two.prompts_b
    assert one.target_a.tolist() == two.target_a.tolist()
    assert [p.prompt_a for p in one.raw] != [p.prompt_a for p in other.raw]


@pytest.mark.parametrize("name", BUILTIN)
def test_train_and_test_templates_are_disjoint(name: str) -> None:
    task = tasks.get(name)
    assert len(task.train) >= 3 and len(task.test) >= 2
    train_text = {s for t in task.train for s in (t.a, t.b)}
    test_text = {s for t in task.test for s in (t.a, t.b)}
    assert not train_text & test_text


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", BUILTIN)
def test_completed_pairs_parse_and_differ(name: str, split: str) -> None:
    for pair in tasks.get(name).raw_pairs(split=split, n=12, seed=0):
        assert pair.check_syntax  # every built-in construct can be completed
        ast.parse(pair.prompt_a + pair.continuation_a + pair.suffix_a)
        ast.parse(pair.prompt_b + pair.continuation_b + pair.suffix_b)
        assert pair.prompt_a != pair.prompt_b or pair.continuation_a != pair.continuation_b


@pytest.mark.parametrize("name", BUILTIN)
def test_targets_are_distinct_first_tokens_without_boundary_merge(
    name: str, run_tokenizer: Tokenizer
) -> None:
    tok = run_tokenizer
    for split in ("train", "test"):
        batch = tasks.get(name).build(tok, split=split, n=10, seed=1)
        assert (batch.target_a != batch.target_b).all()
        assert batch.max_prompt_len < 100  # short prompts keep evaluation cheap
        for i, pair in enumerate(batch.raw):
            for prompt, cont, ids, target in (
                (pair.prompt_a, pair.continuation_a, batch.prompts_a[i], batch.target_a[i]),
                (pair.prompt_b, pair.continuation_b, batch.prompts_b[i], batch.target_b[i]),
            ):
                full = tok.encode(prompt + cont)
                assert tok.encode(prompt) == ids == full[: len(ids)]
                assert full[len(ids)] == int(target)
                assert cont.startswith(tok.decode([int(target)]))


@pytest.mark.parametrize("name", BUILTIN)
def test_every_task_resolves_under_a_trained_stdlib_bpe(name: str, stdlib_tokenizer) -> None:
    for split in ("train", "test"):
        batch = tasks.get(name).build(stdlib_tokenizer, split=split, n=6, seed=7)
        assert (batch.target_a != batch.target_b).all()


def test_bracket_counting_moves_the_shared_bracket_into_the_prompts(
    byte_tokenizer: Tokenizer,
) -> None:
    # Byte-level: ']]\n' and ']\n' both start with ']', which must move into both prompts.
    batch = tasks.get("bracket_counting").build(byte_tokenizer, n=12, seed=0)
    assert batch.moved == ["]"] * 12
    assert set(batch.tokens_a) == {"]"}
    assert set(batch.tokens_b) <= {"\n", ")", ":"}
    for pair, ids_a, ids_b in zip(batch.raw, batch.prompts_a, batch.prompts_b, strict=True):
        assert pair.prompt_a.endswith("]") and pair.prompt_b.endswith("]")
        assert byte_tokenizer.decode(ids_a) == pair.prompt_a
        assert byte_tokenizer.decode(ids_b) == pair.prompt_b


def test_no_move_when_first_tokens_already_differ(run_tokenizer: Tokenizer) -> None:
    # Under a 2k stdlib BPE ']\n' is one token, so flat vs nested differ at the first token.
    batch = tasks.get("bracket_counting").build(run_tokenizer, split="test", n=12, seed=0)
    assert set(batch.tokens_a) == {"]"}
    assert all(t.startswith("]") and t != "]" for t in batch.tokens_b)


def _one_template_task(a: str, a_target: str, b: str, b_target: str, **kw) -> Task:
    template = Template(a, a_target, b, b_target, **kw)
    other = Template("{var} = 1\n" + a, a_target, "{var} = 1\n" + b, b_target, **kw)
    return Task("probe_task", "a test task", (template,), (other,))


def test_identical_targets_raise_one_line_error_naming_task(small_tokenizer) -> None:
    task = _one_template_task("x = (", "1)\n", "x = (", "1)\n")
    with pytest.raises(TaskError, match="probe_task") as err:
        task.build(small_tokenizer, n=2)
    assert "\n" not in str(err.value) and "'1)\\n'" in str(err.value)


def test_answer_merging_with_prompt_raises(stdlib_tokenizer: Tokenizer) -> None:
    # '):\n' is one token of a stdlib BPE: a prompt ending in ')' would change its tokens.
    assert stdlib_tokenizer.token_to_id("):\n") is not None
    task = _one_template_task(
        "with f(x)", ":\n", "with f(x)", " as y:\n", a_suffix="    pass\n", b_suffix="    pass\n"
    )
    with pytest.raises(TaskError, match="probe_task: the answer ':\\\\n' merges"):
        task.build(stdlib_tokenizer, n=2, seed=0)


def test_invalid_python_raises(small_tokenizer) -> None:
    task = _one_template_task("x = [1, 2", "]\n", "x = (1, 2", "]\n")
    with pytest.raises(TaskError, match=r"probe_task: completed prompt B .* is not valid Python"):
        task.build(small_tokenizer, n=4)


def test_syntax_check_can_be_disabled_per_template(small_tokenizer) -> None:
    task = _one_template_task("x = [1, 2", "]\n", "x = (1, 2", ")\n]", check_syntax=False)
    assert task.build(small_tokenizer, n=2).n == 2


def test_unknown_slot_and_shared_templates_are_rejected() -> None:
    with pytest.raises(TaskError, match=r"unknown slot \{nope\}"):
        _one_template_task("{nope} = '", "'\n", '{nope} = "', '"\n')
    t = Template("x = '", "'\n", 'x = "', '"\n')
    with pytest.raises(TaskError, match="both train and test"):
        Task("dup", "", (t,), (t,))


def test_prompts_are_left_truncated_to_the_context(run_tokenizer: Tokenizer) -> None:
    task = tasks.get("set_or_string")
    full = task.build(run_tokenizer, n=5, seed=2)
    short = task.build(run_tokenizer, n=5, seed=2, max_len=8)
    for long_ids, short_ids in zip(
        full.prompts_a + full.prompts_b, short.prompts_a + short.prompts_b, strict=True
    ):
        assert short_ids == long_ids[-7:]
    assert short.target_a.tolist() == full.target_a.tolist()


def test_snippets_are_indented_for_their_context() -> None:
    task = tasks.get("for_while")
    seen = {}
    for pair in task.raw_pairs(split="train", n=40, seed=0):
        seen[pair.context] = pair
    assert set(seen) == {"module", "function", "method"}
    for context, indent in (("module", ""), ("function", "    "), ("method", "        ")):
        last_line = seen[context].prompt_a.splitlines()[-1]
        assert last_line.startswith(indent + "for ")


def test_identifier_slots_get_distinct_initials() -> None:
    # var_swap targets are the two names: distinct initials make the first tokens differ.
    for pair in tasks.get("var_swap").raw_pairs(split="train", n=30, seed=5):
        a, b = pair.continuation_a.split()[0], pair.continuation_b.split()[0]
        assert a[0] != b[0]


def test_raw_pair_is_plain_text() -> None:
    pair = tasks.get("single_double_quote").raw_pairs(split="test", n=1, seed=0)[0]
    assert isinstance(pair, RawPair)
    assert pair.continuation_a[0] == '"' and pair.continuation_b[0] == "'"
    last_a, last_b = pair.prompt_a.splitlines()[-1], pair.prompt_b.splitlines()[-1]
    assert last_a.replace('"', "'") == last_b
