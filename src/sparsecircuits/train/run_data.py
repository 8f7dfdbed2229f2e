"""The data side of a training run: its tokenizer, token caches and data fingerprints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sparsecircuits.data import Tokenizer, TokenStore, build_token_cache, load_corpus
from sparsecircuits.data import train_tokenizer as fit_tokenizer
from sparsecircuits.data.tokenizer import TOKENIZER_FILE
from sparsecircuits.model.io import resolve_model_dir
from sparsecircuits.train.config import TrainConfig

log = logging.getLogger(__name__)


def build_run_data(
    cfg: TrainConfig, run_dir: Path, cache_dir: Path, *, resume: bool
) -> tuple[Tokenizer, TokenStore, TokenStore, dict[str, Any]]:
    """Tokenizer, token caches and data fingerprints of a run: the run's own tokenizer on
    resume, else the configured one (a path or a shipped model's name), else a BPE fitted on the
    corpus (cached by corpus fingerprint and vocabulary size)."""
    corpus = load_corpus(cfg.corpus, val_fraction=cfg.val_fraction)
    run_tok = run_dir / TOKENIZER_FILE
    if resume and run_tok.exists():
        tok = Tokenizer.load(run_tok)
    elif cfg.tokenizer is not None:
        # A path, or a shipped model's name ("stdlib-sparse"): its tokenizer, so models
        # trained on another corpus keep the stdlib vocabulary and compare token for token.
        spec = cfg.tokenizer
        tok = Tokenizer.load(spec if Path(spec).exists() else resolve_model_dir(spec))
    else:
        key = f"{corpus.fingerprint()[:16]}-{cfg.tokenizer_vocab}"
        cached = cache_dir / "tokenizers" / key / TOKENIZER_FILE
        if cached.exists():
            tok = Tokenizer.load(cached)
        else:
            log.info(
                "training a %d-token BPE on %d files",
                cfg.tokenizer_vocab,
                len(corpus.train),
            )
            tok = fit_tokenizer(corpus.iter_texts("train"), vocab_size=cfg.tokenizer_vocab)
            tok.save(cached.parent)
    train, val = build_token_cache(corpus, tok, cache_dir=cache_dir / "tokens")
    data = {
        "corpus": cfg.corpus,
        "corpus_fingerprint": corpus.fingerprint(),
        "tokenizer_fingerprint": tok.fingerprint(),
        "train_files": len(corpus.train),
        "val_files": len(corpus.val),
        "train_tokens": train.num_tokens,
        "val_tokens": val.num_tokens,
    }
    return tok, train, val, data
