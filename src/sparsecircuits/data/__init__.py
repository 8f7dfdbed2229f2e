"""Corpus loading, the BPE tokenizer and the tokenised shard cache."""

from sparsecircuits.data.corpus import Corpus, SourceFile, load_corpus, stdlib_dir
from sparsecircuits.data.shards import TokenStore, build_token_cache
from sparsecircuits.data.tokenizer import EOT, VOCAB_SIZE, Tokenizer, train_tokenizer

__all__ = [
    "EOT",
    "VOCAB_SIZE",
    "Corpus",
    "SourceFile",
    "TokenStore",
    "Tokenizer",
    "build_token_cache",
    "load_corpus",
    "stdlib_dir",
    "train_tokenizer",
]
