"""Isolated environments for the real red-team tools, created once and cached for the tests.

The tools pin what we cannot (garak wants an older transformers and python-dateutil than ours),
so each gets its own venv under ``~/.cache/sparsecircuits/redteam-envs/<name>-<version>/`` and
is driven as a subprocess; nothing is ever installed into the project's own venv.

Creation is atomic: the venv is built in a temporary directory beside the cache entry, marked
ready, and only then renamed into place, under a file lock, so a killed creation leaves at most
a temporary directory that no later run mistakes for a ready env (it is swept on the next try).
A failure (no network, a resolver conflict) raises :class:`ToolEnvError` with a one-line reason;
the tests turn it into ``pytest.skip``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from sparsecircuits.redteam.report import GARAK_FORMAT_VERSION

CACHE_ROOT = Path(
    os.environ.get("SPARSECIRCUITS_TOOL_ENVS", "~/.cache/sparsecircuits/redteam-envs")
).expanduser()
READY = ".sparsecircuits-ready.json"  # written last, before the rename: its presence = complete
BASE_PYTHON = "python3.11"  # the tools' newest supported Python on this machine
GARAK_VERSION = GARAK_FORMAT_VERSION  # the garak whose report format we write, and test against
# This machine's pip would pick the newest torch its cap allows (a 5 GB CUDA build) for garak's
# "torch>=2.13.0"; the CPU wheel on disk is 2.13.0+cpu, so it is installed first and pinned. The
# local label matters: where no CPU wheel is at hand, PyPI has no "+cpu" build, so the install
# fails (and the tests skip) instead of fetching the CUDA one.
TORCH_CPU = "torch==2.13.0+cpu"
# SPARSECIRCUITS_BUILD_TOOL_ENVS=0: use envs already built, never build one (the tests skip).
BUILD = os.environ.get("SPARSECIRCUITS_BUILD_TOOL_ENVS", "1") != "0"
INSTALL_TIMEOUT_S = 3600  # a cold garak env downloads a few hundred MB of dependencies


class ToolEnvError(RuntimeError):
    """The tool's environment could not be created (one-line reason)."""


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("ERROR")]  # pip's cause, when it names one
    line = (errs or lines or ["no output"])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _run(cmd: Sequence[str], what: str, *, timeout_s: float) -> None:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "PIP_NO_INPUT": "1"})  # fmt: skip
    except FileNotFoundError:
        raise ToolEnvError(f"{what}: {cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise ToolEnvError(f"{what}: timed out after {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise ToolEnvError(f"{what} failed: {_one_line(proc.stderr or proc.stdout)}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if we are killed
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _retarget_scripts(bin_dir: Path, old: Path, new: Path) -> None:
    """Console scripts carry the venv's absolute path in their shebang: point them at the final
    directory before the rename (``python -m ...`` would work either way)."""
    old_b, new_b = str(old).encode(), str(new).encode()
    for f in bin_dir.iterdir():
        if f.is_symlink() or not f.is_file():
            continue
        data = f.read_bytes()
        if data.startswith(b"#!") and old_b in data:
            f.write_bytes(data.replace(old_b, new_b))


def _may_build(name: str, version: str) -> None:
    if not BUILD:
        raise ToolEnvError(f"{name} {version} is not built and SPARSECIRCUITS_BUILD_TOOL_ENVS=0")


def env_dir(name: str, version: str) -> Path:
    """Where the env of ``name`` ``version`` lives once created."""
    return CACHE_ROOT / f"{name}-{version}"


def python_tool_env(name: str, version: str, packages: Sequence[str], *,
                    preinstall: Sequence[str] = (), pins: Sequence[str] = (),
                    timeout_s: float = INSTALL_TIMEOUT_S) -> Path:  # fmt: skip
    """The python of a venv holding ``packages`` (pip requirement strings), created on first use.

    ``preinstall`` is installed first (e.g. the on-disk CPU torch), ``pins`` are extra pip
    constraints for the main install (on top of the machine's own). Raises ToolEnvError.
    """
    final = env_dir(name, version)
    python = final / "bin" / "python"
    if (final / READY).is_file():
        return python
    with _locked(CACHE_ROOT / f".{name}-{version}.lock"):
        if (final / READY).is_file():  # another process finished while we waited
            return python
        for stale in CACHE_ROOT.glob(f".{name}-{version}.tmp-*"):  # a killed creation's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # no ready mark: not ours to trust (a copy, a manual edit)
            shutil.rmtree(final)
        _may_build(name, version)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{version}.tmp-", dir=CACHE_ROOT))
        try:
            started = time.monotonic()
            _run([BASE_PYTHON, "-m", "venv", str(tmp)], f"{BASE_PYTHON} -m venv", timeout_s=300)
            pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off",
                   "--disable-pip-version-check"]  # fmt: skip
            if preinstall:
                _run([*pip, *preinstall], f"pip install {' '.join(preinstall)}",
                     timeout_s=timeout_s)  # fmt: skip
            extra: list[str] = []
            if pins:
                cfile = tmp / "tool-pins.txt"
                cfile.write_text("".join(p + "\n" for p in pins))
                extra = ["-c", str(cfile)]
            _run([*pip, *extra, *packages], f"pip install {' '.join(packages)}",
                 timeout_s=timeout_s)  # fmt: skip
            _retarget_scripts(tmp / "bin", tmp, final)
            info = {"name": name, "version": version, "packages": list(packages),
                    "preinstall": list(preinstall), "pins": list(pins),
                    "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
            (tmp / READY).write_text(json.dumps(info, indent=1) + "\n")
            os.rename(tmp, final)  # atomic on one filesystem: complete or absent
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return python


def creation_info(name: str, version: str) -> dict:
    """The ready mark of a created env (what was installed, how many seconds it took)."""
    return json.loads((env_dir(name, version) / READY).read_text())


_FAILED: dict[str, str] = {}  # one failed creation per run is enough: later tests skip at once


def garak_python() -> Path:
    """The python of the isolated garak env; ``pytest.skip`` (one line, the cause) without it."""
    key = f"garak-{GARAK_VERSION}"
    if key in _FAILED:
        pytest.skip(_FAILED[key])
    try:
        return python_tool_env("garak", GARAK_VERSION, [f"garak=={GARAK_VERSION}"],
                               preinstall=[TORCH_CPU], pins=[TORCH_CPU])  # fmt: skip
    except ToolEnvError as err:
        _FAILED[key] = f"garak {GARAK_VERSION} env unavailable: {err}"
        pytest.skip(_FAILED[key])


# --- PyRIT and promptfoo (the adapters in sparsecircuits.redteam.adapters) ---------------------

REPO = Path(__file__).resolve().parents[2]
PYRIT_VERSION = "1.1.0"  # the [pyrit] extra's pin (pyproject.toml)
# The newest promptfoo whose `engines` accept this machine's Node 20.20 (0.122 and later want
# Node >= 22.22).
PROMPTFOO_VERSION = "0.121.20"
# libsql's native binary is an optional npm dependency, one package per platform; we omit
# optional dependencies (a few hundred MB of cloud SDKs and browsers), so it is added by name.
_LIBSQL_NATIVE = {"x86_64": "@libsql/linux-x64-gnu", "aarch64": "@libsql/linux-arm64-gnu"}


def project_pins() -> list[str]:
    """constraints.txt's pins, as pip constraint lines."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def project_requirements(extra: str) -> list[str]:
    """Our own dependencies plus those of optional extra ``extra`` (pyproject.toml)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"][extra]]


def _drop_if_built_with_other_pins(name: str, version: str, pins: Sequence[str]) -> None:
    """An env built against older constraints.txt pins is rebuilt, never used stale."""
    final = env_dir(name, version)
    with _locked(CACHE_ROOT / f".{name}-{version}.lock"):
        if (final / READY).is_file() and creation_info(name, version).get("pins") != list(pins):
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-{version}.tmp-", dir=CACHE_ROOT))
            os.rename(final, stale / "old")  # out of the way at once, then deleted
            shutil.rmtree(stale, ignore_errors=True)


def pyrit_python() -> Path:
    """The python of a venv holding PyRIT and our dependencies at exactly our pins (the extra
    fits them). Our package itself is not installed there: the tests put ``src/`` on
    PYTHONPATH, so the code under test is never a stale copy. ``pytest.skip`` without it."""
    key = f"pyrit-{PYRIT_VERSION}"
    if key in _FAILED:
        pytest.skip(_FAILED[key])
    pins = project_pins()
    try:
        _drop_if_built_with_other_pins("pyrit", PYRIT_VERSION, pins)
        return python_tool_env("pyrit", PYRIT_VERSION, project_requirements("pyrit"),
                               preinstall=[TORCH_CPU], pins=pins)  # fmt: skip
    except ToolEnvError as err:
        # the pip command names our ~20 requirements: keep the cause, not the list
        what, _, cause = str(err).partition(" failed: ")
        why = f"pip install failed: {cause}" if what.startswith("pip install") else str(err)
        _FAILED[key] = f"PyRIT {PYRIT_VERSION} env unavailable: {why}"
        pytest.skip(_FAILED[key])


def _npm(cmd: Sequence[str], what: str, *, timeout_s: float) -> None:
    """Run npm; on failure, the reason is its first ``npm error`` line (its last one only points
    at a log that is deleted with the temporary directory)."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise ToolEnvError(f"{what}: {cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise ToolEnvError(f"{what}: timed out after {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        errs = [ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("npm error")]
        errs = [ln for ln in errs if "complete log of this run" not in ln]
        raise ToolEnvError(f"{what} failed: {(errs or [_one_line(proc.stderr)])[0][:300]}")


def npm_tool_env(name: str, version: str, packages: Sequence[str], *,
                 then: Callable[[Path], Sequence[str]] | None = None,
                 timeout_s: float = INSTALL_TIMEOUT_S) -> Path:  # fmt: skip
    """The prefix (``node_modules/`` inside) of an npm install of ``packages``, created on first
    use, atomically as :func:`python_tool_env`. Optional dependencies and install scripts are
    skipped (no scripts that download binaries); ``then(prefix)`` may name more packages to
    install after the first pass (e.g. one native binary). npm's own cache lives inside the
    temporary directory and is deleted, so nothing is written outside the cache entry."""
    final = env_dir(name, version)
    if (final / READY).is_file():
        return final
    with _locked(CACHE_ROOT / f".{name}-{version}.lock"):
        if (final / READY).is_file():
            return final
        for stale in CACHE_ROOT.glob(f".{name}-{version}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        _may_build(name, version)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{version}.tmp-", dir=CACHE_ROOT))
        try:
            started = time.monotonic()
            npm = ["npm", "install", "--prefix", str(tmp), "--cache", str(tmp / ".npm-cache"),
                   "--omit=optional", "--ignore-scripts", "--no-audit", "--no-fund",
                   "--no-update-notifier", "--loglevel=error"]  # fmt: skip
            _npm([*npm, *packages], f"npm install {' '.join(packages)}", timeout_s=timeout_s)
            more = list(then(tmp)) if then else []
            if more:
                _npm([*npm, *more], f"npm install {' '.join(more)}", timeout_s=timeout_s)
            shutil.rmtree(tmp / ".npm-cache", ignore_errors=True)
            info = {"name": name, "version": version, "packages": [*packages, *more],
                    "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
            (tmp / READY).write_text(json.dumps(info, indent=1) + "\n")
            os.rename(tmp, final)  # node_modules holds no absolute paths: safe to move
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _libsql_native(prefix: Path) -> list[str]:
    """The libsql binary for this platform, at the version of the libsql that was installed."""
    import platform

    meta = prefix / "node_modules" / "libsql" / "package.json"
    if not meta.is_file():
        return []  # a promptfoo without libsql needs none
    native = _LIBSQL_NATIVE.get(platform.machine())
    if native is None or platform.system() != "Linux":
        raise ToolEnvError(
            f"libsql: no native package for {platform.system()} {platform.machine()}"
        )
    return [f"{native}@{json.loads(meta.read_text())['version']}"]


def promptfoo_entrypoint() -> Path:
    """promptfoo's CLI script (run it with ``node``); ``pytest.skip`` (one line) without it."""
    key = f"promptfoo-{PROMPTFOO_VERSION}"
    if key in _FAILED:
        pytest.skip(_FAILED[key])
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("promptfoo needs node and npm on PATH")
    try:
        prefix = npm_tool_env("promptfoo", PROMPTFOO_VERSION, [f"promptfoo@{PROMPTFOO_VERSION}"],
                              then=_libsql_native)  # fmt: skip
    except ToolEnvError as err:
        _FAILED[key] = f"promptfoo {PROMPTFOO_VERSION} env unavailable: {err}"
        pytest.skip(_FAILED[key])
    return prefix / "node_modules" / "promptfoo" / "dist" / "src" / "entrypoint.js"
