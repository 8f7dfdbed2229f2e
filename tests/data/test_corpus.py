"""Corpus listing, UTF-8 checks, the hash split and fingerprints."""

from __future__ import annotations

import hashlib
import shutil
import sys
import types
from pathlib import Path

import pytest

from sparsecircuits.data import Corpus, SourceFile, load_corpus, stdlib_dir
from sparsecircuits.errors import DataError


def test_missing_and_empty_directory_name_the_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as exc:
        load_corpus(str(missing))
    assert str(missing) in str(exc.value)

    empty = tmp_path / "empty_corpus"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not python")
    with pytest.raises(DataError, match=r"contains no \.py files") as exc:
        load_corpus(str(empty))
    assert str(empty) in str(exc.value)


def test_non_utf8_and_binary_files_are_skipped_and_counted(tmp_path: Path, make_py_files) -> None:
    make_py_files(tmp_path, 5)
    (tmp_path / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "blob.py").write_bytes(b"x = 1\x00\x01\n")
    corpus = load_corpus(str(tmp_path))
    assert corpus.skipped == {"non_utf8": 1, "binary": 1}
    rels = {s.rel for s in corpus.train + corpus.val}
    assert "latin1.py" not in rels and "blob.py" not in rels
    assert len(rels) == 5
    assert len(list(corpus.iter_texts("train"))) == len(corpus.train)


def test_all_files_skipped_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_bytes(b"\xff\xfe")
    (tmp_path / "b.py").write_bytes(b"\x00")
    with pytest.raises(DataError, match="all 2 files were skipped"):
        load_corpus(str(tmp_path))


def test_split_is_deterministic_disjoint_and_follows_md5(tmp_path: Path, make_py_files) -> None:
    make_py_files(tmp_path, 200)
    first = load_corpus(str(tmp_path), val_fraction=0.1)
    second = load_corpus(str(tmp_path), val_fraction=0.1)
    assert first.train == second.train and first.val == second.val
    train, val = {s.rel for s in first.train}, {s.rel for s in first.val}
    assert not train & val
    assert len(train | val) == 200
    expected_val = {
        r for r in train | val if int(hashlib.md5(r.encode()).hexdigest(), 16) % 10000 < 1000
    }
    assert val == expected_val
    assert 5 <= len(val) <= 40  # ~20 expected
    assert [s.rel for s in first.train] == sorted(train)
    assert all(s.path == tmp_path / s.rel for s in first.train)


def test_split_guarantees_one_val_and_one_train(tmp_path: Path, make_py_files) -> None:
    make_py_files(tmp_path, 2)
    corpus = load_corpus(str(tmp_path), val_fraction=0.0)
    assert len(corpus.train) == 1 and len(corpus.val) == 1
    corpus = load_corpus(str(tmp_path), val_fraction=0.9999)
    assert len(corpus.train) == 1 and len(corpus.val) == 1

    single = tmp_path / "single"
    make_py_files(single, 1)
    corpus = load_corpus(str(single), val_fraction=0.5)
    assert len(corpus.train) == 1 and corpus.val == []


def test_bad_val_fraction(tmp_path: Path, make_py_files) -> None:
    make_py_files(tmp_path, 2)
    with pytest.raises(DataError, match="val_fraction"):
        load_corpus(str(tmp_path), val_fraction=1.0)


def test_fingerprint_depends_on_content_not_location(tmp_path: Path, make_py_files) -> None:
    make_py_files(tmp_path / "a", 10)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    fa = load_corpus(str(tmp_path / "a")).fingerprint()
    assert fa == load_corpus(str(tmp_path / "b")).fingerprint()
    (tmp_path / "b" / "mod_001.py").write_text("x = 2\n")
    assert load_corpus(str(tmp_path / "b")).fingerprint() != fa
    # A Corpus built by hand (no recorded digests) hashes the files itself, identically.
    loaded = load_corpus(str(tmp_path / "a"))
    manual = Corpus(name="a", root=loaded.root, train=loaded.train, val=loaded.val, skipped={})
    assert manual.fingerprint() == fa


def test_glob_pattern_root_and_rel(tmp_path: Path, make_py_files) -> None:
    make_py_files(tmp_path / "src", 6)
    (tmp_path / "src" / "README.md").write_text("# docs")
    corpus = load_corpus(str(tmp_path / "src" / "**" / "*.py"))
    assert corpus.root == tmp_path / "src"
    rels = sorted(s.rel for s in corpus.train + corpus.val)
    assert rels == sorted(["mod_001.py", "mod_002.py", "mod_004.py", "mod_005.py",
                           "pkg/mod_000.py", "pkg/mod_003.py"])  # fmt: skip
    with pytest.raises(DataError, match="matches no files"):
        load_corpus(str(tmp_path / "src" / "**" / "*.pyx"))


def test_iter_texts_skips_a_file_broken_after_loading(tmp_path: Path, make_py_files) -> None:
    make_py_files(tmp_path, 3)
    corpus = load_corpus(str(tmp_path), val_fraction=0.0)
    corpus.train[0].path.write_bytes(b"\xff")
    assert len(list(corpus.iter_texts("train"))) == len(corpus.train) - 1
    assert corpus.skipped == {"non_utf8": 1}


def test_stdlib_listing() -> None:
    corpus = load_corpus()
    assert corpus.root == stdlib_dir()
    assert corpus.name == "stdlib"
    rels = {s.rel for s in corpus.train + corpus.val}
    assert "json/__init__.py" in rels
    assert not any("site-packages" in r.split("/") for r in rels)
    assert len(corpus.val) >= 1 and len(rels) > 500
    assert load_corpus("stdlib").fingerprint() == corpus.fingerprint()


def test_hf_without_datasets_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install 'sparsecircuits\[hf\]'"):
        load_corpus(f"hf:{tmp_path}")


class _FakeDataset:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def test_hf_dataset_rows_become_documents(tmp_path: Path, monkeypatch, make_source) -> None:
    rows = [{"content": make_source(i), "lang": "py"} for i in range(30)]
    rows[3]["content"] = "bad \ud800 surrogate"
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: {"train": _FakeDataset(rows)}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    corpus = load_corpus(f"hf:{tmp_path}", val_fraction=0.2)
    assert corpus.skipped == {"non_utf8": 1}
    assert corpus.num_files() == 29
    texts = list(corpus.iter_texts("train")) + list(corpus.iter_texts("val"))
    assert sorted(texts) == sorted(r["content"] for i, r in enumerate(rows) if i != 3)
    assert all(isinstance(s, SourceFile) and s.rel.startswith("train/") for s in corpus.train)

    fake.load_from_disk = lambda path: _FakeDataset([{"body": "x"}])
    with pytest.raises(DataError, match="'content' or 'text' column"):
        load_corpus(f"hf:{tmp_path}")
