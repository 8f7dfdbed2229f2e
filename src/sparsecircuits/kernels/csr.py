"""The nonzero pattern of a weight matrix as CSR, with its transpose, for the sparse products.

A pattern holds indices only: the values are gathered from the dense parameter at call time
(``weight.view(-1)[pattern.flat]``, O(nnz)), so the parameter, its optimizer state and the
checkpoint format stay exactly what they are for dense training.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sparsecircuits.kernels._lib import lib, threads_for


@dataclass(frozen=True)
class CSRPattern:
    """Nonzero layout of a (rows, cols) matrix W and of W^T.

    crow (rows+1,) int64, col (nnz,) int32, flat (nnz,) int64 = row * cols + col;
    crow_t (cols+1,), col_t (nnz,) int32: CSR of W^T; perm (nnz,) int64: W^T's values are
    ``values[perm]``.
    """

    rows: int
    cols: int
    crow: torch.Tensor
    col: torch.Tensor
    flat: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    perm: torch.Tensor

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.rows * self.cols)

    def row_index(self) -> torch.Tensor:
        """(nnz,) int64 row of each nonzero."""
        return torch.div(self.flat, self.cols, rounding_mode="floor")

    @functools.cached_property
    def coo_indices(self) -> torch.Tensor:
        """(2, nnz) int64 (row, column) of each nonzero, in CSR (= flat index) order."""
        return torch.stack([self.row_index(), self.col.long()])

    def coo(self, values: torch.Tensor) -> torch.Tensor:
        """A sparse COO (rows, cols) tensor with ``values`` (nnz,) at the nonzeros (coalesced:
        CSR order is row-major)."""
        return torch.sparse_coo_tensor(
            self.coo_indices, values, (self.rows, self.cols), is_coalesced=True,
            check_invariants=False,
        )  # fmt: skip


def _use_cpp(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32 and lib() is not None


def gather(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src.reshape(-1)[index]`` (index int64, 1-D) -> (len(index),): a pattern's values from
    its weight (``pattern.flat``) or W^T's from W's (``pattern.perm``)."""
    if (
        _use_cpp(src)
        and src.is_contiguous()
        and index.is_contiguous()
        and index.dtype == torch.int64
    ):
        out = torch.empty(index.numel(), dtype=src.dtype)
        lib().sc_gather(
            src.data_ptr(), index.data_ptr(), index.numel(), out.data_ptr(),
            threads_for(index.numel()),
        )  # fmt: skip
        return out
    return torch.index_select(src.reshape(-1), 0, index)


@torch.no_grad()
def build_pattern(w: torch.Tensor) -> CSRPattern:
    """CSR pattern of the nonzeros of a 2-D float tensor (one O(numel) scan)."""
    rows, cols = w.shape
    w = w.detach()
    if _use_cpp(w) and w.is_contiguous():
        threads = torch.get_num_threads()
        crow = torch.empty(rows + 1, dtype=torch.int64)
        nnz = lib().sc_csr_count(w.data_ptr(), rows, cols, crow.data_ptr(), threads)
        col = torch.empty(nnz, dtype=torch.int32)
        flat = torch.empty(nnz, dtype=torch.int64)
        lib().sc_csr_fill(
            w.data_ptr(), rows, cols, crow.data_ptr(), col.data_ptr(), 0, flat.data_ptr(),
            threads,
        )  # fmt: skip
        crow_t = torch.empty(cols + 1, dtype=torch.int64)
        col_t = torch.empty(nnz, dtype=torch.int32)
        perm = torch.empty(nnz, dtype=torch.int64)
        lib().sc_csr_transpose(
            rows, cols, crow.data_ptr(), col.data_ptr(), crow_t.data_ptr(), col_t.data_ptr(),
            perm.data_ptr(),
        )  # fmt: skip
        return CSRPattern(rows, cols, crow, col, flat, crow_t, col_t, perm)
    flat = torch.nonzero(w.reshape(-1) != 0).reshape(-1).cpu()
    r, c = flat // cols, flat % cols
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(r, minlength=rows).cumsum(0)
    perm = torch.sort(c * rows + r).indices  # W^T in row-major order: by column, then row
    crow_t = torch.zeros(cols + 1, dtype=torch.int64)
    crow_t[1:] = torch.bincount(c, minlength=cols).cumsum(0)
    return CSRPattern(
        rows, cols, crow, c.to(torch.int32), flat, crow_t, r[perm].to(torch.int32), perm
    )
