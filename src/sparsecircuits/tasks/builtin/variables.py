"""Tasks about variables: remembering a type, a name just bound, or the other name of a swap."""

from __future__ import annotations

from sparsecircuits.tasks.base import Task, Template
from sparsecircuits.tasks.slots import pool

IN_FUNCTION = ("function", "method")

# `{var}` is the tracked variable; `{aux}` a distractor variable (also an ordinary name).
_SET_OR_STRING_TRAIN = (
    Template(
        "{var} = set()\nfor {item} in {seq}:\n    {var}", ".add({item})\n",
        '{var} = ""\nfor {item} in {seq}:\n    {var}', " += {item}\n",
    ),
    Template(
        "{var} = set()\n{aux} = 0\nfor {item} in {seq}:\n    {aux} += 1\n    {var}",
        ".add({item})\n",
        '{var} = ""\n{aux} = 0\nfor {item} in {seq}:\n    {aux} += 1\n    {var}',
        " += {item}\n",
    ),
    Template(
        "{var} = set()\nif {aux}:\n    {var}", ".add({aux})\n",
        '{var} = ""\nif {aux}:\n    {var}', " += {aux}\n",
    ),
)  # fmt: skip
_SET_OR_STRING_TEST = (
    Template(
        "{var} = set()\nwhile {seq}:\n    {item} = {seq}.pop()\n    {var}", ".add({item})\n",
        '{var} = ""\nwhile {seq}:\n    {item} = {seq}.pop()\n    {var}', " += {item}\n",
    ),
    Template(
        "{var} = set()\n{aux} = []\nfor {item} in {seq}:\n    {aux}.append({item})\n    {var}",
        ".add({item})\n",
        '{var} = ""\n{aux} = []\nfor {item} in {seq}:\n    {aux}.append({item})\n    {var}',
        " += {item}\n",
    ),
)  # fmt: skip

set_or_string = Task(
    name="set_or_string",
    description='a variable set to set() is extended with .add, one set to "" with +=',
    train=_SET_OR_STRING_TRAIN,
    test=_SET_OR_STRING_TEST,
    slots={"aux": pool("total", "count", "seen", "index", "size", "level", "offset")},
)

set_or_string_fixedvarname = Task(
    name="set_or_string_fixedvarname",
    description="set_or_string with the variable always named current",
    train=_SET_OR_STRING_TRAIN,
    test=_SET_OR_STRING_TEST,
    slots={
        "var": pool("current"),
        "aux": pool("total", "count", "seen", "index", "size", "level", "offset"),
    },
)

var_swap = Task(
    name="var_swap",
    description="in a swap 'a, b = b,' the next name is the other one, a",
    train=(
        Template("{var}, {var2} = {var2},", " {var}\n", "{var2}, {var} = {var},", " {var2}\n"),
        Template(
            "{var} = {int}\n{var2} = {int2}\n{var}, {var2} = {var2},", " {var}\n",
            "{var} = {int}\n{var2} = {int2}\n{var2}, {var} = {var},", " {var2}\n",
        ),
        Template(
            "if {var} > {var2}:\n    {var}, {var2} = {var2},", " {var}\n",
            "if {var} > {var2}:\n    {var2}, {var} = {var},", " {var2}\n",
        ),
    ),
    test=(
        # The targets share ' self' (and perhaps '.'): the shared tokens move into the prompts.
        Template(
            "self.{attr}, self.{attr2} = self.{attr2},", " self.{attr}\n",
            "self.{attr2}, self.{attr} = self.{attr},", " self.{attr2}\n",
            contexts=("method",),
        ),
        Template(
            "while {var2}:\n    {var}, {var2} = {var2},", " {var} % {var2}\n",
            "while {var}:\n    {var2}, {var} = {var},", " {var2} % {var}\n",
        ),
        Template(
            "for {item} in {seq}:\n    {var}, {var2} = {var2},", " {var}\n",
            "for {item} in {seq}:\n    {var2}, {var} = {var},", " {var2}\n",
        ),
    ),
    # Attributes whose '.name' starts with a '.x'-style token in the stdlib BPE, so that after
    # the shared ' self' moves into the prompt the contrast is e.g. '.name' vs '.w'.
    slots={
        "attr": pool(
            "name", "path", "value", "count", "state", "mode", "first", "tail", "lower", "width",
            "current",
        )
    },
)  # fmt: skip

var_if = Task(
    name="var_if",
    description="after 'if', recall the variable assigned on the line before",
    train=(
        Template(
            "{var} = {func}()\nif", " {var} is None:\n",
            "{var2} = {func}()\nif", " {var2} is None:\n",
            a_suffix="    {var} = {int}\n", b_suffix="    {var2} = {int}\n",
        ),
        Template(
            "{aux} = {int}\n{var} = {func}({aux})\nif", " {var}:\n",
            "{aux} = {int}\n{var2} = {func}({aux})\nif", " {var2}:\n",
            a_suffix="    {func}({var})\n", b_suffix="    {func}({var2})\n",
        ),
        Template(
            '{var} = {seq}.get("{word}")\nif', " {var} is not None:\n",
            '{var2} = {seq}.get("{word}")\nif', " {var2} is not None:\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
    ),
    test=(
        Template(
            "{var} = self.{attr}\nif", " {var}:\n", "{var2} = self.{attr}\nif", " {var2}:\n",
            a_suffix="    return {var}\n", b_suffix="    return {var2}\n", contexts=("method",),
        ),
        Template(
            "for {item} in {seq}:\n    {var} = {func}({item})\n    if", " {var}:\n",
            "for {item} in {seq}:\n    {var2} = {func}({item})\n    if", " {var2}:\n",
            a_suffix="        break\n", b_suffix="        break\n",
        ),
    ),
    slots={"aux": pool("total", "count", "limit", "size", "level", "offset")},
)  # fmt: skip

TASKS = (set_or_string, set_or_string_fixedvarname, var_swap, var_if)
