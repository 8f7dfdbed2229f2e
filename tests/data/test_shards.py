"""Token cache: shard layout, reuse/rebuild, corruption checks and window sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparsecircuits.data import Corpus, Tokenizer, TokenStore, build_token_cache, load_corpus
from sparsecircuits.errors import DataError


@pytest.fixture()
def corpus(tmp_path: Path, make_py_files) -> Corpus:
    make_py_files(tmp_path / "corpus", 40)
    return load_corpus(str(tmp_path / "corpus"), val_fraction=0.2)


def _expected_stream(corpus: Corpus, tok: Tokenizer, split: str) -> np.ndarray:
    ids: list[int] = []
    for text in corpus.iter_texts(split):
        ids += [*tok.encode(text), tok.eot_id]
    return np.array(ids, dtype=np.int64)


def test_multi_shard_cache_holds_the_token_stream(
    tmp_path: Path, corpus: Corpus, small_tokenizer: Tokenizer
) -> None:
    train, val = build_token_cache(
        corpus, small_tokenizer, cache_dir=tmp_path / "c", shard_tokens=1000
    )
    for store, split in ((train, "train"), (val, "val")):
        expected = _expected_stream(corpus, small_tokenizer, split)
        assert store.num_tokens == len(expected)
        assert np.array_equal(np.concatenate(store.shards).astype(np.int64), expected)
        assert all(size == 1000 for size in store.shard_sizes[:-1])
        meta = json.loads((store.directory / "meta.json").read_text())
        assert meta["dtype"] == "uint16" and meta["eot_id"] == small_tokenizer.eot_id
        assert [s["tokens"] for s in meta["shards"]] == store.shard_sizes
        assert store.directory == tmp_path / "c" / meta["key"] / split
    assert len(train.shard_sizes) >= 3
    assert np.count_nonzero(np.concatenate(train.shards) == small_tokenizer.eot_id) == len(
        corpus.train
    )


def test_complete_cache_is_reused_and_incomplete_rebuilt(
    tmp_path: Path, corpus: Corpus, small_tokenizer: Tokenizer
) -> None:
    train, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=1000)
    shard = train.directory / "shard_00000.bin"
    before = shard.stat().st_mtime_ns
    again, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=1000)
    assert shard.stat().st_mtime_ns == before
    assert again.shard_sizes == train.shard_sizes

    # A crash before meta.json was written leaves shards that must be replaced, not trusted.
    # (Replace files rather than truncate them: `train` still memory-maps the old ones.)
    first_shard = np.array(train.shards[0])
    (train.directory / "meta.json").unlink()
    shard.unlink()
    shard.write_bytes(b"\x00\x00")
    (train.directory / "shard_00999.bin").write_bytes(b"\x00\x00")
    rebuilt, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=1000)
    assert rebuilt.shard_sizes == train.shard_sizes
    assert not (train.directory / "shard_00999.bin").exists()
    assert np.array_equal(rebuilt.shards[0], first_shard)


def test_cache_key_changes_with_corpus(
    tmp_path: Path, corpus: Corpus, small_tokenizer: Tokenizer
) -> None:
    train, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path / "c")
    corpus.train[0].path.write_text("x = 1\n")
    changed = load_corpus(str(corpus.root), val_fraction=0.2)
    train2, _ = build_token_cache(changed, small_tokenizer, cache_dir=tmp_path / "c")
    assert train2.directory != train.directory
    assert train2.num_tokens < train.num_tokens


def test_truncated_or_missing_files_raise(
    tmp_path: Path, corpus: Corpus, small_tokenizer: Tokenizer
) -> None:
    train, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=1000)
    shard = train.directory / "shard_00001.bin"
    data = shard.read_bytes()
    shard.unlink()  # a new file: `train` still memory-maps the old one
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"shard_00001\.bin has 1998 bytes, expected 2000"):
        TokenStore.open(train.directory)
    # build_token_cache repairs a damaged cache instead of failing.
    repaired, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=1000)
    assert repaired.num_tokens == train.num_tokens

    (train.directory / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json is unreadable"):
        TokenStore.open(train.directory)
    with pytest.raises(DataError, match=r"meta\.json is missing"):
        TokenStore.open(tmp_path / "nowhere")


def test_sample_windows_is_deterministic_and_in_bounds(
    tmp_path: Path, corpus: Corpus, small_tokenizer: Tokenizer
) -> None:
    train, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=1000)
    a = train.sample_windows(np.random.default_rng(0), 200, 64)
    b = train.sample_windows(np.random.default_rng(0), 200, 64)
    c = train.sample_windows(np.random.default_rng(1), 200, 64)
    assert a.shape == (200, 64) and a.dtype == np.int64
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Every window is a contiguous slice of a single shard.
    hits = np.zeros(len(train.shards), dtype=int)
    for window in a:
        found = [
            k
            for k, shard in enumerate(train.shards)
            if len(shard) >= 64
            and np.any(
                np.all(np.lib.stride_tricks.sliding_window_view(shard, 64) == window, axis=1)
            )
        ]
        assert found
        hits[found[0]] += 1
    full = [k for k, s in enumerate(train.shard_sizes) if s >= 64]
    assert all(hits[k] > 0 for k in full[:-1])  # every full shard gets sampled


def test_windows_longer_than_shards_are_never_sampled(
    tmp_path: Path, corpus: Corpus, small_tokenizer: Tokenizer
) -> None:
    train, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=1000)
    length = train.shard_sizes[-1] + 1  # the last, partial shard is too short
    assert length <= 1000
    windows = train.sample_windows(np.random.default_rng(3), 300, length)
    tail = train.shards[-1]
    assert not any(np.array_equal(w[: len(tail)], tail) for w in windows)


def test_iter_windows_in_order(tmp_path: Path, corpus: Corpus, small_tokenizer: Tokenizer) -> None:
    train, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=1000)
    windows = list(train.iter_windows(300))
    assert len(windows) == train.num_windows(300) == sum(s // 300 for s in train.shard_sizes)
    assert np.array_equal(windows[0], train.shards[0][:300]) and windows[0].dtype == np.int64
    assert np.array_equal(windows[3], train.shards[1][:300])  # 1000 // 300 = 3 per full shard
    assert len(list(train.iter_windows(300, max_windows=2))) == 2


def test_too_few_tokens_for_a_window(
    tmp_path: Path, corpus: Corpus, small_tokenizer: Tokenizer
) -> None:
    _, val = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path)
    length = val.num_tokens + 1
    with pytest.raises(DataError, match=f"val split .* fewer than one window of {length}"):
        val.sample_windows(np.random.default_rng(0), 1, length)
    with pytest.raises(DataError, match="fewer than one window"):
        next(val.iter_windows(length))
    train, _ = build_token_cache(corpus, small_tokenizer, cache_dir=tmp_path, shard_tokens=100)
    with pytest.raises(DataError, match="no shard holds a window of 101"):
        train.sample_windows(np.random.default_rng(0), 1, 101)


def test_vocab_too_large_for_uint16(tmp_path: Path, corpus: Corpus) -> None:
    class HugeTokenizer:
        vocab_size = 70_000

    with pytest.raises(DataError, match="uint16"):
        build_token_cache(corpus, HugeTokenizer(), cache_dir=tmp_path)
