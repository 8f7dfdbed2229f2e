"""Compact weight storage for shipped models: sparse tensors as flat indices + values, fp16
where requested. Loads back into ordinary dense tensors for the same model class.

Inside ``model.safetensors`` a compacted tensor ``name`` is stored as ``name::idx`` (int32 flat
indices of the nonzeros) and ``name::val``; the file's metadata maps every stored name to how
to rebuild it (shape, dtype, encoding), so a reader needs nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Literal

import torch

from sparsecircuits.errors import CheckpointError

META_KEY = "sparsecircuits.compact"
_IDX, _VAL = "::idx", "::val"
Encoding = Literal["sparse", "dense"]


def compact_state(
    state: dict[str, torch.Tensor],
    *,
    fp16: Collection[str] = (),
    max_density: float = 0.25,
    min_numel: int = 4096,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Encode a state dict. Floating tensors of at least ``min_numel`` entries with at most
    ``max_density`` nonzeros become (indices, values); tensors named in ``fp16`` are stored in
    half precision. Returns (tensors to save, safetensors metadata).

    Half precision is opt-in per tensor: weights that feed AbsTopK can flip which activations
    are kept, so rounding them moves logits by far more than the rounding itself.
    """
    out: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        spec = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        big_float = t.is_floating_point() and t.numel() >= min_numel
        store_dtype = torch.float16 if (name in fp16 and t.is_floating_point()) else t.dtype
        flat = t.reshape(-1)
        nz = flat.nonzero().squeeze(1)
        if big_float and nz.numel() <= max_density * flat.numel():
            if flat.numel() >= 2**31:
                raise CheckpointError(f"{name}: too large for int32 indices")
            out[name + _IDX] = nz.to(torch.int32)
            out[name + _VAL] = flat[nz].to(store_dtype)
            index[name] = {**spec, "encoding": "sparse"}
        else:
            out[name] = t.to(store_dtype)
            index[name] = {**spec, "encoding": "dense"}
    return out, {META_KEY: json.dumps(index)}


def check_flat_indices(flat: torch.Tensor, numel: int, *, name: str, source: str) -> None:
    """Raise CheckpointError unless the stored flat indices of tensor ``name`` are integers in
    ``[0, numel)``: torch would wrap a negative index silently and fail on a large one."""
    if flat.is_floating_point() or flat.is_complex() or flat.dtype == torch.bool:
        raise CheckpointError(f"{source}: compact tensor '{name}' has {flat.dtype} indices")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= numel):
        raise CheckpointError(
            f"{source}: compact tensor '{name}' has indices outside [0, {numel}) "
            f"(min {int(flat.min())}, max {int(flat.max())})"
        )


def expand_state(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, *, source: str
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compact_state`; a plain (non-compact) file passes through unchanged."""
    if not metadata or META_KEY not in metadata:
        return tensors
    try:
        index = json.loads(metadata[META_KEY])
        state = {}
        for name, spec in index.items():
            dtype = getattr(torch, spec["dtype"])
            shape = tuple(spec["shape"])
            if spec["encoding"] == "sparse":
                idx, val = tensors[name + _IDX], tensors[name + _VAL]
                numel = int(torch.tensor(shape).prod())
                check_flat_indices(idx, numel, name=name, source=source)
                idx = idx.long()
                flat = torch.zeros(numel, dtype=dtype)
                flat[idx] = val.to(dtype)
                state[name] = flat.view(shape)
            else:
                state[name] = tensors[name].to(dtype).view(shape)
    except CheckpointError:
        raise  # already one line naming the tensor
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"{source}: inconsistent compact weights ({err})") from None
    return state
