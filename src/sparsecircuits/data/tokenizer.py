"""Byte-level BPE tokenizer with the tinypython_2k pre-tokenizer (HF ``tokenizers`` backend).

Token ids: ``0 .. vocab_size - 2`` are BPE tokens, ``vocab_size - 1`` is ``<|endoftext|>``. Text
never encodes to the EOT id (a literal ``"<|endoftext|>"`` in source code is encoded as ordinary
bytes); append :attr:`Tokenizer.eot_id` yourself between documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from sparsecircuits.errors import DataError, InputError
from sparsecircuits.fileio import atomic_write_bytes

VOCAB_SIZE = 2048
EOT = "<|endoftext|>"
# The paper's tinypython_2k split pattern. Punctuation runs keep trailing newlines and slashes
# (`"]]\n` is one pre-token), so tokens such as '")\n' can be learned. The (?!\S) lookahead is
# supported by the onig engine behind tokenizers.Regex.
PRETOKENIZE_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TOKENIZER_FILE = "tokenizer.json"
GPT2_ENCODER_FILE = "encoder.json"
GPT2_MERGES_FILE = "vocab.bpe"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE token strings."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _configure(hf: HFTokenizer) -> None:
    """Install the tinypython pre-tokenizer and byte-level decoder on ``hf``."""
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()


class Tokenizer:
    """A byte-level BPE tokenizer whose last id is ``<|endoftext|>``."""

    def __init__(self, hf: HFTokenizer, *, source: str = "<memory>") -> None:
        self._hf = hf
        # Special tokens typed in the text are ordinary bytes, so a corpus cannot inject EOT.
        self._hf.encode_special_tokens = True
        eot_id = hf.token_to_id(EOT)
        if eot_id is None:
            raise DataError(f"tokenizer {source} has no {EOT} token")
        self._eot_id = eot_id
        self._special_ids = frozenset(hf.get_added_tokens_decoder())

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped HF ``tokenizers.Tokenizer``."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``."""
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOT added)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust backend."""
        return [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (EOT kept as ``<|endoftext|>``; broken UTF-8 becomes U+FFFD)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._hf.decode(ids, skip_special_tokens=False)

    def id_to_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` stands for."""
        token = self._hf.id_to_token(int(i))
        if token is None:
            raise InputError(f"token id {i} is out of range for a vocab of {self.vocab_size}")
        if int(i) in self._special_ids:
            return token.encode("utf-8")
        table = _unicode_to_bytes()
        return bytes(table[c] for c in token)

    def id_to_token(self, i: int) -> str:
        """Readable text of token ``i`` (e.g. '")' or '\\n'); partial UTF-8 shows as '\\xc3'."""
        return self.id_to_bytes(i).decode("utf-8", errors="backslashreplace")

    def token_to_id(self, s: str) -> int | None:
        """Id of the single token whose text is ``s``, or None if ``s`` is not one token."""
        special = self._hf.token_to_id(s)
        if special is not None and special in self._special_ids:
            return special
        table = bytes_to_unicode()
        return self._hf.token_to_id("".join(table[b] for b in s.encode("utf-8")))

    def to_json(self) -> str:
        """The HF tokenizer JSON."""
        return self._hf.to_str()

    def fingerprint(self) -> str:
        """sha256 hex of the tokenizer JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` atomically; returns its path."""
        path = Path(directory) / TOKENIZER_FILE
        atomic_write_bytes(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (the file or its directory) or GPT-2 style
        ``encoder.json`` + ``vocab.bpe`` (e.g. the official tinypython_2k files)."""
        path = Path(path)
        if path.is_dir():
            if (path / TOKENIZER_FILE).is_file():
                path = path / TOKENIZER_FILE
            elif (path / GPT2_ENCODER_FILE).is_file() or (path / GPT2_MERGES_FILE).is_file():
                return _load_gpt2(path)
            else:
                raise DataError(
                    f"tokenizer directory {path} has neither {TOKENIZER_FILE} nor "
                    f"{GPT2_ENCODER_FILE} + {GPT2_MERGES_FILE}"
                )
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as exc:  # the Rust side raises a bare Exception for a bad file
            raise DataError(
                f"tokenizer file {path} is not a valid tokenizer.json ({exc})"
            ) from None
        return cls(hf, source=str(path))


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE on ``texts``: ``vocab_size - 1`` BPE tokens (256 bytes + merges),
    then ``<|endoftext|>`` as id ``vocab_size - 1``. Same texts -> identical tokenizer JSON."""
    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + 1 merge + EOT), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    _configure(hf)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    learned = hf.get_vocab_size(with_added_tokens=True)
    if learned != vocab_size - 1:
        raise DataError(
            f"tokenizer training learned {learned} tokens, expected {vocab_size - 1}: "
            f"the corpus is too small for vocab_size {vocab_size}"
        )
    hf.add_special_tokens([EOT])
    tok = Tokenizer(hf)
    if tok.eot_id != vocab_size - 1:
        raise DataError(f"{EOT} got id {tok.eot_id}, expected {vocab_size - 1}")
    return tok


def _load_gpt2(directory: Path) -> Tokenizer:
    """Byte-level BPE from GPT-2 style ``encoder.json`` (token -> id) and ``vocab.bpe`` (merges)."""
    encoder_path, merges_path = directory / GPT2_ENCODER_FILE, directory / GPT2_MERGES_FILE
    for p in (encoder_path, merges_path):
        if not p.is_file():
            raise DataError(f"tokenizer file {p} does not exist")
    try:
        vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"tokenizer file {encoder_path} is not valid JSON ({exc})") from None
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in vocab.items()
    ):
        raise DataError(f"tokenizer file {encoder_path}: expected a JSON object of token -> int id")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise DataError(f"tokenizer file {encoder_path}: ids must be 0..{len(ids) - 1}, each once")
    # Without every byte, BPE (which has no unknown token) would silently drop text.
    absent = [c for c in bytes_to_unicode().values() if c not in vocab]
    if absent:
        raise DataError(
            f"tokenizer file {encoder_path} lacks {len(absent)} of the 256 byte tokens "
            f"(e.g. {absent[0]!r}); expected a byte-level BPE vocab"
        )
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"tokenizer file {merges_path} is not UTF-8 text") from None
    merges = []
    for lineno, line in enumerate(lines, start=1):
        if (lineno == 1 and line.startswith("#version")) or not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise DataError(f"tokenizer file {merges_path} line {lineno}: expected 'left right'")
        # Checked here because the Rust BPE builder panics (uncatchable noise) on such merges.
        missing = [t for t in (pair[0], pair[1], pair[0] + pair[1]) if t not in vocab]
        if missing:
            raise DataError(
                f"tokenizer file {merges_path} line {lineno}: token {missing[0]!r} "
                f"is not in {GPT2_ENCODER_FILE}"
            )
        merges.append((pair[0], pair[1]))
    # EOT, when present in encoder.json, keeps its id; otherwise it is appended after the merges.
    bpe_vocab = {k: v for k, v in vocab.items() if k != EOT}
    try:
        model = models.BPE(vocab=bpe_vocab, merges=merges)
    except Exception as exc:  # e.g. a merge whose parts are not in the vocab
        raise DataError(f"tokenizer files in {directory} are inconsistent ({exc})") from None
    hf = HFTokenizer(model)
    _configure(hf)
    hf.add_special_tokens([EOT])
    if EOT in vocab and hf.token_to_id(EOT) != vocab[EOT]:
        raise DataError(f"tokenizer file {encoder_path}: {EOT} id {vocab[EOT]} must be the last id")
    return Tokenizer(hf, source=str(directory))
