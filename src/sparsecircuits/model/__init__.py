"""The weight-sparse GPT, its hooks, weight-sparsity projection and checkpoint I/O.

Names load lazily (PEP 562), so light users such as the dashboard's first render can import
``sparsecircuits.model.config`` without importing torch.
"""

from __future__ import annotations

from sparsecircuits._lazy import lazy_getattr

_LAZY = {
    "ALL_LOCS": "sparsecircuits.model.config",
    "NODE_LOCS": "sparsecircuits.model.config",
    "GPTConfig": "sparsecircuits.model.config",
    "GPT": "sparsecircuits.model.gpt",
    "Hooks": "sparsecircuits.model.hooks",
    "KVCache": "sparsecircuits.model.cache",
    "site_names": "sparsecircuits.model.hooks",
    "load_model": "sparsecircuits.model.io",
    "save_model": "sparsecircuits.model.io",
    "WeightSparsity": "sparsecircuits.model.sparsity",
    "l0_budget": "sparsecircuits.model.sparsity",
    "sparse_parameter_names": "sparsecircuits.model.sparsity",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = sorted(_LAZY)
