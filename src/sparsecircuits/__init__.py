"""sparsecircuits: interpretable-by-design weight-sparse transformers.

Heavy modules load lazily so ``import sparsecircuits`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "GPT": "sparsecircuits.model",
    "GPTConfig": "sparsecircuits.model",
    "load_model": "sparsecircuits.model",
    "save_model": "sparsecircuits.model",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparsecircuits' has no attribute {name!r}")


__all__ = ["GPT", "GPTConfig", "__version__", "load_model", "save_model"]
