"""The weight-sparse GPT, its hooks, weight-sparsity projection and checkpoint I/O."""

from sparsecircuits.model.config import ALL_LOCS, NODE_LOCS, GPTConfig
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks, site_names
from sparsecircuits.model.io import load_model, save_model
from sparsecircuits.model.sparsity import WeightSparsity, l0_budget, sparse_parameter_names

__all__ = [
    "ALL_LOCS",
    "GPT",
    "NODE_LOCS",
    "GPTConfig",
    "Hooks",
    "WeightSparsity",
    "l0_budget",
    "load_model",
    "save_model",
    "site_names",
    "sparse_parameter_names",
]
