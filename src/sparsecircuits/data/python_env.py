"""The ``python-env`` corpus: the standard library plus the ``.py`` files of the packages that
this project's own environment installs, at the versions ``constraints.txt`` pins.

Nothing is downloaded: the packages are the ones ``make demo`` / ``make test`` install, found
through their installed metadata (``RECORD``), so the corpus is the same on every machine that
followed the README. The recipe, in order:

1. every ``.py`` file of the standard library (exactly the ``stdlib`` corpus's files) and of each
   package in :data:`PACKAGES` (a package not installed, at another version, or with files
   missing is a one-line error naming it and the command that installs it);
2. files that are not UTF-8 text are skipped, and package files that are generated or
   data-like are dropped by the measured rules of :mod:`sparsecircuits.data.filters`
   (standard-library files are kept whole, so the old held-out files all stay);
3. exact duplicates (same content hash) are collapsed to one file *before* the split; a group
   with any member on the validation side goes to validation, so no held-out text reaches
   training (near-duplicates, e.g. two versions of a vendored module, are not detected);
4. the split: a standard-library file keeps the side it has in the ``stdlib`` corpus (the same
   hash of its path); a package file is split by its path with any vendoring prefix removed
   (``pip/_vendor/six.py`` -> ``six.py``), so vendored copies of one module fall on one side
   where the vendored path keeps the module's own path;
5. files whose contents depend on the installed build, not the pinned version
   (:data:`BUILD_SPECIFIC`), are left out. The corpus is then the same for the same Python
   (its standard library) and the same pins.

:func:`manifest` records every package with its version and licence and each filter's and the
deduplication's counts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsecircuits.data.corpus import (
    Corpus,
    SourceFile,
    check_bytes,
    is_val_key,
    list_py_files,
    stdlib_dir,
)
from sparsecircuits.data.filters import DEFAULT_RULES, RULES, FileRules, drop_reason
from sparsecircuits.errors import DataError

NAME = "python-env"
RECIPE_VERSION = 1
# Every distribution pinned in constraints.txt when recipe version 1 was fixed that ships .py
# files, at its pinned version (a test keeps the two in step). pip and setuptools are left out:
# their versions come with the Python build, not with our pins. Pins added later (the [hf]
# extra's) are not in the corpus, so the corpus stays what it was.
PACKAGES: dict[str, str] = {
    "altair": "6.3.0",
    "annotated-doc": "0.0.7",
    "annotated-types": "0.8.0",
    "anyio": "4.16.0",
    "attrs": "26.1.0",
    "certifi": "2026.10.19.post1",
    "charset-normalizer": "3.5.2",
    "click": "8.5.1",
    "filelock": "4.2.12",
    "fsspec": "2026.9.0",
    "greenlet": "3.5.6",
    "h11": "0.16.0",
    "hf-xet": "1.8.0",
    "httpcore2": "2.16.2",
    "httpx2": "2.16.2",
    "huggingface_hub": "2.4.0",
    "hypothesis": "6.170.15",
    "idna": "3.20",
    "iniconfig": "2.3.1",
    "itsdangerous": "2.2.0",
    "Jinja2": "3.1.6",
    "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1",
    "markdown-it-py": "4.3.0",
    "MarkupSafe": "3.0.4",
    "mdurl": "0.1.2",
    "mpmath": "1.3.0",
    "narwhals": "2.29.0",
    "networkx": "3.6.1",
    "numpy": "2.4.6",
    "packaging": "26.3",
    "pandas": "3.1.1",
    "pillow": "13.0.0",
    "playwright": "1.65.2",
    "plotly": "7.1.0",
    "pluggy": "1.7.0",
    "protobuf": "7.36.2",
    "pyarrow": "26.0.1",
    "pydantic": "2.14.4",
    "pydantic_core": "2.50.5",
    "pydeck": "0.9.3",
    "Pygments": "2.21.0",
    "pytest": "9.2.0",
    "python-dateutil": "4.0.0",
    "python-multipart": "0.0.34",
    "PyYAML": "6.0.4",
    "referencing": "0.37.0",
    "requests": "2.34.2",
    "rich": "15.0.0",
    "rpds-py": "2026.9.1",
    "ruff": "0.17.6",
    "safetensors": "0.8.0",
    "shellingham": "1.5.4",
    "sortedcontainers": "2.4.0",
    "starlette": "1.10.0",
    "streamlit": "1.67.0",
    "sympy": "1.14.0",
    "tokenizers": "0.23.3",
    "torch": "2.13.0",
    "tqdm": "4.70.1",
    "truststore": "0.10.5",
    "typer": "0.29.2",
    "typing-inspection": "0.4.5",
    "typing_extensions": "4.16.0",
    "tzdata": "2026.6",
    "urllib3": "2.8.0",
    "uvicorn": "0.54.0",
    "watchdog": "7.1.0",
    "websockets": "17.4",
}
# Directory names under which packages keep copies of other projects.
VENDOR_DIRS = frozenset(
    {"_vendor", "vendor", "_vendored", "vendored", "extern", "_extern", "third_party"}
)
# The stdlib corpus's default: its held-out files stay held out only at the same fraction.
STDLIB_VAL_FRACTION = 0.02
# Files whose contents depend on the build installed (CPU or CUDA wheel, the machine's
# architecture), not on the pinned version: left out so the corpus is the same on any machine.
BUILD_SPECIFIC = frozenset({"torch/version.py", "numpy/__config__.py"})
STDLIB_PREFIX = "stdlib/"
SITE_PREFIX = "site-packages/"


@dataclass(frozen=True)
class _Candidate:
    source: SourceFile
    package: str  # "stdlib" or the distribution's name
    split_key: str
    digest: str
    size: int


def load_python_env(
    *,
    val_fraction: float = 0.02,
    packages: dict[str, str] | None = None,
    search_path: list[str] | None = None,
    stdlib_root: Path | None = None,
    rules: FileRules = DEFAULT_RULES,
) -> Corpus:
    """Build the corpus (see the module docstring); its ``manifest`` attribute records how.

    ``val_fraction`` must be :data:`STDLIB_VAL_FRACTION` (the stdlib corpus's split is kept).

    ``packages``: distribution name -> required version (default :data:`PACKAGES`);
    ``search_path``: where to look for installed distributions (default ``sys.path``);
    ``stdlib_root``: the standard library's directory (default :func:`stdlib_dir`).
    """
    if val_fraction != STDLIB_VAL_FRACTION:
        raise DataError(
            f"corpus {NAME} keeps the stdlib corpus's split, so val_fraction must be "
            f"{STDLIB_VAL_FRACTION} (got {val_fraction})"
        )
    packages = PACKAGES if packages is None else packages
    stdlib_root = stdlib_dir() if stdlib_root is None else Path(stdlib_root)
    skipped: Counter[str] = Counter()
    dropped: dict[str, Counter[str]] = {}
    candidates: list[_Candidate] = []
    stdlib_count = 0
    for source in list_py_files(stdlib_root, exclude_parts=frozenset(_STDLIB_EXCLUDED)):
        data = _read(source.path, "stdlib", "")
        reason = check_bytes(data)
        if reason:
            skipped[reason] += 1
            continue
        stdlib_count += 1
        rel = STDLIB_PREFIX + source.rel
        candidates.append(_candidate(source.path, rel, "stdlib", source.rel, data))
    package_rows = []
    for name, version in sorted(packages.items(), key=lambda kv: kv[0].lower()):
        dist = _distribution(name, version, search_path)
        drops: Counter[str] = Counter()
        files = kept = kept_bytes = 0
        for rel_in_site, path in _package_files(dist, name):
            files += 1
            if rel_in_site in BUILD_SPECIFIC:
                drops["build_specific"] += 1
                continue
            data = _read(path, name, version)
            reason = check_bytes(data) or drop_reason(data, rules)
            if reason:
                drops[reason] += 1
                continue
            kept += 1
            kept_bytes += len(data)
            rel = SITE_PREFIX + rel_in_site
            candidates.append(_candidate(path, rel, name, _unvendored(rel_in_site), data))
        dropped[name] = drops
        package_rows.append(
            {
                "name": name,
                "version": dist.version,
                "license": license_of(dist),
                "py_files": files,
                "kept_files": kept,
                "kept_bytes": kept_bytes,
                "dropped": dict(sorted(drops.items())),
            }
        )
    kept_files, dedup = _deduplicate(candidates, val_fraction=val_fraction)
    train = [c.source for c in kept_files if not _is_val(c, val_fraction)]
    val = [c.source for c in kept_files if _is_val(c, val_fraction)]
    if not train or not val:
        raise DataError(f"corpus {NAME}: the split left no train or no validation files")
    corpus = Corpus(name=NAME, root=stdlib_root, train=train, val=val, skipped=dict(skipped))
    corpus._digests.update({c.source.rel: (c.size, c.digest) for c in kept_files})
    filter_totals: Counter[str] = Counter()
    for counts in dropped.values():
        filter_totals.update(counts)
    corpus.manifest = {
        "corpus": NAME,
        "recipe_version": RECIPE_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "val_fraction": val_fraction,
        "rules": {f.name: getattr(rules, f.name) for f in rules.__dataclass_fields__.values()},
        "stdlib": {"py_files": stdlib_count, "skipped": dict(sorted(skipped.items()))},
        "packages": package_rows,
        "filters": {
            rule: filter_totals.get(rule, 0)
            for rule in (*RULES, "build_specific", "non_utf8", "binary")
        },
        "dedup": dedup,
        "split": _split_summary(kept_files, val_fraction),
        "fingerprint": corpus.fingerprint(),
    }
    return corpus


# The stdlib corpus's own exclusions (package-install directories), kept identical.
_STDLIB_EXCLUDED = ("site-packages", "dist-packages")


def license_of(dist: md.Distribution) -> str:
    """The licence a distribution declares: its SPDX expression, its License field's first
    line, or its licence classifiers; "unknown" when it declares none."""
    meta = dist.metadata
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        return expression  # SPDX: whole, never cut
    field = (meta.get("License") or "").strip()
    # A one-line License field names the licence; a longer one holds the licence's text.
    one_line = field and "\n" not in field and len(field) <= 80
    if one_line and field.upper() != "UNKNOWN" and not field.lower().startswith("copyright"):
        return field
    licences = [
        c.split("::")[-1].strip()
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    return "; ".join(licences) or "unknown"


def _install_hint(name: str, version: str) -> str:
    return f"run `make venv` or `pip install -c constraints.txt {name}=={version}`"


def _distribution(name: str, version: str, search_path: list[str] | None) -> md.Distribution:
    found = md.distributions(name=name, path=search_path) if search_path else None
    try:
        dist = next(iter(found)) if found is not None else md.distribution(name)
    except (StopIteration, md.PackageNotFoundError):
        raise DataError(
            f"corpus {NAME}: package {name} is not installed in this environment; "
            f"{_install_hint(name, version)}"
        ) from None
    installed = dist.version.split("+", 1)[0]  # "2.13.0+cpu" is the pinned 2.13.0
    if installed != version:
        raise DataError(
            f"corpus {NAME}: package {name} is {dist.version} but the recipe pins {version}; "
            f"{_install_hint(name, version)}"
        )
    return dist


def _package_files(dist: md.Distribution, name: str) -> list[tuple[str, Path]]:
    """(path relative to site-packages, absolute path) of each .py file the package installed."""
    if dist.files is None:
        raise DataError(
            f"corpus {NAME}: package {name} has no RECORD of its files; reinstall it: "
            f"{_install_hint(name, dist.version)}"
        )
    out = []
    for entry in dist.files:
        rel = entry.as_posix()
        if not rel.endswith(".py") or rel.startswith("../") or "/../" in rel:
            continue  # scripts installed outside site-packages are not the package's code
        out.append((rel, Path(dist.locate_file(entry))))
    return sorted(out)


def _read(path: Path, package: str, version: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        if package == "stdlib":
            raise DataError(f"corpus {NAME}: standard-library file {path} is unreadable") from None
        raise DataError(
            f"corpus {NAME}: {path} of package {package} is missing or unreadable (was its "
            f"directory deleted?); reinstall it: {_install_hint(package, version)}"
        ) from None


def _candidate(path: Path, rel: str, package: str, split_key: str, data: bytes) -> _Candidate:
    return _Candidate(
        source=SourceFile(path=path, rel=rel),
        package=package,
        split_key=split_key,
        digest=hashlib.sha256(data).hexdigest(),
        size=len(data),
    )


def _unvendored(rel: str) -> str:
    """The path after the last vendoring directory (``a/_vendor/six.py`` -> ``six.py``)."""
    parts = rel.split("/")
    last = max((i for i, p in enumerate(parts[:-1]) if p in VENDOR_DIRS), default=-1)
    return "/".join(parts[last + 1 :])


def _is_val(c: _Candidate, val_fraction: float) -> bool:
    return is_val_key(c.split_key, val_fraction=val_fraction)


def _deduplicate(
    candidates: list[_Candidate], *, val_fraction: float
) -> tuple[list[_Candidate], dict[str, Any]]:
    """One file per content hash. A group with any member on the validation side keeps a
    validation member (a stdlib one first), so no held-out text reaches training; otherwise a
    stdlib file, else the first by path. Returns the kept files sorted by path."""
    groups: dict[str, list[_Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.digest, []).append(c)

    def rank(c: _Candidate) -> tuple[bool, bool, str]:
        # Validation first (a group with any held-out member stays held out), then stdlib.
        return not _is_val(c, val_fraction), c.package != "stdlib", c.source.rel

    kept = []
    removed = removed_bytes = train_to_val = 0
    for digest in sorted(groups):
        group = groups[digest]
        best = min(group, key=rank)
        kept.append(best)
        removed += len(group) - 1
        removed_bytes += sum(c.size for c in group) - best.size
        if _is_val(best, val_fraction):
            train_to_val += sum(1 for c in group if not _is_val(c, val_fraction))
    dedup = {
        "duplicate_groups": sum(1 for g in groups.values() if len(g) > 1),
        "files_removed": removed,
        "bytes_removed": removed_bytes,
        "train_files_equal_to_a_val_file": train_to_val,
    }
    return sorted(kept, key=lambda c: c.source.rel), dedup


def _split_summary(kept: list[_Candidate], val_fraction: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in ("train", "val"):
        files = [c for c in kept if _is_val(c, val_fraction) == (side == "val")]
        out[side] = {
            "files": len(files),
            "bytes": sum(c.size for c in files),
            "stdlib_files": sum(1 for c in files if c.package == "stdlib"),
        }
    return out


def split_key_of(rel: str) -> str:
    """The key a ``python-env`` document's side of the split is decided by."""
    if rel.startswith(STDLIB_PREFIX):
        return rel[len(STDLIB_PREFIX) :]
    return _unvendored(rel.removeprefix(SITE_PREFIX))


_NORMALIZE = re.compile(r"[-_.]+")


def normalize_name(name: str) -> str:
    """PEP 503 name normalisation (``PyYAML`` -> ``pyyaml``, ``typing_extensions`` -> ...)."""
    return _NORMALIZE.sub("-", name).lower()
