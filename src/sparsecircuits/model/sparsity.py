"""Weight sparsity: which parameters are sparse, their L0 budgets, and the top-k projection.

After every optimizer step each sparse parameter keeps exactly ``budget`` entries (largest |w|),
the same fraction for every matrix, and never fewer than ``min_per_neuron`` per output row
(row = output neuron / attention channel of a Linear, token of an embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparsecircuits import kernels

_EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")
_UNEMBED = "lm_head.weight"
_BLOCK_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
_BLOCK_BIASES = ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")


def sparse_parameter_names(
    model: nn.Module,
    *,
    dense_embeddings: bool = False,
    dense_unembed: bool = False,
    dense_biases: bool = False,
) -> list[str]:
    """Names of the parameters that get the top-k projection (official ``is_sparse_param``).

    Block Linear weights are always sparse; embeddings, unembedding and block biases unless the
    matching ``dense_*`` flag is set. Tied weights are listed once (as ``transformer.wte.weight``).
    """

    def is_sparse(name: str) -> bool:
        if name in _EMBEDDINGS:
            return not dense_embeddings
        if name == _UNEMBED:
            return not dense_unembed
        if name.endswith(_BLOCK_BIASES):
            return not dense_biases
        return name.endswith(_BLOCK_WEIGHTS)

    # named_parameters() skips tied duplicates, so a tied unembedding is listed as wte only.
    # Fixed sinusoidal positions are never trained, so never projected (decided by the config,
    # not by requires_grad: callers freeze whole models for pruning).
    config = getattr(model, "config", None)
    fixed = (
        {"transformer.wpe.weight"} if getattr(config, "sinusoidal_cat_pos_emb", False) else set()
    )
    return [name for name, _ in model.named_parameters() if name not in fixed and is_sparse(name)]


def l0_budget(shape: torch.Size | tuple[int, ...], frac: float) -> int:
    """Entries kept in a parameter of ``shape`` at nonzero fraction ``frac``: ``ceil(frac *
    numel)`` (at least 1), the same fraction for every matrix."""
    numel = math.prod(shape)
    return max(1, min(math.ceil(frac * numel - 1e-9), numel))


def row_floor(shape: torch.Size | tuple[int, ...], k: int, *, min_per_neuron: int) -> int:
    """Nonzeros guaranteed to every row of a matrix with budget ``k``: ``min_per_neuron``, but
    never more than fits in the budget (``k // rows``) or in a row. 0 for 1-D parameters.

    The budget wins over the floor so every matrix really has the target fraction: at d_model
    2048 and L0 1/1000 a 4-per-row floor would otherwise double some matrices' density."""
    if len(shape) != 2:
        return 0
    return min(min_per_neuron, shape[1], k // shape[0])


def project_topk_(w: torch.Tensor, k: int, *, min_per_neuron: int) -> torch.Tensor:
    """Zero all but ``k`` entries of ``w`` in place: each row's top ``row_floor`` by |w|
    first, then the largest remaining |w| overall. Exactly ``k`` slots are kept, ties to the
    lowest index, so ``(w != 0).sum() <= k`` with equality unless kept entries were already
    zero. Radix select, no sort (``kernels.project_topk_``). Returns the kept mask."""
    floor = row_floor(w.shape, k, min_per_neuron=min_per_neuron)
    return kernels.project_topk_(w, k, floor=floor)


@dataclass(frozen=True)
class MatrixL0:
    """Nonzero accounting for one sparse parameter."""

    name: str
    shape: tuple[int, ...]
    budget: int
    nonzero: int
    min_row_nonzero: int | None  # None for 1-D parameters
    row_floor: int  # nonzeros the projection guarantees each row (0 for 1-D)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class WeightSparsity:
    """Applies the projection to a model's sparse parameters and reports their nonzeros."""

    def __init__(self, model: nn.Module, names: list[str], *, min_per_neuron: int = 4) -> None:
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"model has no parameter(s) {missing}")
        self.params = {n: params[n] for n in names}
        self.min_per_neuron = min_per_neuron
        self.masks: dict[str, torch.Tensor] = {}  # kept supports of the last projection
        self.index: dict[str, torch.Tensor] = {}  # their flat indices (support_index)
        self._index_of: dict[str, torch.Tensor] | None = None  # the masks `index` was made from
        # Per parameter, the share of its squared gradient on its support at the last
        # regrowth step (the fast mode estimates the full gradient RMS with it in between).
        self.grad_shares: dict[str, float] = {}

    def budgets(self, frac: float) -> dict[str, int]:
        """``{name: budget}`` at nonzero fraction ``frac``."""
        return {n: l0_budget(p.shape, frac) for n, p in self.params.items()}

    @torch.no_grad()
    def project_(self, frac: float) -> None:
        """Project every sparse parameter to its budget at ``frac`` (no-op when dense) and
        remember the kept supports for ``keep_support_``."""
        if frac >= 1.0:
            self.masks, self.index = {}, {}
            return
        self.masks = {
            n: project_topk_(self.params[n].data, k, min_per_neuron=self.min_per_neuron)
            for n, k in self.budgets(frac).items()
        }
        self.index = {}

    @torch.no_grad()
    def adopt_supports_(self, frac: float) -> None:
        """Take each parameter's nonzeros as its support (a resumed run's last projection)."""
        self.masks = {} if frac >= 1.0 else {n: p != 0 for n, p in self.params.items()}
        self.index = {}

    def support_index(self) -> dict[str, torch.Tensor]:
        """``{name: flat int64 indices of its support}`` for the supports of the last
        projection (computed once per projection)."""
        if self._index_of is not self.masks:  # a new projection (or adopted supports)
            self.index = {n: kernels.support_index(m) for n, m in self.masks.items()}
            self._index_of = self.masks
        return self.index

    def support_sizes(self) -> dict[int, int]:
        """``{id(parameter): entries in its support}`` for the supports of the last projection."""
        return {id(self.params[n]): i.numel() for n, i in self.support_index().items()}

    @torch.no_grad()
    def keep_support_(self, *, skip: frozenset[int] = frozenset()) -> None:
        """Zero every entry outside the supports of the last ``project_`` (cheaper than a new
        projection: the fast training mode's steps between regrowths, where AdamW momentum
        would otherwise move weights off the support). ``skip``: ids of parameters known to
        be zero there already."""
        for n, mask in self.masks.items():
            if id(self.params[n]) not in skip:
                self.params[n].masked_fill_(~mask, 0.0)  # (not .data: bump its version)

    @torch.no_grad()
    def report(self, frac: float) -> list[MatrixL0]:
        """Budget, exact nonzero count and smallest per-row count of each sparse parameter."""
        out = []
        for n, k in self.budgets(frac).items():
            p = self.params[n]
            nz = p != 0
            row_min = int(nz.sum(dim=1).min()) if p.dim() == 2 else None
            floor = row_floor(p.shape, k, min_per_neuron=self.min_per_neuron)
            out.append(MatrixL0(n, tuple(p.shape), k, int(nz.sum()), row_min, floor))
        return out
