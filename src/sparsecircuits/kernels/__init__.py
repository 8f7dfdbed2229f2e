"""Compute proportional to nonzeros: compiled CPU kernels with a pure-torch fallback.

- ``abstopk`` / ``project_topk_``: exact top-k selection by radix select (no sort).
- ``sparse_linear``: ``F.linear`` through CSR kernels below a measured density crossover,
  with an exact (dense) or support-only weight gradient.
- ``causal_attention``: causal attention with an optional sink, a kernel for narrow heads.
- ``cross_entropy``, ``add_logit_tables``: the loss and the logit tables, fused passes.
- ``rms_norm``: RMSNorm in one pass each way.
- ``adamw_at_``, ``sumsq``: AdamW steps and squared norms on a support's flat indices.
- ``backend()``: ``"cpp"`` when the compiled library is in use, else ``"torch"``.

The lowest layer of the package: it imports nothing from the rest of sparsecircuits except
errors, so ``model/`` and ``train/`` can use it.
"""

from sparsecircuits.kernels._lib import backend, library_path
from sparsecircuits.kernels.attention import causal_attention
from sparsecircuits.kernels.csr import CSRPattern, build_pattern
from sparsecircuits.kernels.linear import GradMode, LinearKernelState, Regrowth, sparse_linear
from sparsecircuits.kernels.loss import add_logit_tables, cross_entropy
from sparsecircuits.kernels.norm import rms_norm
from sparsecircuits.kernels.optim import adamw_at_, sumsq, support_index
from sparsecircuits.kernels.select import (
    abstopk,
    abstopk_,
    gelu_abstopk,
    project_topk_,
    topk_mask,
)

__all__ = [
    "CSRPattern",
    "GradMode",
    "LinearKernelState",
    "Regrowth",
    "abstopk",
    "abstopk_",
    "adamw_at_",
    "add_logit_tables",
    "backend",
    "build_pattern",
    "causal_attention",
    "cross_entropy",
    "gelu_abstopk",
    "library_path",
    "project_topk_",
    "rms_norm",
    "sparse_linear",
    "sumsq",
    "support_index",
    "topk_mask",
]
