"""Adapters that let red-team tools score with our circuit telemetry.

garak (``garak_detector.py``): a detector, ``sparsecircuits.CircuitTelemetry``, that runs in
garak's own environment (its pins conflict with ours, so it imports only the standard library
and garak) and asks a running ``sparsecircuits serve`` over HTTP. garak 0.17.1 loads plugins
only from its own package, so :func:`install_garak_detector` copies the file into that
environment's ``garak/detectors/`` as ``sparsecircuits.py``; garak rebuilds its plugin cache on
the next start, seeing a new module. Then, in that environment::

    SPARSECIRCUITS_USER_KEY=... SPARSECIRCUITS_OPERATOR_KEY=... \\
        garak -d sparsecircuits.CircuitTelemetry ...

(``SPARSECIRCUITS_URL``, default ``http://127.0.0.1:8000``; ``SPARSECIRCUITS_FAMILY``, default
every monitored family). docs/redteam.md, section "garak", has a whole run.

PyRIT (``pyrit_scorer.py``): ``CircuitTelemetryScorer``, a PyRIT 1.1.0 true/false scorer (the
``[pyrit]`` extra; PyRIT fits our pins), in-process or against a server. promptfoo
(``promptfoo_provider.py``): a ``file://`` Python provider, run by promptfoo with
``PROMPTFOO_PYTHON`` set to our interpreter, that continues each prompt with our model and
returns the telemetry verdict as metadata. docs/redteam.md, section "PyRIT and promptfoo".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sparsecircuits.errors import InputError

GARAK_DETECTOR = "sparsecircuits.CircuitTelemetry"  # garak's name for it: module.Class
GARAK_DETECTOR_SOURCE = Path(__file__).with_name("garak_detector.py")
_FIND_GARAK = "import importlib.util as u; s = u.find_spec('garak'); print(s.origin if s else '')"


def garak_package_dir(python: str | os.PathLike) -> Path:
    """The ``garak`` package directory of the environment whose interpreter is ``python``
    (found without importing garak). A one-line InputError when there is none."""
    try:
        res = subprocess.run([str(python), "-c", _FIND_GARAK], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        raise InputError(f"{python}: cannot run this interpreter ({type(err).__name__})") from None
    origin = res.stdout.strip()
    if res.returncode != 0 or not origin:
        raise InputError(f"{python}: garak is not installed in this environment")
    return Path(origin).parent


def install_garak_detector(python: str | os.PathLike) -> Path:
    """Copy the detector into the garak of ``python``'s environment as
    ``garak/detectors/sparsecircuits.py`` and return that path. Atomic (a temporary file renamed
    into place) and idempotent; an unchanged copy is left alone, so garak's plugin cache stays
    valid."""
    dest = garak_package_dir(python) / "detectors" / "sparsecircuits.py"
    src = GARAK_DETECTOR_SOURCE.read_bytes()
    if dest.is_file() and dest.read_bytes() == src:
        return dest
    if not dest.parent.is_dir():
        raise InputError(f"{dest.parent}: no detectors directory (is this garak?)")
    fd, tmp = tempfile.mkstemp(prefix=".sparsecircuits-", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(src)
        shutil.copymode(GARAK_DETECTOR_SOURCE, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
