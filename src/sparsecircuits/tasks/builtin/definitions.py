"""Tasks about with-statements, lambdas and function definitions."""

from __future__ import annotations

from sparsecircuits.tasks.base import Task, Template
from sparsecircuits.tasks.slots import pool

# A def nested in a function or class would change what the task is about: top level only.
MODULE = ("module",)
# Lock names: none starts with 'o', so ' open' and ' {lock}' always differ in the first token.
LOCKS = pool("lock", "_lock", "mutex", "guard", "rlock", "sem", "cond", "latch")

with_as = Task(
    name="with_as",
    description="a context manager that yields a value is followed by ' as'; others by ':'",
    # Prompts stop inside the call: ')' + ':\n' is one token ('):\n') in a stdlib BPE, so a
    # prompt ending in ')' could only ever continue with ' as' and would give the answer away.
    train=(
        Template(
            "with open({var}", ") as {item}:\n", "with contextlib.suppress({exc}", "):\n",
            a_suffix="    {item}.read()\n", b_suffix="    pass\n",
        ),
        Template(
            "with zipfile.ZipFile({var}", ") as {item}:\n",
            "with contextlib.redirect_stdout({var}", "):\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
        Template(
            "with gzip.open({var}", ") as {item}:\n",
            "with contextlib.redirect_stderr({var}", "):\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
    ),
    test=(
        Template(
            "with os.scandir({var}", ") as {item}:\n", "with self.assertRaises({exc}", "):\n",
            a_suffix="    pass\n", b_suffix="    pass\n", contexts=("method",),
        ),
        Template(
            "with tempfile.NamedTemporaryFile(dir={var}", ") as {item}:\n",
            "with self.subTest({var}={var}", "):\n",
            a_suffix="    pass\n", b_suffix="    pass\n", contexts=("method",),
        ),
    ),
)  # fmt: skip

with_open = Task(
    name="with_open",
    description="after 'with', use the resource set up above: open(path) vs the lock",
    train=(
        Template(
            '{var} = "{file}.{ext}"\n{aux} = {int}\nwith', " open({var}) as {item}:\n",
            "{lock} = threading.Lock()\n{aux} = {int}\nwith", " {lock}:\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
        Template(
            '{var} = os.path.join({aux}, "{file}.{ext}")\nwith', " open({var}) as {item}:\n",
            "{lock} = threading.RLock()\nwith", " {lock}:\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
        Template(
            'self.{attr} = "{file}.{ext}"\nwith', " open(self.{attr}) as {item}:\n",
            "self.{lock} = threading.Lock()\nwith", " self.{lock}:\n",
            a_suffix="    pass\n", b_suffix="    pass\n", contexts=("method",),
        ),
    ),
    test=(
        Template(
            '{var} = Path({aux}) / "{file}.{ext}"\nwith', " open({var}) as {item}:\n",
            "{lock} = multiprocessing.Lock()\nwith", " {lock}:\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
        Template(
            "{var} = tempfile.mktemp()\nwith", ' open({var}, "{mode}") as {item}:\n',
            "{lock} = threading.Semaphore({int})\nwith", " {lock}:\n",
            a_suffix="    pass\n", b_suffix="    pass\n",
        ),
    ),
    slots={"lock": LOCKS},
)  # fmt: skip

lambda_func = Task(
    name="lambda_func",
    description="a lambda's parameters end with ':'; a def's parameters with ')'",
    train=(
        Template(
            "{func} = lambda {var}", ": {var} + 1\n", "def {func}({var}", "):\n",
            b_suffix="    return {var} + 1\n",
        ),
        Template(
            "{func} = lambda {var}, {var2}", ": {var} * {var2}\n",
            "def {func}({var}, {var2}", "):\n", b_suffix="    return {var} * {var2}\n",
        ),
        Template(
            "{seq} = []\n{func} = lambda {item}", ": {seq}.append({item})\n",
            "{seq} = []\ndef {func}({item}", "):\n", b_suffix="    {seq}.append({item})\n",
        ),
    ),
    test=(
        Template(
            "{var} = sorted({seq}, key=lambda {item}", ": {item}.{attr})\n",
            "def {func}({item}", "):\n", b_suffix="    return {item}.{attr}\n",
        ),
        Template(
            "{func} = lambda {var}={int}", ": {var}\n", "def {func}({var}={int}", "):\n",
            b_suffix="    return {var}\n",
        ),
    ),
)  # fmt: skip

class_init = Task(
    name="class_init",
    description="a def inside a class takes self first; a module-level def does not",
    train=(
        Template(
            "class {cls}:\n    def {method}", "(self):\n", "def {method}", "():\n",
            a_suffix="        pass\n", b_suffix="    pass\n", contexts=MODULE,
        ),
        Template(
            "class {cls}({cls2}):\n    {attr} = {int}\n\n    def {method}", "(self):\n",
            "{attr} = {int}\n\n\ndef {method}", "():\n",
            a_suffix="        return self.{attr}\n", b_suffix="    return {attr}\n",
            contexts=MODULE,
        ),
        Template(
            'class {cls}:\n    """{text}."""\n\n    def {method}', "(self):\n",
            '"""{text}."""\n\n\ndef {method}', "():\n",
            a_suffix="        pass\n", b_suffix="    pass\n", contexts=MODULE,
        ),
    ),
    test=(
        Template(
            "class {cls}(object):\n    def __init__(self):\n        self.{attr} = None\n\n"
            "    def {method}", "(self):\n",
            "{attr} = None\n\n\ndef {method}", "():\n",
            a_suffix="        return self.{attr}\n", b_suffix="    return {attr}\n",
            contexts=MODULE,
        ),
        Template(
            "@dataclass\nclass {cls}:\n    {attr}: int = {int}\n\n    def {method}", "(self):\n",
            "{attr}: int = {int}\n\n\ndef {method}", "():\n",
            a_suffix="        pass\n", b_suffix="    pass\n", contexts=MODULE,
        ),
    ),
)  # fmt: skip

TASKS = (with_as, with_open, lambda_func, class_init)
