"""Tokenizer training, round-trips, save/load and the GPT-2 style (official) file format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsecircuits.data import EOT, VOCAB_SIZE, Tokenizer, stdlib_dir, train_tokenizer
from sparsecircuits.data.tokenizer import bytes_to_unicode
from sparsecircuits.errors import DataError, InputError

ROUND_TRIP = [
    "def f(x):\n\treturn x['a']]\r\n",
    's = "héllo wörld ✓ 🐍 中文"  # unicode\n',
    "  \n\n\t \r\n  x=1\n",
    "print('<|endoftext|>')\n",
    "",
]


@pytest.fixture(scope="module")
def full_vocab_tokenizer() -> Tokenizer:
    # A handful of real stdlib modules (~300 KB) is enough to learn 2047 tokens quickly.
    names = ["json/decoder.py", "json/encoder.py", "textwrap.py", "argparse.py", "typing.py"]
    return train_tokenizer([(stdlib_dir() / n).read_text(encoding="utf-8") for n in names])


def test_eot_is_last_id_with_default_vocab(full_vocab_tokenizer: Tokenizer) -> None:
    tok = full_vocab_tokenizer
    assert tok.vocab_size == VOCAB_SIZE == 2048
    assert tok.eot_id == 2047
    assert tok.id_to_token(2047) == EOT
    assert tok.token_to_id(EOT) == 2047
    assert tok.decode([tok.eot_id]) == EOT


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(full_vocab_tokenizer: Tokenizer, small_tokenizer: Tokenizer, text: str) -> None:
    for tok in (full_vocab_tokenizer, small_tokenizer):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids  # a literal "<|endoftext|>" in code is plain text
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_encode_batch_matches_encode(small_tokenizer: Tokenizer) -> None:
    assert small_tokenizer.encode_batch(ROUND_TRIP) == [
        small_tokenizer.encode(t) for t in ROUND_TRIP
    ]


def test_training_is_deterministic(make_source) -> None:
    texts = [make_source(i) for i in range(100)]
    a = train_tokenizer(texts, vocab_size=290)
    b = train_tokenizer(list(texts), vocab_size=290)
    assert a.to_json() == b.to_json()
    assert a.fingerprint() == b.fingerprint()
    assert a.eot_id == 289


def test_too_small_corpus_is_reported() -> None:
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["ab"], vocab_size=400)


def test_pretokenizer_keeps_punctuation_with_newline(full_vocab_tokenizer: Tokenizer) -> None:
    pieces = full_vocab_tokenizer.backend.pre_tokenizer.pre_tokenize_str('print("a")\n    x]]\n')
    # Byte-level strings: "Ċ" is "\n", "Ġ" is " ".
    assert [p for p, _ in pieces] == ["print", '("', "a", '")Ċ', "ĠĠĠ", "Ġx", "]]Ċ"]
    tok = full_vocab_tokenizer
    assert tok.token_to_id(")\n") is not None  # a punctuation+newline merge was learned
    assert tok.id_to_token(tok.token_to_id(")\n")) == ")\n"


def test_token_text_mapping_is_consistent(full_vocab_tokenizer: Tokenizer) -> None:
    tok = full_vocab_tokenizer
    checked = 0
    for i in range(tok.vocab_size):
        raw = tok.id_to_bytes(i)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            assert "\\x" in tok.id_to_token(i)
            continue
        assert tok.id_to_token(i) == text
        assert tok.token_to_id(text) == i
        checked += 1
    assert checked > 1500
    assert tok.token_to_id("definitely not one token") is None
    with pytest.raises(InputError):
        tok.id_to_token(tok.vocab_size)


def test_save_and_load(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    path = small_tokenizer.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for source in (tmp_path / "tok", path):
        loaded = Tokenizer.load(source)
        assert loaded.fingerprint() == small_tokenizer.fingerprint()
        assert loaded.encode(ROUND_TRIP[0]) == small_tokenizer.encode(ROUND_TRIP[0])
        assert loaded.eot_id == small_tokenizer.eot_id


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"neither tokenizer\.json"):
        Tokenizer.load(tmp_path)
    missing = tmp_path / "missing.json"
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(missing)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(DataError, match=r"not a valid tokenizer\.json") as exc:
        Tokenizer.load(tmp_path)
    assert str(bad) in str(exc.value)


def _write_gpt2_files(directory: Path, merges: list[tuple[str, str]], *, eot: bool) -> dict:
    """A tiny GPT-2 style encoder.json/vocab.bpe in the data-gym byte alphabet."""
    directory.mkdir(parents=True, exist_ok=True)
    b2u = bytes_to_unicode()
    encoder = {b2u[b]: i for i, b in enumerate(b2u)}  # printable bytes first, as GPT-2 does
    for left, right in merges:
        encoder[left + right] = len(encoder)
    if eot:
        encoder[EOT] = len(encoder)
    (directory / "encoder.json").write_text(json.dumps(encoder))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "vocab.bpe").write_text("\n".join(lines) + "\n")
    return encoder


@pytest.mark.parametrize("eot", [True, False])
def test_gpt2_files_load_and_apply_merges(tmp_path: Path, eot: bool) -> None:
    merges = [("Ġ", "i"), ("Ġi", "n"), ("r", "e"), ("re", "t"), (")", "Ċ"), ('"', ")Ċ")]
    encoder = _write_gpt2_files(tmp_path, merges, eot=eot)
    tok = Tokenizer.load(tmp_path)
    assert tok.vocab_size == 256 + len(merges) + 1
    assert tok.eot_id == tok.vocab_size - 1
    assert tok.encode(" in") == [encoder["Ġin"]]
    assert tok.encode('ret")\n') == [encoder["ret"], encoder['")Ċ']]
    # No merge for "ab": two byte tokens, with GPT-2 ids ("a" is byte 97 -> id 97 - 33).
    assert tok.encode("ab") == [ord("a") - 33, ord("b") - 33]
    text = 'for x in ret:\n    print("é")\n'
    assert tok.decode(tok.encode(text)) == text
    assert tok.id_to_token(encoder['")Ċ']) == '")\n'


def test_gpt2_files_errors(tmp_path: Path) -> None:
    _write_gpt2_files(tmp_path, [("a", "b")], eot=True)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na c\n")
    with pytest.raises(DataError, match=r"vocab\.bpe line 2"):
        Tokenizer.load(tmp_path)
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(DataError, match=r"vocab\.bpe does not exist"):
        Tokenizer.load(tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    (tmp_path / "encoder.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"encoder\.json"):
        Tokenizer.load(tmp_path)
