"""The python-env corpus recipe: package discovery, filters, deduplication and the split, on a
small fake environment (real ``importlib.metadata`` distributions written to a temp dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsecircuits.data import load_corpus
from sparsecircuits.data.corpus import is_val_key
from sparsecircuits.data.filters import DEFAULT_RULES, drop_reason, literal_share
from sparsecircuits.data.python_env import PACKAGES, load_python_env, normalize_name
from sparsecircuits.errors import DataError
from tests.data.conftest import python_source

REPO = Path(__file__).resolve().parents[2]
VAL = 0.02  # python-env keeps the stdlib corpus's split fraction


def _key_on_side(prefix: str, *, val: bool, start: int = 0) -> str:
    """A module path ``prefix_N.py`` whose split key falls on the requested side."""
    i = start
    while is_val_key(f"{prefix}_{i}.py", val_fraction=VAL) != val:
        i += 1
    return f"{prefix}_{i}.py"


def _install(site: Path, name: str, version: str, files: dict[str, str], **meta: str) -> None:
    """Write a distribution as pip would: its files plus METADATA and RECORD in a dist-info."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in meta.items()]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    record = []
    for rel, text in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        record.append(f"{rel},,")
    record.append(f"{info.name}/METADATA,,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def env(tmp_path: Path) -> dict:
    """A stdlib of 30 modules and two packages, one vendoring a copy of a third module."""
    stdlib = tmp_path / "stdlib"
    names = [f"mod_{i}.py" for i in range(30)]
    for _ in range(3):  # three held-out stdlib files
        start = int(names[-1].split("_")[1].split(".")[0]) + 1 if "held" in names[-1] else 0
        names.append(_key_on_side("held", val=True, start=start))
    for i, name in enumerate(names):
        (stdlib / name).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / name).write_text(python_source(i))
    (stdlib / "site-packages").mkdir()
    (stdlib / "site-packages" / "ignored.py").write_text("x = 1\n")
    site = tmp_path / "site"
    alpha = {
        f"alpha/{_key_on_side('m', val=False, start=i * 50)}": python_source(100 + i)
        for i in range(8)
    }
    alpha["alpha/__init__.py"] = "from alpha.core import *\n"
    vendored = _key_on_side("six", val=True)
    alpha[f"alpha/_vendor/{vendored}"] = python_source(500) + "# vendored, patched\n"
    _install(site, "alpha", "1.0", alpha, License="MIT")
    beta = {f"beta/b_{i}.py": python_source(200 + i) for i in range(8)}
    beta["beta/__init__.py"] = "from alpha.core import *\n"  # same bytes as alpha's
    beta[vendored] = python_source(500)  # the upstream copy, top level
    _install(site, "beta", "2.0", beta, License_Expression="Apache-2.0")
    return {
        "stdlib": stdlib,
        "site": site,
        "packages": {"alpha": "1.0", "beta": "2.0"},
        "vendored": vendored,
    }


def _load(env: dict, **kw):
    kw.setdefault("packages", env["packages"])
    return load_python_env(
        val_fraction=VAL, search_path=[str(env["site"])], stdlib_root=env["stdlib"], **kw
    )


def test_manifest_lists_packages_versions_licences_and_is_deterministic(env: dict) -> None:
    first, second = _load(env), _load(env)
    assert json.dumps(first.manifest, sort_keys=True) == json.dumps(second.manifest, sort_keys=True)
    assert first.fingerprint() == second.fingerprint()
    rows = {r["name"]: r for r in first.manifest["packages"]}
    assert rows["alpha"]["version"] == "1.0" and rows["alpha"]["license"] == "MIT"
    assert rows["beta"]["license"] == "Apache-2.0"
    assert rows["alpha"]["py_files"] == 10 and rows["beta"]["py_files"] == 10
    assert first.manifest["stdlib"]["py_files"] == 33  # site-packages below it excluded
    split = first.manifest["split"]
    assert split["train"]["files"] + split["val"]["files"] == first.num_files()


def test_stdlib_files_keep_the_side_they_have_in_the_stdlib_corpus(env: dict) -> None:
    corpus = _load(env)
    old = load_corpus(str(env["stdlib"]), val_fraction=VAL)
    old_val = {"stdlib/" + s.rel for s in old.val if "site-packages" not in s.rel}
    old_train = {"stdlib/" + s.rel for s in old.train if "site-packages" not in s.rel}
    new_val, new_train = {s.rel for s in corpus.val}, {s.rel for s in corpus.train}
    assert old_val and old_val <= new_val
    assert old_train <= new_train
    assert not new_val & new_train


def test_exact_duplicates_are_kept_once_and_vendored_copies_share_a_side(env: dict) -> None:
    corpus = _load(env)
    rels = [s.rel for s in corpus.train + corpus.val]
    inits = [r for r in rels if r.endswith("__init__.py")]
    assert inits == ["site-packages/alpha/__init__.py"]  # beta's identical copy removed
    assert corpus.manifest["dedup"]["files_removed"] == 1
    vendored = env["vendored"]
    val = {s.rel for s in corpus.val}
    # The two copies differ (a patch line), so both stay, but on the one side their module
    # path decides, never straddling the split.
    assert f"site-packages/alpha/_vendor/{vendored}" in val
    assert f"site-packages/{vendored}" in val


def test_a_package_copy_of_a_stdlib_validation_file_never_reaches_training(env: dict) -> None:
    val_name = _key_on_side("held", val=True)
    held_out = (env["stdlib"] / val_name).read_text()
    leak = _key_on_side("copy", val=False)
    _install(env["site"], "gamma", "0.1", {f"gamma/{leak}": held_out})
    corpus = _load(env, packages={**env["packages"], "gamma": "0.1"})
    train_texts = set(corpus.iter_texts("train"))
    assert held_out not in train_texts
    assert f"stdlib/{val_name}" in {s.rel for s in corpus.val}


def test_filters_drop_planted_data_like_files_and_count_them(env: dict) -> None:
    planted = {
        "delta/table.py": "TABLE = [\n"
        + "".join(f"    {i * 7919 % 10007},\n" for i in range(3000))
        + "]\n",
        "delta/wide.py": "X = '" + "a" * 2000 + "'\n",
        "delta/gen_pb2.py": "# Generated by the protocol buffer compiler.  DO NOT EDIT!\nx = 1\n",
        "delta/huge.py": "# big\n" + ("def f():\n    return 1\n" * 60000),
        "delta/same.py": "def handler_0(event):\n    return event\n\n" * 1000,
        "delta/normal.py": python_source(77),
        "delta/documented.py": '"""Examples:\n'
        + "".join(python_source(300 + i) for i in range(60)).replace('"', "'")
        + '"""\nx = 1\n',
        "delta/prose.py": '"""Helpers for modules generated by protoc."""\nx = 2\n',
    }
    _install(env["site"], "delta", "3.0", planted)
    corpus = _load(env, packages={**env["packages"], "delta": "3.0"})
    rows = {r["name"]: r for r in corpus.manifest["packages"]}
    assert rows["delta"]["dropped"] == {
        "generated": 1,
        "literal_table": 1,
        "long_lines": 1,
        "repetitive": 1,
        "too_large": 1,
    }
    kept = {s.rel for s in corpus.train + corpus.val if s.rel.startswith("site-packages/delta")}
    assert kept == {f"site-packages/delta/{n}" for n in ("normal.py", "documented.py", "prose.py")}
    assert corpus.manifest["filters"]["literal_table"] == 1


def test_each_rule_on_its_own() -> None:
    assert drop_reason(python_source(1).encode()) is None
    assert drop_reason(b"x = 1\n" * 200_000) == "too_large"
    assert drop_reason(b"# auto-generated by tools/x.py\nx = 1\n") == "generated"
    assert drop_reason(b'"""Auto-generated docs live elsewhere."""\nx = 1\n') is None
    assert drop_reason(b"__version__ = '1'  # DO NOT EDIT THIS LINE MANUALLY\n") is None
    # Docstrings are prose, not literals; call arguments are literals.
    assert literal_share('def f():\n    """' + "word " * 100 + '"""\n    return x\n') == 0.0
    assert literal_share("f('abc', 12)\n") == pytest.approx(7 / 11)
    assert DEFAULT_RULES.max_literal_share == 0.6


def test_missing_package_is_a_one_line_error_naming_it_and_the_fix(env: dict) -> None:
    with pytest.raises(DataError, match=r"package omega is not installed.*pip install") as exc:
        _load(env, packages={**env["packages"], "omega": "1.0"})
    assert "\n" not in str(exc.value)


def test_deleted_package_directory_is_a_clear_error(env: dict) -> None:
    import shutil

    shutil.rmtree(env["site"] / "beta")
    with pytest.raises(DataError, match=r"beta/\S+\.py of package beta is missing.*reinstall"):
        _load(env)


def test_other_version_is_refused(env: dict) -> None:
    with pytest.raises(DataError, match=r"package alpha is 1\.0 but the recipe pins 1\.1"):
        _load(env, packages={"alpha": "1.1", "beta": "2.0"})


# Pinned after recipe version 1: the [hf] extra (transformers, nnsight, datasets and theirs)
# and the server's (fastapi, prometheus-client, opentelemetry).
LATER_PINS = {
    "cloudpickle", "datasets", "dill", "httpcore", "httpx", "multiprocess", "nnsight", "regex",
    "transformers", "websocket-client", "xxhash", "zstandard", "fastapi", "prometheus-client",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-semantic-conventions",
    # issue 21: audit signatures, OTLP export, and the test suite's pymerkle and schemathesis
    "cachetools", "cffi", "cryptography", "googleapis-common-protos", "graphql-core", "harfile",
    "hypothesis-graphql", "jsonschema-rs", "opentelemetry-exporter-http-transport",
    "opentelemetry-exporter-otlp-common", "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-exporter-otlp-proto-http", "opentelemetry-proto", "pycparser", "pymerkle",
    "pyrate-limiter", "schemathesis", "werkzeug",
    # issue 22: the [pyrit] extra (PyRIT scorer adapter) and its dependencies
    "aiofiles", "alembic", "appdirs", "art", "av", "azure-ai-contentsafety", "azure-core",
    "azure-identity", "azure-keyvault-secrets", "azure-storage-blob", "base2048", "colorama",
    "confusable-homoglyphs", "confusables", "ecoji", "et-xmlfile", "h2", "hpack", "httptools",
    "hyperframe", "isodate", "jiter", "lxml", "mako", "msal", "msal-extensions", "openai",
    "openpyxl", "pyjwt", "pyodbc", "pypdf", "pyrit", "python-docx", "python-dotenv", "reportlab",
    "scipy", "segno", "six", "sniffio", "sqlalchemy", "tenacity", "termcolor", "tinytag",
    "treelib", "uvloop", "watchfiles",
}  # fmt: skip


def test_recipe_pins_match_constraints_txt() -> None:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[normalize_name(name)] = version
    recipe = {normalize_name(name): version for name, version in PACKAGES.items()}
    # Every recipe package is pinned, at its recipe version. Pins added after recipe version 1
    # was fixed (the [hf] extra's) are not in the corpus: the recipe names its list.
    assert {name: pins.get(name) for name in recipe} == recipe
    assert set(pins) - set(recipe) == LATER_PINS


def test_duplicate_groups_stay_held_out_when_any_member_is(env: dict) -> None:
    # Three copies of one text: a stdlib training file, a stdlib validation file and a
    # package file. The validation copy is the one kept.
    text = python_source(4242)
    train_name, val_name = _key_on_side("twin", val=False), _key_on_side("twin", val=True)
    (env["stdlib"] / train_name).write_text(text)
    (env["stdlib"] / val_name).write_text(text)
    _install(env["site"], "eps", "1.0", {f"eps/{_key_on_side('e', val=False)}": text})
    # A package-only group: one member's path is on the validation side.
    other = python_source(4343)
    # The validation member sorts last by path, so "first by path" alone would pick the other.
    files = {
        f"zeta/{_key_on_side('z', val=False)}": other,
        f"zz/_vendor/{_key_on_side('z', val=True)}": other,
    }
    _install(env["site"], "zeta", "1.0", files)
    corpus = _load(env, packages={**env["packages"], "eps": "1.0", "zeta": "1.0"})
    assert text not in set(corpus.iter_texts("train"))
    assert other not in set(corpus.iter_texts("train"))
    val = {s.rel for s in corpus.val}
    assert f"stdlib/{val_name}" in val
    assert corpus.manifest["dedup"]["train_files_equal_to_a_val_file"] == 3


def test_build_specific_files_and_the_split_fraction(env: dict) -> None:
    _install(env["site"], "torchy", "1.0", {"torch/version.py": "cuda = None\n"})
    corpus = _load(env, packages={**env["packages"], "torchy": "1.0"})
    rows = {r["name"]: r for r in corpus.manifest["packages"]}
    assert rows["torchy"]["dropped"] == {"build_specific": 1}
    with pytest.raises(DataError, match=r"val_fraction must be 0\.02"):
        load_python_env(val_fraction=0.1, packages={}, stdlib_root=env["stdlib"])


def test_licence_text_in_the_license_field_falls_back_to_classifiers(tmp_path: Path) -> None:
    import importlib.metadata as md

    from sparsecircuits.data.python_env import license_of

    site = tmp_path / "site"
    _install(site, "a", "1.0", {}, License="Copyright (c) 2020 Someone")
    info = site / "a-1.0.dist-info" / "METADATA"
    info.write_text(info.read_text() + "Classifier: License :: OSI Approved :: BSD License\n")
    _install(
        site, "b", "1.0", {}, License_Expression="Apache-2.0 AND " + " AND ".join(["MIT"] * 30)
    )
    dists = {d.metadata["Name"]: d for d in md.distributions(path=[str(site)])}
    assert license_of(dists["a"]) == "BSD License"
    assert license_of(dists["b"]).endswith("MIT")  # an SPDX expression is never cut
