"""The fixed bigram logit table, filled from the training tokens.

The paper's released configs keep the table as a non-learned buffer; we fill it with smoothed
empirical log P(next | current) so the sparse weights need not memorise bigram statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsecircuits.data import TokenStore


def bigram_log_probs(store: TokenStore, *, vocab_size: int, alpha: float = 0.1) -> torch.Tensor:
    """(vocab, vocab) table of log((count(a, b) + alpha) / (count(a) + alpha * vocab))."""
    counts = np.zeros(vocab_size * vocab_size, dtype=np.int64)
    for shard in store.shards:
        a = shard[:-1].astype(np.int64)
        b = shard[1:].astype(np.int64)
        counts += np.bincount(a * vocab_size + b, minlength=vocab_size * vocab_size)
    table = torch.from_numpy(counts.reshape(vocab_size, vocab_size)).double() + alpha
    return (table / table.sum(dim=1, keepdim=True)).log().float()
