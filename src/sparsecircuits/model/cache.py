"""Key/value caches for incremental decoding.

Every site of the model except attention's mixing over positions is computed per token, so a
new token only needs its own activations plus the keys and values of the tokens before it.
AbsTopK at q/k/v is per token too, so cached keys are exactly the keys a full pass computes.
"""

from __future__ import annotations

import torch

from sparsecircuits.errors import InputError


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions.

    ``length`` positions are filled; a forward pass with the cache writes its T new positions
    at ``[length, length + T)`` in every layer and then advances ``length`` (the model calls
    :meth:`advance`). Buffers: (n_layer, batch, n_head, max_len, d_head).
    """

    def __init__(
        self,
        *,
        n_layer: int,
        batch: int,
        n_head: int,
        d_head: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch, n_head, max_len, d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, batch: int) -> KVCache:
        """An empty cache shaped for ``model`` (a GPT), as long as its context."""
        c = model.config
        p = model.transformer.wte.weight
        return cls(
            n_layer=c.n_layer,
            batch=batch,
            n_head=c.n_head,
            d_head=c.d_head,
            max_len=c.block_size,
            device=p.device,
            dtype=p.dtype,
        )

    def check(self, batch: int, n_new: int) -> None:
        """A pass of ``n_new`` tokens for ``batch`` rows fits in this cache."""
        if batch != self.k.shape[1]:
            raise InputError(f"the cache holds {self.k.shape[1]} rows, the input has {batch}")
        if self.length + n_new > self.max_len:
            raise InputError(
                f"{self.length} cached + {n_new} new tokens exceed the cache's "
                f"{self.max_len} positions (the model's context)"
            )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v (B, H, T, d_head) of ``layer``; return every position's so far
        (B, H, length + T, d_head), views into the buffers."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_new: int) -> None:
        """Mark ``n_new`` more positions as filled (after every layer has stored them)."""
        self.length += n_new


class LayerCache:
    """One layer's view of a :class:`KVCache` (what attention receives)."""

    __slots__ = ("cache", "layer")

    def __init__(self, cache: KVCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    @property
    def offset(self) -> int:
        """Positions already cached: the absolute position of the first new token."""
        return self.cache.length

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.layer, k, v)
