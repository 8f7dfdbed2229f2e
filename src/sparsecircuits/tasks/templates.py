"""User-defined tasks from a JSON (or, when PyYAML is installed, YAML) template file.

Format (every field checked; unknown fields are errors)::

    {
      "name": "my_quote_task",
      "description": "close the string",
      "slots": {"msg": ["hello", "file not found"], "var": "identifier", "n": "int"},
      "train": [{"a": "{var} = \\"{msg}", "a_target": "\\"\\n",
                 "b": "{var} = '{msg}", "b_target": "'\\n"}],
      "test": [...]
    }

A slot is a list of values or a generator name: ``identifier``, ``int``, ``word`` or ``text``.
Slots not listed fall back to the built-in kinds (``var``, ``func``, ``cls``, ``int``, ...; see
:mod:`~sparsecircuits.tasks.slots`). A template may also set ``a_suffix``/``b_suffix`` (text that
completes the statement for the syntax check), ``contexts`` (subset of module, function, method)
and ``check_syntax`` (default true).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparsecircuits.tasks.base import CONTEXTS, SPLITS, Task, TaskError, Template
from sparsecircuits.tasks.slots import GENERATOR_SLOTS, Slot

_TOP_FIELDS = {"name", "description", "slots", "train", "test"}
_TEMPLATE_STR_FIELDS = ("a", "a_target", "b", "b_target", "a_suffix", "b_suffix")
_REQUIRED = ("a", "a_target", "b", "b_target")
_TEMPLATE_FIELDS = {*_TEMPLATE_STR_FIELDS, "contexts", "check_syntax"}


def load_task_file(path: str | os.PathLike) -> Task:
    """Read a task from a ``.json`` (or ``.yaml``/``.yml``) template file; not registered.

    Raises TaskError with a one-line message naming the file and the offending field.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"task file {path} cannot be read ({exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        data = _load_yaml(path, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(f"task file {path} is not valid JSON ({exc})") from None
    return task_from_dict(data, source=f"task file {path}")


def _load_yaml(path: Path, text: str) -> Any:
    try:
        import yaml  # optional: only YAML task files need it
    except ImportError:
        raise TaskError(
            f"task file {path} is YAML but PyYAML is not installed; use JSON or install pyyaml"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TaskError(f"task file {path} is not valid YAML ({exc})") from None


def task_from_dict(data: Any, *, source: str = "task definition") -> Task:
    """Build a Task from parsed template-file data; errors name ``source`` and the field."""
    if not isinstance(data, Mapping):
        raise TaskError(f"{source}: expected an object with name, description, train, test")
    unknown = sorted(set(data) - _TOP_FIELDS)
    if unknown:
        raise TaskError(f"{source}: unknown field {unknown[0]!r} (allowed: {sorted(_TOP_FIELDS)})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise TaskError(f"{source}: field 'name' must be a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise TaskError(f"{source}: field 'description' must be a string")
    slots = _slots(data.get("slots", {}), source)
    splits = {}
    for split in SPLITS:
        items = data.get(split)
        if not isinstance(items, list) or not items:
            raise TaskError(f"{source}: field {split!r} must be a non-empty list of templates")
        splits[split] = tuple(
            _template(item, f"{split}[{i}]", source) for i, item in enumerate(items)
        )
    try:
        return Task(name, description, splits["train"], splits["test"], slots=slots)
    except TaskError as exc:
        raise TaskError(f"{source}: {exc}") from None


def _slots(raw: Any, source: str) -> dict[str, Slot]:
    if not isinstance(raw, Mapping):
        raise TaskError(f"{source}: field 'slots' must be an object of slot name -> values")
    slots = {}
    for key, spec in raw.items():
        where = f"slots.{key}"
        if not isinstance(key, str) or not key.isidentifier():
            raise TaskError(f"{source}: field {where!r}: slot names must be identifiers")
        if isinstance(spec, str):
            if spec not in GENERATOR_SLOTS:
                raise TaskError(
                    f"{source}: field {where!r}: unknown generator {spec!r} "
                    f"(use a list of values or one of {sorted(GENERATOR_SLOTS)})"
                )
            slots[key] = GENERATOR_SLOTS[spec]  # type: ignore[index]
        elif isinstance(spec, list) and spec and all(isinstance(v, str) and v for v in spec):
            # Identifier pools get distinct names per pair; literal text pools do not need to.
            slots[key] = Slot(values=tuple(spec), identifier=all(v.isidentifier() for v in spec))
        else:
            raise TaskError(
                f"{source}: field {where!r} must be a non-empty list of non-empty strings "
                f"or a generator name"
            )
    return slots


def _template(item: Any, where: str, source: str) -> Template:
    if not isinstance(item, Mapping):
        raise TaskError(f"{source}: field {where!r} must be an object")
    unknown = sorted(set(item) - _TEMPLATE_FIELDS)
    if unknown:
        raise TaskError(f"{source}: field {where}.{unknown[0]} is unknown")
    for key in _REQUIRED:
        if key not in item:
            raise TaskError(f"{source}: field {where}.{key} is missing")
    for key in _TEMPLATE_STR_FIELDS:
        value = item.get(key, "")
        if not isinstance(value, str) or (key in _REQUIRED and not value):
            raise TaskError(f"{source}: field {where}.{key} must be a non-empty string")
    contexts = item.get("contexts", list(CONTEXTS))
    if not isinstance(contexts, list) or not contexts or any(c not in CONTEXTS for c in contexts):
        raise TaskError(
            f"{source}: field {where}.contexts must be a non-empty subset of {CONTEXTS}"
        )
    check = item.get("check_syntax", True)
    if not isinstance(check, bool):
        raise TaskError(f"{source}: field {where}.check_syntax must be true or false")
    return Template(
        **{k: item.get(k, "") for k in _TEMPLATE_STR_FIELDS},
        contexts=tuple(contexts),
        check_syntax=check,
    )
