"""A JSON-ready description of a model: config, parameter counts, nonzeros per matrix."""

from __future__ import annotations

from typing import Any

import torch

from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.sparsity import l0_budget, sparse_parameter_names


@torch.no_grad()
def model_summary(model: GPT, *, sparsity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config, total/nonzero parameter counts, and for every parameter its shape, nonzeros,
    density and (matrices) fewest nonzeros in a row.

    ``sparsity`` is the model's ``sparsity.json`` (written by the trainer): with it, sparse
    parameters follow its ``dense_*`` flags and each gets its L0 ``budget`` at ``target_l0``.
    """
    sp = sparsity or {}
    sparse = set(
        sparse_parameter_names(
            model,
            dense_embeddings=bool(sp.get("dense_embeddings", False)),
            dense_unembed=bool(sp.get("dense_unembed", False)),
            dense_biases=bool(sp.get("dense_biases", False)),
        )
    )
    rows = []
    for name, p in model.named_parameters():
        nz = p != 0
        budget = None
        if sparsity is not None and name in sparse:
            budget = l0_budget(p.shape, float(sp["target_l0"]))
        rows.append(
            {
                "name": name,
                "shape": list(p.shape),
                "numel": p.numel(),
                "nonzero": int(nz.sum()),
                "density": float(nz.float().mean()),
                "min_row_nonzero": int(nz.sum(dim=1).min()) if p.dim() == 2 else None,
                "sparse": name in sparse,
                "budget": budget,
            }
        )
    total = sum(r["numel"] for r in rows)
    return {
        "config": model.config.to_json_dict(),
        "total_params": total,
        "nonzero_params": sum(r["nonzero"] for r in rows),
        "sparse_params": sum(r["numel"] for r in rows if r["sparse"]),
        "sparse_nonzero": sum(r["nonzero"] for r in rows if r["sparse"]),
        "sparsity": sparsity,
        "buffers": {n: list(b.shape) for n, b in model.named_buffers()},
        "parameters": rows,
    }
