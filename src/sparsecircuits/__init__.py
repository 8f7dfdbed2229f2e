"""sparsecircuits: interpretable-by-design weight-sparse transformers.

Heavy modules load lazily so ``import sparsecircuits`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

from sparsecircuits._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "GPT": "sparsecircuits.model",
    "GPTConfig": "sparsecircuits.model",
    "load_model": "sparsecircuits.model",
    "save_model": "sparsecircuits.model",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["GPT", "GPTConfig", "__version__", "load_model", "save_model"]
