"""Tasks from template files, and their one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sparsecircuits.tasks import TaskError, load_task_file

GOOD = {
    "name": "file_quote",
    "description": "close the string",
    "slots": {"msg": ["hello there", "not found"], "target": "identifier", "n": "int"},
    "train": [
        {"a": '{target} = "{msg}', "a_target": '"\n', "b": "{target} = '{msg}", "b_target": "'\n"},
        {"a": 'f({n}, "{msg}', "a_target": '")\n', "b": "f({n}, '{msg}", "b_target": "')\n"},
    ],
    "test": [
        {
            "a": 'if {target} == "{msg}', "a_target": '":\n', "a_suffix": "    pass\n",
            "b": "if {target} == '{msg}", "b_target": "':\n", "b_suffix": "    pass\n",
            "contexts": ["function"],
        }
    ],
}  # fmt: skip


def _write(tmp_path: Path, data, name: str = "task.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_json_task_file_builds(tmp_path: Path, small_tokenizer) -> None:
    task = load_task_file(_write(tmp_path, GOOD))
    assert task.name == "file_quote" and len(task.train) == 2 and len(task.test) == 1
    batch = task.build(small_tokenizer, split="test", n=4, seed=0)
    assert all(p.prompt_a.splitlines()[-1].startswith("    if ") for p in batch.raw)
    assert all(("hello there" in p.prompt_a) or ("not found" in p.prompt_a) for p in batch.raw)
    assert (batch.target_a != batch.target_b).all()


def test_yaml_task_file(tmp_path: Path, small_tokenizer) -> None:
    text = json.dumps(GOOD)  # JSON is valid YAML
    path = _write(tmp_path, text, "task.yaml")
    if importlib.util.find_spec("yaml") is None:
        with pytest.raises(TaskError, match="PyYAML is not installed"):
            load_task_file(path)
    else:
        assert load_task_file(path).build(small_tokenizer, n=2).n == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("name"), "field 'name' must be"),
        (lambda d: d["train"][0].pop("b_target"), r"field train\[0\].b_target is missing"),
        (lambda d: d["train"][1].update(a=3), r"field train\[1\].a must be a non-empty string"),
        (lambda d: d.update(test=[]), "field 'test' must be a non-empty list"),
        (lambda d: d.update(extra=1), "unknown field 'extra'"),
        (lambda d: d["slots"].update(n="float"), "field 'slots.n': unknown generator 'float'"),
        (lambda d: d["test"][0].update(contexts=["class"]), r"test\[0\].contexts must be"),
        (lambda d: d["train"][0].update(a="{nope} = '"), r"unknown slot \{nope\}"),
    ],
)
def test_bad_task_file_errors_name_file_and_field(tmp_path: Path, change, message: str) -> None:
    data = json.loads(json.dumps(GOOD))
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(TaskError, match=message) as err:
        load_task_file(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="does not exist"):
        load_task_file(tmp_path / "absent.json")
    with pytest.raises(TaskError, match="is not valid JSON"):
        load_task_file(_write(tmp_path, "{not json"))


def test_template_file_task_with_identical_targets_fails_at_build(
    tmp_path: Path, small_tokenizer
) -> None:
    data = json.loads(json.dumps(GOOD))
    for t in data["train"]:
        t["b_target"] = t["a_target"]
        t["b"] = t["a"]
    task = load_task_file(_write(tmp_path, data))
    with pytest.raises(TaskError, match="task file_quote: targets") as err:
        task.build(small_tokenizer, n=3)
    assert "\n" not in str(err.value)
