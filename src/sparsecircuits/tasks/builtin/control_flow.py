"""Tasks about statements and blocks: loop and branch keywords, colons and indentation."""

from __future__ import annotations

from sparsecircuits.tasks.base import Task, Template
from sparsecircuits.tasks.slots import pool

IN_FUNCTION = ("function", "method")
# Loop counters: short names, as in real code (distinct initials keep pairs apart).
LOOP_INDEX = pool("i", "j", "k", "n", "idx", "pos", "step", "count", "offset", "row", "col")

while_return_true = Task(
    name="while_return_true",
    description="after True: ':' when the keyword was while, a newline when it was return",
    train=(
        Template(
            "{var} = {func}({int})\nwhile True", ":\n",
            "{var} = {func}({int})\nreturn True", "\n",
            a_suffix="    break\n", contexts=IN_FUNCTION,
        ),
        Template(
            "if {var} is None:\n    while True", ":\n",
            "if {var} is None:\n    return True", "\n",
            a_suffix="        break\n", contexts=IN_FUNCTION,
        ),
        Template(
            "for {item} in {seq}:\n    {func}({item})\nwhile True", ":\n",
            "for {item} in {seq}:\n    {func}({item})\nreturn True", "\n",
            a_suffix="    break\n", contexts=IN_FUNCTION,
        ),
    ),
    test=(
        Template(
            "try:\n    {func}()\nexcept {exc}:\n    while True", ":\n",
            "try:\n    {func}()\nexcept {exc}:\n    return True", "\n",
            a_suffix="        break\n", contexts=IN_FUNCTION,
        ),
        Template(
            "with {var}:\n    while True", ":\n", "with {var}:\n    return True", "\n",
            a_suffix="        break\n", contexts=IN_FUNCTION,
        ),
    ),
)  # fmt: skip

for_while = Task(
    name="for_while",
    description="after the loop variable: ' in' for a for loop, ' <' for a while loop",
    train=(
        Template(
            "{var} = {int}\nfor {idx}", " in {seq}:\n", "{var} = {int}\nwhile {idx}", " < {var}:\n",
            a_suffix="    pass\n", b_suffix="    {idx} += 1\n",
        ),
        Template(
            "{seq} = {func}()\nfor {idx}", " in range(len({seq})):\n",
            "{seq} = {func}()\nwhile {idx}", " < len({seq}):\n",
            a_suffix="    pass\n", b_suffix="    {idx} += 1\n",
        ),
        Template(
            "{idx} = 0\n{var} = {func}({int})\nfor {idx}", " in range({var}):\n",
            "{idx} = 0\n{var} = {func}({int})\nwhile {idx}", " < {var}:\n",
            a_suffix="    pass\n", b_suffix="    {idx} += 1\n",
        ),
    ),
    test=(
        Template(
            "if {var}:\n    for {idx}", " in range({var}):\n",
            "if {var}:\n    while {idx}", " < {var}:\n",
            a_suffix="        pass\n", b_suffix="        {idx} += 1\n",
        ),
        Template(
            "{var} = []\nfor {idx}", " in range({int}):\n",
            "{var} = []\nwhile {idx}", " < {int}:\n",
            a_suffix="    {var}.append({idx})\n", b_suffix="    {idx} += 1\n",
        ),
    ),
    slots={"idx": LOOP_INDEX},
)  # fmt: skip

else_elif = Task(
    name="else_elif",
    description="after else comes ':'; after elif a condition starts",
    train=(
        Template(
            "if {var} > {int}:\n    {var2} = {int2}\nelse", ":\n",
            "if {var} > {int}:\n    {var2} = {int2}\nelif", " {var} < 0:\n",
            a_suffix="    {var2} = 0\n", b_suffix="    {var2} = 0\n",
        ),
        Template(
            "if not {var}:\n    return None\nelse", ":\n",
            "if not {var}:\n    return None\nelif", " {var} is None:\n",
            a_suffix="    return {var}\n", b_suffix="    return {var}\n", contexts=IN_FUNCTION,
        ),
        Template(
            'if {var} == "{word}":\n    {func}()\nelse', ":\n",
            'if {var} == "{word}":\n    {func}()\nelif', ' {var} == "{word2}":\n',
            a_suffix="    {func}()\n", b_suffix="    {func}()\n",
        ),
    ),
    test=(
        Template(
            "if isinstance({var}, str):\n    {var2} = {var}\nelse", ":\n",
            "if isinstance({var}, str):\n    {var2} = {var}\nelif", " isinstance({var}, bytes):\n",
            a_suffix="    {var2} = None\n", b_suffix="    {var2} = None\n",
        ),
        Template(
            "for {item} in {seq}:\n    if {item}:\n        {func}({item})\n    else", ":\n",
            "for {item} in {seq}:\n    if {item}:\n        {func}({item})\n    elif",
            " {item} is None:\n",
            a_suffix="        continue\n", b_suffix="        continue\n",
        ),
    ),
)  # fmt: skip

if_ternary = Task(
    name="if_ternary",
    description="an if inside an expression continues with ' else'; an if statement with ':'",
    train=(
        Template(
            "{var2} = {func}()\n{var} = {var2} if {var3}", " else None\n",
            "{var2} = {func}()\nif {var3}", ":\n",
            b_suffix="    {var} = {var2}\n",
        ),
        Template(
            "{var} = {int} if {var2} is None", " else {var2}\n", "if {var2} is None", ":\n",
            b_suffix="    {var} = {int}\n",
        ),
        Template(
            "return {var} if {var2}.{attr}", " else {int}\n", "if {var2}.{attr}", ":\n",
            b_suffix="    return {var}\n", contexts=IN_FUNCTION,
        ),
    ),
    test=(
        Template(
            "{func}({var} if {var2} in {seq}", " else {var3})\n", "if {var2} in {seq}", ":\n",
            b_suffix="    {func}({var})\n",
        ),
        Template(
            "self.{attr} = {var} if {var} is not None", " else {int}\n",
            "if {var} is not None", ":\n",
            b_suffix="    self.{attr} = {var}\n", contexts=("method",),
        ),
    ),
)  # fmt: skip

if_equals = Task(
    name="if_equals",
    description="a name after if is compared (' =='); at the start of a statement it is assigned",
    train=(
        Template("if {var}", " == {int}:\n", "{var}", " = {int}\n", a_suffix="    pass\n"),
        Template(
            "{var} = {func}()\nif {var}", ' == "{word}":\n', "{var} = {func}()\n{var}",
            ' = "{word}"\n', a_suffix="    {var} = None\n",
        ),
        Template(
            "for {item} in {seq}:\n    if {item}", " == {int}:\n",
            "for {item} in {seq}:\n    {item}", " = {int}\n", a_suffix="        break\n",
        ),
    ),
    test=(
        Template(
            "while {var}:\n    if {var2}", " == {int}:\n", "while {var}:\n    {var2}", " = {int}\n",
            a_suffix="        break\n",
        ),
        Template(
            "if {var} is None:\n    return\nif {var2}", " == {var}:\n",
            "if {var} is None:\n    return\n{var2}", " = {var}\n",
            a_suffix="    return\n", contexts=IN_FUNCTION,
        ),
    ),
)  # fmt: skip

indent_for = Task(
    name="indent_for",
    description="after a for header the next line is indented one level deeper; else not",
    train=(
        Template(
            "for {item} in {seq}:\n", "    {func}({item})\n",
            "{item} = {seq}[0]\n", "{func}({item})\n", contexts=IN_FUNCTION,
        ),
        Template(
            "for {idx} in range({int}):\n", "    {var}.append({idx})\n",
            "{idx} = {int}\n", "{var}.append({idx})\n", contexts=IN_FUNCTION,
        ),
        Template(
            "{var} = []\nfor {item} in {seq}:\n", "    {var}.append({item})\n",
            "{var} = []\n{item} = {seq}.pop()\n", "{var}.append({item})\n", contexts=IN_FUNCTION,
        ),
    ),
    test=(
        Template(
            "for {var}, {var2} in {seq}.items():\n", "    print({var}, {var2})\n",
            "{var}, {var2} = {seq}.popitem()\n", "print({var}, {var2})\n", contexts=IN_FUNCTION,
        ),
        Template(
            "for {idx}, {item} in enumerate({seq}):\n", "    {func}({idx}, {item})\n",
            "{idx}, {item} = 0, {seq}[0]\n", "{func}({idx}, {item})\n", contexts=IN_FUNCTION,
        ),
    ),
    slots={"idx": LOOP_INDEX},
)  # fmt: skip

enumerate_range = Task(
    name="enumerate_range",
    description="a tuple loop target 'for i, x in' implies enumerate; 'for i in' implies range",
    train=(
        Template(
            "for {idx}, {item} in", " enumerate({seq}):\n", "for {idx} in", " range(len({seq})):\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
        Template(
            "{seq} = {func}()\nfor {idx}, {item} in", " enumerate({seq}):\n",
            "{seq} = {func}()\nfor {idx} in", " range({int}):\n",
            a_suffix="    print({idx}, {item})\n", b_suffix="    print({idx})\n",
        ),
        Template(
            "{var} = 0\nfor {idx}, {item} in", " enumerate({seq}):\n",
            "{var} = 0\nfor {idx} in", " range({int}):\n",
            a_suffix="    {var} += {idx}\n", b_suffix="    {var} += {idx}\n",
        ),
    ),
    test=(
        Template(
            "{var} = [{item} for {idx}, {item} in", " enumerate({seq})]\n",
            "{var} = [{idx} for {idx} in", " range({int})]\n",
        ),
        Template(
            "if {seq}:\n    for {idx}, {item} in", " enumerate({seq}):\n",
            "if {seq}:\n    for {idx} in", " range(len({seq})):\n",
            a_suffix="        print({idx}, {item})\n", b_suffix="        print({idx})\n",
        ),
    ),
    slots={"idx": LOOP_INDEX},
)  # fmt: skip

TASKS = (
    while_return_true,
    for_while,
    else_elif,
    if_ternary,
    if_equals,
    indent_for,
    enumerate_range,
)
