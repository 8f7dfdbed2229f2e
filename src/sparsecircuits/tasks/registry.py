"""Task registry: look tasks up by name; names are unique."""

from __future__ import annotations

import difflib

from sparsecircuits.tasks.base import Task, TaskError

_TASKS: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` under its name and return it. A name already taken is refused unless
    ``replace`` is set (e.g. to reload a task file while developing it)."""
    if not isinstance(task, Task):
        raise TaskError(f"register() takes a Task, got {type(task).__name__}")
    if task.name in _TASKS and not replace:
        raise TaskError(
            f"task {task.name} is already registered; pick another name or pass replace=True"
        )
    _TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    """Remove task ``name`` (no error if absent)."""
    _TASKS.pop(name, None)


def get(name: str) -> Task:
    """The task called ``name``; an unknown name raises TaskError listing close matches."""
    try:
        return _TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_TASKS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(names())}"
        raise TaskError(f"unknown task {name!r}; {hint}") from None


def names(*, include_controls: bool = True) -> list[str]:
    """Registered task names in registration order (the 20 built-ins first, in paper order).
    ``include_controls=False`` leaves out negative controls."""
    return [n for n, t in _TASKS.items() if include_controls or not t.control]
