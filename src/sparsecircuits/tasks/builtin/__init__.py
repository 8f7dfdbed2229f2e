"""The 20 built-in Python tasks (names as in the paper), in the order of docs/TASKS.md."""

from __future__ import annotations

from sparsecircuits.tasks.base import Task
from sparsecircuits.tasks.builtin import control_flow, definitions, literals, variables

_BY_NAME = {t.name: t for m in (literals, control_flow, variables, definitions) for t in m.TASKS}

ORDER = (
    "single_double_quote",
    "bracket_counting",
    "set_or_string",
    "set_or_string_fixedvarname",
    "while_return_true",
    "with_as",
    "with_open",
    "for_while",
    "else_elif",
    "if_ternary",
    "if_equals",
    "fstring_brace",
    "bracket_brace",
    "var_swap",
    "var_if",
    "indent_for",
    "lambda_func",
    "enumerate_range",
    "final_kwarg",
    "class_init",
)

BUILTIN_TASKS: tuple[Task, ...] = tuple(_BY_NAME[name] for name in ORDER)

__all__ = ["BUILTIN_TASKS", "ORDER"]
