"""Tasks about literals: which quote or bracket is open, and how deep."""

from __future__ import annotations

from sparsecircuits.tasks.base import Task, Template

single_double_quote = Task(
    name="single_double_quote",
    description="close a string with the quote it was opened with (\" vs ')",
    train=(
        Template('{var} = "{text}', '"\n', "{var} = '{text}", "'\n"),
        Template('print("{text}', '")\n', "print('{text}", "')\n"),
        Template('raise {exc}("{text}', '")\n', "raise {exc}('{text}", "')\n"),
        Template(
            '{var} = {func}({var2}, "{text}', '")\n', "{var} = {func}({var2}, '{text}", "')\n"
        ),
    ),
    test=(
        Template('{var}[{int}] = "{text}', '"\n', "{var}[{int}] = '{text}", "'\n"),
        Template('logger.warning("{text}', '")\n', "logger.warning('{text}", "')\n"),
        Template(
            'if {var} == "{text}', '":\n', "if {var} == '{text}", "':\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
    ),
)  # fmt: skip

fstring_brace = Task(
    name="fstring_brace",
    description="inside an f-string field, close the field with } rather than the string",
    train=(
        Template('{var} = f"{word} {{{var2}', '}"\n', '{var} = "{word} {var2}', '"\n'),
        Template('print(f"{word}: {{{var2}', '}")\n', 'print("{word}: {var2}', '")\n'),
        Template(
            'raise {exc}(f"{text} {{{var2}', '}")\n', 'raise {exc}("{text} {var2}', '")\n'
        ),
    ),
    test=(
        Template('logger.info(f"{word} {{{var2}', '}")\n', 'logger.info("{word} {var2}', '")\n'),
        Template(
            'return f"{word}={{{var2}', '}"\n', 'return "{word}={var2}', '"\n',
            contexts=("function", "method"),
        ),
        Template('{var}.append(f"{{{var2}', '}")\n', '{var}.append("{var2}', '")\n'),
    ),
)  # fmt: skip

bracket_counting = Task(
    name="bracket_counting",
    description="close a list literal: ]] when nested, ] when flat (list nesting depth)",
    train=(
        Template(
            "{var} = [[{int}, {int2}], [{int3}, {int4}", "]]\n",
            "{var} = [{int}, {int2}, {int3}, {int4}", "]\n",
        ),
        Template(
            "{var} = {func}([[{item}, {item2}], [{item3}, {item4}", "]])\n",
            "{var} = {func}([{item}, {item2}, {item3}, {item4}", "])\n",
        ),
        Template(
            "for {item} in [[{int}, {int2}], [{int3}, {int4}", "]]:\n",
            "for {item} in [{int}, {int2}, {int3}, {int4}", "]:\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
    ),
    test=(
        Template(
            "return [[{var}, {var2}], [{var3}, {var4}", "]]\n",
            "return [{var}, {var2}, {var3}, {var4}", "]\n",
            contexts=("function", "method"),
        ),
        Template(
            "{var}.extend([[{int}, {int2}, {int3}], [{int4}", "]])\n",
            "{var}.extend([{int}, {int2}, {int3}, {int4}", "])\n",
        ),
        Template(
            "{var} = [[{int}], [{int2}], [{int3}", "]]\n",
            "{var} = [{int}, {int2}, {int3}", "]\n",
        ),
    ),
)  # fmt: skip

bracket_brace = Task(
    name="bracket_brace",
    description="close a collection literal with the bracket that opened it (] vs })",
    train=(
        Template(
            "{var} = [{int}, {int2}, {int3}", "]\n", "{var} = {{{int}, {int2}, {int3}", "}\n"
        ),
        Template(
            "{var} = {func}([{item}, {item2}", "])\n", "{var} = {func}({{{item}, {item2}", "})\n"
        ),
        Template(
            "for {item} in [{var}, {var2}, {var3}", "]:\n",
            "for {item} in {{{var}, {var2}, {var3}", "}:\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
    ),
    test=(
        Template(
            "return [{int}, {int2}", "]\n", "return {{{int}, {int2}", "}\n",
            contexts=("function", "method"),
        ),
        Template(
            "if {var} in [{int}, {int2}, {int3}", "]:\n",
            "if {var} in {{{int}, {int2}, {int3}", "}:\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
    ),
)  # fmt: skip

final_kwarg = Task(
    name="final_kwarg",
    description="after a keyword argument the next argument is a keyword too: = vs )",
    train=(
        Template(
            "{func}({var}, {attr}={int}, {var2}", "={int2})\n",
            "{func}({var}, {attr}, {var2}", ")\n",
        ),
        Template(
            "{var} = {func}({var2}, {attr}={var3}, {attr2}", "={int})\n",
            "{var} = {func}({var2}, {var3}, {attr2}", ")\n",
        ),
        Template(
            "self.{attr} = {cls}({var}, {attr2}={int}, {attr3}", "={int2})\n",
            "self.{attr} = {cls}({var}, {int}, {attr3}", ")\n",
            contexts=("method",),
        ),
    ),
    test=(
        Template(
            'return {func}({var}, {attr}="{word}", {attr2}', '="{word2}")\n',
            'return {func}({var}, "{word}", {attr2}', ")\n",
            contexts=("function", "method"),
        ),
        Template(
            "{var}.{method}({var2}, {attr}={int}, {attr2}", "={int2})\n",
            "{var}.{method}({var2}, {int}, {attr2}", ")\n",
        ),
    ),
)  # fmt: skip

TASKS = (single_double_quote, bracket_counting, fstring_brace, bracket_brace, final_kwarg)
