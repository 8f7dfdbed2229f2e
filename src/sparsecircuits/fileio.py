"""Atomic file writes: a reader never sees a half-written file, even after ``kill -9``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """Where derived data is cached (token shards, tokenizers, ablation means):
    ``$SPARSECIRCUITS_CACHE`` or ``~/.cache/sparsecircuits``."""
    return Path(os.environ.get("SPARSECIRCUITS_CACHE", Path.home() / ".cache" / "sparsecircuits"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename the temp file onto ``path`` (same dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it replaces ``path`` whole.

    Readers see the old directory or the complete new one, never a mix. On error the temp
    directory is removed and ``path`` is left as it was. Temp names start with ``.tmp-``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
        if path.exists():
            old = path.with_name(f".tmp-old-{path.name}-{os.getpid()}")
            os.replace(path, old)  # a rename, so `path` is never half-deleted
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries durable: a new, renamed or deleted file survives a power
    loss only once its directory is fsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, _write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json_object(path: str | os.PathLike, *, missing: type[Exception] | None = None) -> dict:
    """Parse a JSON file that must hold an object.

    Malformed JSON, a key given twice in one object or a non-object raises ConfigError naming
    the file; a missing file raises ``missing`` (default ConfigError) with the same one-line
    form.
    """
    from sparsecircuits.errors import ConfigError

    path = Path(path)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:  # json would keep the last silently: a config could say two things
                raise ConfigError(f"{path}: key '{key}' appears twice in one object")
            seen[key] = value
        return seen

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except FileNotFoundError:
        raise (missing or ConfigError)(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_schema_json(path: str | os.PathLike, *, schema: str, what: str) -> dict:
    """A JSON file of ours whose ``"schema"`` is ``schema`` (``what``: a short name for the
    messages, e.g. "circuit file"). Anything else (missing, malformed, a key twice, another
    schema) is a one-line CheckpointError naming the file. The key comes back as ``schema_``
    (pydantic models cannot name a field ``schema``)."""
    from sparsecircuits.errors import CheckpointError, ConfigError

    path = Path(path)
    try:
        data = read_json_object(path, missing=CheckpointError)
    except ConfigError as err:  # malformed JSON: the file's contents, not a config
        raise CheckpointError(str(err)) from None
    except CheckpointError:
        raise CheckpointError(f"{path}: no such {what}") from None
    if data.get("schema") != schema:
        raise CheckpointError(f'{path}: not a {what} (expected "schema": "{schema}")')
    return {"schema_": data.pop("schema"), **data}
