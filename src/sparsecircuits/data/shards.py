"""Tokenised corpus cache: uint16 shard files read through ``np.memmap``.

Layout: ``<cache_dir>/<key>/{train,val}/shard_NNNNN.bin`` (raw little-endian uint16 token ids) and
``meta.json`` per split. ``meta.json`` is written last, so its presence marks a complete split.
Each document is followed by the EOT id; documents may straddle shard boundaries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from sparsecircuits.data.corpus import Corpus
from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.errors import DataError
from sparsecircuits.fileio import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
CACHE_FORMAT = 1
_DTYPE = np.dtype("<u2")
_FILES_PER_BATCH = 64  # documents per encode_batch call: parallel, yet bounded memory


class TokenStore:
    """Read-only view of one split's shards; windows never cross a shard boundary."""

    def __init__(self, directory: Path, meta: dict, shards: list[np.ndarray]) -> None:
        self.directory = directory
        self.meta = meta
        self.shards = shards

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TokenStore:
        """Open a split directory written by :func:`build_token_cache`."""
        directory = Path(directory)
        meta_path = directory / META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"token cache {meta_path} is missing (incomplete cache)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"token cache {meta_path} is unreadable ({exc})") from None
        try:
            if meta["format"] != CACHE_FORMAT or meta["dtype"] != "uint16":
                raise DataError(
                    f"token cache {meta_path}: format {meta['format']} dtype {meta['dtype']}, "
                    f"expected format {CACHE_FORMAT} dtype uint16"
                )
            entries = [(str(s["file"]), int(s["tokens"])) for s in meta["shards"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"token cache {meta_path} is malformed (bad field {exc})") from None
        shards = []
        for name, tokens in entries:
            path = directory / name
            expected = tokens * _DTYPE.itemsize
            try:
                size = path.stat().st_size
            except OSError:
                raise DataError(f"token cache shard {path} is missing") from None
            if size != expected or tokens <= 0:
                raise DataError(
                    f"token cache shard {path} has {size} bytes, expected {expected}; "
                    f"delete {directory.parent} to rebuild it"
                )
            shards.append(np.memmap(path, dtype=_DTYPE, mode="r", shape=(tokens,)))
        return cls(directory, meta, shards)

    @property
    def split(self) -> str:
        """Split name recorded in meta.json ("train" or "val")."""
        return str(self.meta.get("split", self.directory.name))

    @property
    def num_tokens(self) -> int:
        """Total tokens over all shards."""
        return sum(self.shard_sizes)

    @property
    def shard_sizes(self) -> list[int]:
        """Tokens in each shard, in order."""
        return [len(s) for s in self.shards]

    @property
    def eot_id(self) -> int:
        """EOT id the documents were separated with."""
        return int(self.meta["eot_id"])

    def _check_length(self, length: int) -> None:
        if length < 1:
            raise ValueError(f"window length must be >= 1, got {length}")
        if not any(size >= length for size in self.shard_sizes):
            if self.num_tokens >= length:
                raise DataError(
                    f"{self.split} split ({self.directory}): no shard holds a window of {length} "
                    f"tokens (shard sizes {self.shard_sizes}); rebuild with larger shard_tokens"
                )
            raise DataError(
                f"{self.split} split ({self.directory}) has {self.num_tokens} tokens, "
                f"fewer than one window of {length}"
            )

    def sample_windows(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """``n`` random windows, int64 array of shape (n, length).

        Every start position of every shard is equally likely (so a shard is chosen with
        probability proportional to ``size - length + 1``). One ``rng.integers`` draw: the result
        depends only on the rng state.
        """
        self._check_length(length)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        starts_per_shard = np.array([max(s - length + 1, 0) for s in self.shard_sizes], np.int64)
        cum = np.cumsum(starts_per_shard)
        flat = rng.integers(0, int(cum[-1]), size=n, dtype=np.int64)
        shard_idx = np.searchsorted(cum, flat, side="right")
        offsets = flat - (cum[shard_idx] - starts_per_shard[shard_idx])
        out = np.empty((n, length), dtype=np.int64)
        cols = np.arange(length, dtype=np.int64)
        for k in np.unique(shard_idx):
            rows = np.nonzero(shard_idx == k)[0]
            out[rows] = self.shards[k][offsets[rows, None] + cols]
        return out

    def iter_windows(self, length: int, *, max_windows: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive non-overlapping windows (int64, shape (length,)) in order; each shard's
        tail shorter than ``length`` is dropped."""
        self._check_length(length)
        count = 0
        for shard in self.shards:
            for start in range(0, len(shard) - length + 1, length):
                if max_windows is not None and count >= max_windows:
                    return
                yield np.asarray(shard[start : start + length], dtype=np.int64)
                count += 1

    def num_windows(self, length: int) -> int:
        """How many windows :meth:`iter_windows` yields without ``max_windows``."""
        return sum(size // length for size in self.shard_sizes)


def cache_key(corpus: Corpus, tokenizer: Tokenizer) -> str:
    """16 hex chars identifying (corpus content and split, tokenizer)."""
    both = corpus.fingerprint() + tokenizer.fingerprint()
    return hashlib.sha256(both.encode()).hexdigest()[:16]


def build_token_cache(
    corpus: Corpus,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike,
    shard_tokens: int = 2**24,
) -> tuple[TokenStore, TokenStore]:
    """Tokenise ``corpus`` into ``cache_dir/<key>/{train,val}`` or reuse a complete cache there.

    ``shard_tokens``: tokens per shard file (2 bytes each). Returns (train, val) stores.
    """
    if tokenizer.vocab_size > 2**16:
        raise DataError(
            f"tokenizer has {tokenizer.vocab_size} tokens; the token cache stores uint16 ids, "
            f"so at most {2**16} are supported"
        )
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    key = cache_key(corpus, tokenizer)
    root = Path(cache_dir) / key
    stores = []
    for split in ("train", "val"):
        directory = root / split
        store = _reusable(directory, shard_tokens=shard_tokens)
        if store is None:
            _write_split(corpus, tokenizer, split, directory, key=key, shard_tokens=shard_tokens)
            store = TokenStore.open(directory)
        stores.append(store)
    return stores[0], stores[1]


def _reusable(directory: Path, *, shard_tokens: int) -> TokenStore | None:
    """The complete cache in ``directory`` if it can be reused as is, else None."""
    if not (directory / META_FILE).exists():
        return None
    try:
        store = TokenStore.open(directory)
    except DataError as exc:
        logger.warning("rebuilding damaged token cache: %s", exc)
        return None
    if store.meta.get("shard_tokens") != shard_tokens:
        # Windows never cross shards, so the shard size changes which windows can be sampled.
        logger.info(
            "rebuilding token cache %s: shard_tokens %s -> %d",
            directory,
            store.meta.get("shard_tokens"),
            shard_tokens,
        )
        return None
    logger.info("reusing token cache %s (%d tokens)", directory, store.num_tokens)
    return store


def _write_split(
    corpus: Corpus,
    tokenizer: Tokenizer,
    split: Literal["train", "val"],
    directory: Path,
    *,
    key: str,
    shard_tokens: int,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # Leftovers from an interrupted build (meta.json absent or damaged) must not be mistaken
    # for shards of this build.
    for stale in directory.iterdir():
        if stale.name == META_FILE or stale.name.startswith("shard_"):
            stale.unlink()
    logger.info("building token cache %s from %s", directory, corpus.name)
    writer = _ShardWriter(directory, shard_tokens=shard_tokens)
    eot = np.array([tokenizer.eot_id], dtype=_DTYPE)
    num_docs = 0
    batch: list[str] = []
    texts = corpus.iter_texts(split)
    while True:
        batch.clear()
        for text in texts:
            batch.append(text)
            if len(batch) == _FILES_PER_BATCH:
                break
        if not batch:
            break
        for ids in tokenizer.encode_batch(batch):
            writer.add(np.asarray(ids, dtype=_DTYPE))
            writer.add(eot)
        num_docs += len(batch)
    shards = writer.close()
    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "split": split,
        "dtype": "uint16",
        "eot_id": tokenizer.eot_id,
        "vocab_size": tokenizer.vocab_size,
        "num_documents": num_docs,
        "num_tokens": sum(s["tokens"] for s in shards),
        "shard_tokens": shard_tokens,
        "shards": shards,
        "corpus": corpus.name,
        "corpus_fingerprint": corpus.fingerprint(),
        "tokenizer_fingerprint": tokenizer.fingerprint(),
    }
    atomic_write_json(directory / META_FILE, meta)
    logger.info(
        "token cache %s: %d documents, %d tokens in %d shards",
        directory,
        num_docs,
        meta["num_tokens"],
        len(shards),
    )


class _ShardWriter:
    """Fills a fixed uint16 buffer and writes it out (atomically) whenever it is full."""

    def __init__(self, directory: Path, *, shard_tokens: int) -> None:
        self.directory = directory
        self.buffer = np.empty(shard_tokens, dtype=_DTYPE)
        self.fill = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        while len(ids):
            take = min(len(ids), len(self.buffer) - self.fill)
            self.buffer[self.fill : self.fill + take] = ids[:take]
            self.fill += take
            ids = ids[take:]
            if self.fill == len(self.buffer):
                self._flush()

    def close(self) -> list[dict]:
        if self.fill:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        data = self.buffer[: self.fill]
        atomic_write(self.directory / name, data.tofile)
        self.shards.append({"file": name, "tokens": int(self.fill)})
        self.fill = 0
