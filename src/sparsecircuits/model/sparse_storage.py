"""Weight-sparse models held as their nonzeros only (inference): memory proportional to nnz.

``load_model(path, storage="sparse")`` builds the model without ever allocating its dense
weight matrices: every weight the file stores as indices + values (``model/compact.py``)
becomes a :class:`CSRLinear` (values + CSR indices); everything else loads as usual. The model
computes the same function (CSR kernels, ``kernels/linear.py``), supports gradients with
respect to activations (pruning, attribution), but its weights are constants.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsecircuits.kernels import CSRPattern
from sparsecircuits.kernels.csr import gather
from sparsecircuits.kernels.linear import spmm
from sparsecircuits.model.layers import Linear


def csr_from_flat(rows: int, cols: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow (rows+1,) int64, col (nnz,) int32) of a (rows, cols) matrix from the sorted flat
    indices of its nonzeros, without a dense intermediate."""
    flat = flat.long()
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(flat // cols, minlength=rows).cumsum(0)
    return crow, (flat % cols).to(torch.int32)


def full_pattern(rows: int, cols: int, crow: torch.Tensor, col: torch.Tensor) -> CSRPattern:
    """The complete pattern (flat indices and the transpose) from CSR indices."""
    r = torch.repeat_interleave(torch.arange(rows), crow.diff())
    c = col.long()
    perm = torch.sort(c * rows + r).indices
    crow_t = torch.zeros(cols + 1, dtype=torch.int64)
    crow_t[1:] = torch.bincount(c, minlength=cols).cumsum(0)
    return CSRPattern(rows, cols, crow, col, r * cols + c, crow_t, r[perm].to(torch.int32), perm)


class _CSRProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, module: CSRLinear):  # type: ignore[override]
        ctx.module = module
        ctx.save_for_backward(values)
        return spmm(module.crow, module.col, values, x, bias, module.out_features)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        (values,) = ctx.saved_tensors
        p = ctx.module.pattern  # transposed indices are built on the first backward only
        val_t = gather(values, p.perm)
        dx = spmm(p.crow_t, p.col_t, val_t, dy.contiguous(), None, p.cols)
        return dx, None, None, None


class CSRLinear(nn.Module):
    """A frozen ``Linear`` stored as CSR: ``y = x W^T + b`` with W's nonzeros only.

    Holds values (4 bytes) and column indices (4 bytes) per nonzero; the transpose that
    gradients with respect to ``x`` need is built on first use."""

    def __init__(
        self,
        shape: tuple[int, int],
        crow: torch.Tensor,
        col: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.crow, self.col = crow, col
        self._pattern: CSRPattern | None = None
        self.register_buffer("values", values.float().contiguous())
        self.register_buffer("bias", bias)

    @property
    def pattern(self) -> CSRPattern:
        if self._pattern is None:
            self._pattern = full_pattern(self.out_features, self.in_features, self.crow, self.col)
        return self._pattern

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, built on demand (for inspection; costs rows * cols floats)."""
        w = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype)
        w[self.pattern.flat] = self.values
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        bias = self.bias.float() if self.bias is not None else None
        x2 = x.reshape(-1, self.in_features).float()
        y = _CSRProduct.apply(x2, self.values.float(), bias, self)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nnz={self.col.numel()}"


def csr_module_names(model: nn.Module) -> list[str]:
    """Names of the ``Linear`` modules that sparse storage replaces (a tied lm_head is not)."""
    tied = getattr(getattr(model, "config", None), "tied_unembed", False)
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, Linear) and not (tied and name == "lm_head")
    ]


def install_csr_(model: nn.Module, name: str, module: CSRLinear) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def nnz_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, CSR indices included."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for m in model.modules():
        if isinstance(m, CSRLinear):
            held = [m.crow, m.col]
            if m._pattern is not None:
                p = m._pattern
                held += [p.flat, p.crow_t, p.col_t, p.perm]
            total += sum(t.numel() * t.element_size() for t in held)
    return total
