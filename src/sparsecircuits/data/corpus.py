"""Python source corpora: list files, check they decode, split train/val by a hash of the path.

A corpus is a sorted list of UTF-8 text documents (usually ``.py`` files). The split depends only on
each document's relative path, so it is the same on every machine and stable when files are added.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sparsecircuits.errors import DataError

logger = logging.getLogger(__name__)

# Package-install directories are not the standard library (and differ between machines).
_EXCLUDED_STDLIB_PARTS = frozenset({"site-packages", "dist-packages"})
_GLOB_CHARS = frozenset("*?[")
_HF_COLUMNS = ("content", "text")


@dataclass(frozen=True)
class SourceFile:
    """One document: ``path`` on disk and ``rel``, its posix path relative to the corpus root."""

    path: Path
    rel: str


@dataclass
class Corpus:
    """Documents split into train and val (each sorted by ``rel``), plus skip counts by reason."""

    name: str
    root: Path
    train: list[SourceFile]
    val: list[SourceFile]
    skipped: dict[str, int] = field(default_factory=dict)
    # rel -> (size in bytes, sha256 hex) recorded at load time, so fingerprint() needs no re-read.
    _digests: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False, compare=False)
    # Reads one document's raw bytes; None means "read the file at SourceFile.path".
    _reader: Callable[[SourceFile], bytes] | None = field(default=None, repr=False, compare=False)
    # How a recipe corpus (``python-env``) was built: packages, versions, filter counts.
    manifest: dict | None = field(default=None, repr=False, compare=False)

    def read_bytes(self, source: SourceFile) -> bytes:
        """Raw bytes of one document (OSError if it cannot be read)."""
        return self._reader(source) if self._reader is not None else source.path.read_bytes()

    def fingerprint(self) -> str:
        """sha256 hex over (split, rel, size, content sha256) of every document.

        Independent of absolute paths and mtimes, so identical files give the same value anywhere.
        """
        h = hashlib.sha256()
        for split, files in (("train", self.train), ("val", self.val)):
            for source in files:
                size, digest = self._digests.get(source.rel) or _digest(self.read_bytes(source))
                h.update(f"{split}\0{source.rel}\0{size}\0{digest}\n".encode())
        return h.hexdigest()

    def iter_texts(self, split: Literal["train", "val"]) -> Iterator[str]:
        """Yield the decoded text of each document of ``split`` in order.

        Documents that no longer read or decode are skipped, counted in ``skipped`` and logged.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        for source in self.train if split == "train" else self.val:
            text, reason = _decode(self, source)
            if text is None:
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                logger.warning(
                    "skipping %s (%s): it changed since the corpus was loaded", source.rel, reason
                )
                continue
            yield text

    def num_files(self) -> int:
        """Number of documents in train + val."""
        return len(self.train) + len(self.val)


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(spec: str | None = None, *, val_fraction: float = 0.02) -> Corpus:
    """Load a corpus and split it.

    ``spec``: None or ``"stdlib"`` (every ``.py`` under :func:`stdlib_dir`, minus site-packages),
    ``"python-env"`` (the standard library plus this environment's pinned packages, filtered
    and deduplicated: :mod:`sparsecircuits.data.python_env`), a directory (every ``*.py`` below
    it), a glob pattern (``"src/**/*.py"``), or ``"hf:<dir>"`` (a HF ``datasets`` dataset
    saved with ``save_to_disk``; offline).
    ``val_fraction``: expected fraction of documents in val, in [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    reader = None
    if spec == "python-env":
        from sparsecircuits.data.python_env import load_python_env  # builds on this module

        return load_python_env(val_fraction=val_fraction)
    if spec is None or spec == "stdlib":
        root = stdlib_dir()
        name = "stdlib"
        sources = list_py_files(root, exclude_parts=_EXCLUDED_STDLIB_PARTS)
    elif spec.startswith("hf:"):
        root = Path(spec[3:]).expanduser()
        name = spec
        sources, reader = _list_hf_rows(root)
    elif _GLOB_CHARS & set(spec):
        root, sources = _list_glob(spec)
        name = spec
    else:
        root = Path(spec).expanduser()
        name = str(root)
        sources = list_py_files(root, exclude_parts=frozenset())

    corpus = Corpus(name=name, root=root, train=[], val=[], _reader=reader)
    kept: list[SourceFile] = []
    for source in sources:
        try:
            data = corpus.read_bytes(source)
        except OSError:
            reason = "unreadable"
        else:
            reason = check_bytes(data)
            if reason is None:
                corpus._digests[source.rel] = _digest(data)
                kept.append(source)
                continue
        corpus.skipped[reason] = corpus.skipped.get(reason, 0) + 1
        logger.debug("skipping %s: %s", source.rel, reason)
    for reason, count in sorted(corpus.skipped.items()):
        logger.info("skipped %d %s files in corpus %s", count, _REASON_WORDS[reason], name)
    if not kept:
        raise DataError(
            f"corpus {name}: all {len(sources)} files were skipped "
            f"({_skip_summary(corpus.skipped)}); expected UTF-8 text without NUL bytes"
        )
    corpus.train, corpus.val = split_files(kept, val_fraction=val_fraction)
    logger.info("corpus %s: %d train and %d val files", name, len(corpus.train), len(corpus.val))
    return corpus


def split_files(
    files: list[SourceFile], *, val_fraction: float
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Split by md5 of ``rel``: val iff ``md5 % 10000 < val_fraction * 10000``.

    Guarantees at least one train file and, with two or more files, at least one val file.
    Both lists come back sorted by ``rel``.
    """
    files = sorted(files, key=lambda s: s.rel)
    bucket = {s.rel: split_bucket(s.rel) for s in files}
    train = [s for s in files if not is_val_key(s.rel, val_fraction=val_fraction)]
    val = [s for s in files if is_val_key(s.rel, val_fraction=val_fraction)]
    # Move the file nearest the threshold (ties broken by rel) so the choice is deterministic.
    if not train:
        moved = max(val, key=lambda s: (bucket[s.rel], s.rel))
        val.remove(moved)
        train.append(moved)
    if not val and len(files) >= 2:
        moved = min(train, key=lambda s: (bucket[s.rel], s.rel))
        train.remove(moved)
        val.append(moved)
    return sorted(train, key=lambda s: s.rel), sorted(val, key=lambda s: s.rel)


def split_bucket(key: str) -> int:
    """The split's hash of a document key: md5 of the key, mod 10000."""
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % 10000


def is_val_key(key: str, *, val_fraction: float) -> bool:
    """Whether a document with this key belongs to validation (the one split rule)."""
    return split_bucket(key) < val_fraction * 10000


_REASON_WORDS = {"non_utf8": "non-UTF-8", "binary": "binary (NUL byte)", "unreadable": "unreadable"}


def check_bytes(data: bytes) -> str | None:
    """Skip reason for a document's bytes, or None if it is usable text."""
    if b"\x00" in data:
        return "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "non_utf8"
    return None


def _decode(corpus: Corpus, source: SourceFile) -> tuple[str | None, str]:
    try:
        data = corpus.read_bytes(source)
    except OSError:
        return None, "unreadable"
    reason = check_bytes(data)
    if reason is not None:
        return None, reason
    return data.decode("utf-8"), ""


def _digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def _skip_summary(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {_REASON_WORDS.get(r, r)}" for r, n in sorted(skipped.items())) or "none"


def list_py_files(root: Path, *, exclude_parts: frozenset[str]) -> list[SourceFile]:
    if not root.exists():
        raise DataError(f"corpus directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"corpus path {root} is not a directory; expected a directory of .py files")
    sources = []
    # os.walk does not follow symlinks: a link loop cannot hang us, nor a file count twice.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_parts)
        for fname in filenames:
            if fname.endswith(".py"):
                path = Path(dirpath) / fname
                sources.append(SourceFile(path=path, rel=path.relative_to(root).as_posix()))
    if not sources:
        raise DataError(f"corpus directory {root} contains no .py files")
    return sorted(sources, key=lambda s: s.rel)


def _list_glob(pattern: str) -> tuple[Path, list[SourceFile]]:
    # The root is the pattern's leading components without glob characters, so rel paths are
    # the part the pattern actually varies over (e.g. "src/**/*.py" -> root "src").
    parts = Path(pattern).expanduser().parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    paths = sorted(p for p in glob.glob(str(Path(pattern).expanduser()), recursive=True))
    sources = [
        SourceFile(path=Path(p), rel=Path(os.path.relpath(p, root)).as_posix())
        for p in paths
        if os.path.isfile(p)
    ]
    if not sources:
        raise DataError(f"corpus pattern {pattern!r} matches no files")
    return root, sorted(sources, key=lambda s: s.rel)


def _list_hf_rows(root: Path) -> tuple[list[SourceFile], Callable[[SourceFile], bytes]]:
    """Rows of a dataset saved with ``save_to_disk``; rel is ``<split>/<row index:09d>``."""
    try:
        import datasets  # optional, heavy: import only when asked for
    except ImportError:
        raise DataError(
            f"corpus hf:{root} needs the 'datasets' package: pip install 'sparsecircuits[hf]'"
        ) from None
    if not root.is_dir():
        raise DataError(f"corpus hf:{root}: directory does not exist")
    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as exc:  # datasets raises several unrelated types for a bad directory
        raise DataError(f"corpus hf:{root}: cannot load a saved dataset ({exc})") from None
    # A DatasetDict maps split names to datasets; a plain Dataset is one unnamed split.
    if hasattr(loaded, "column_names") and not hasattr(loaded, "keys"):
        parts = {"all": loaded}
    else:
        parts = {name: loaded[name] for name in sorted(loaded.keys())}
    columns: dict[str, str] = {}
    sources = []
    for split_name, ds in parts.items():
        column = next((c for c in _HF_COLUMNS if c in ds.column_names), None)
        if column is None:
            raise DataError(
                f"corpus hf:{root} split {split_name!r} has columns {list(ds.column_names)}; "
                f"expected a 'content' or 'text' column"
            )
        columns[split_name] = column
        sources += [SourceFile(path=root, rel=f"{split_name}/{i:09d}") for i in range(len(ds))]
    if not sources:
        raise DataError(f"corpus hf:{root} has no rows")

    def read(source: SourceFile) -> bytes:
        split_name, index = source.rel.rsplit("/", 1)
        value = parts[split_name][int(index)][columns[split_name]]
        return value.encode("utf-8", errors="surrogatepass") if isinstance(value, str) else b""

    return sources, read
