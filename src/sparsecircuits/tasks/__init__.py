"""The task suite: 20 paired Python next-token tasks, negative controls, template-file tasks,
the two-token contrast loss and a fast evaluation over many tasks.

Importing this package registers the 20 built-in tasks (paper names) and the named controls::

    from sparsecircuits import tasks
    batch = tasks.get("single_double_quote").build(tokenizer, split="test", n=50, seed=0)
"""

from __future__ import annotations

from sparsecircuits.tasks.base import (
    CONTEXTS,
    SPLITS,
    Context,
    RawPair,
    Split,
    Task,
    TaskError,
    Template,
)
from sparsecircuits.tasks.batch import TaskBatch, resolve_pair
from sparsecircuits.tasks.builtin import BUILTIN_TASKS
from sparsecircuits.tasks.controls import (
    ControlTask,
    arbitrary_mapping,
    constant_target,
    inverted,
)
from sparsecircuits.tasks.evaluate import evaluate_tasks
from sparsecircuits.tasks.metrics import (
    ContrastLoss,
    contrast_loss,
    final_logits,
    pad_prompts,
    prompt_loss,
)
from sparsecircuits.tasks.registry import get, names, register, unregister
from sparsecircuits.tasks.slots import Slot, pool
from sparsecircuits.tasks.templates import load_task_file, task_from_dict


def _register_builtins() -> None:
    for task in BUILTIN_TASKS:
        register(task)
    by_name = {t.name: t for t in BUILTIN_TASKS}
    quote = by_name["single_double_quote"]
    for control in (
        constant_target(quote),
        arbitrary_mapping(quote),
        inverted(quote),
        inverted(by_name["bracket_counting"]),
        arbitrary_mapping(by_name["for_while"]),
        constant_target(by_name["set_or_string"]),
    ):
        register(control)


_register_builtins()

__all__ = [
    "BUILTIN_TASKS",
    "CONTEXTS",
    "SPLITS",
    "Context",
    "ContrastLoss",
    "ControlTask",
    "RawPair",
    "Slot",
    "Split",
    "Task",
    "TaskBatch",
    "TaskError",
    "Template",
    "arbitrary_mapping",
    "constant_target",
    "contrast_loss",
    "evaluate_tasks",
    "final_logits",
    "get",
    "inverted",
    "load_task_file",
    "names",
    "pad_prompts",
    "pool",
    "prompt_loss",
    "register",
    "resolve_pair",
    "task_from_dict",
    "unregister",
]
