"""Per-call hook contexts: caching and interventions at named activation sites.

A :class:`Hooks` object lives for one forward pass and is passed down explicitly, so there is no
global or per-module hook state: two models in one process, threads sharing a model, and nested
``run_with_cache`` calls cannot interfere with each other.

Site names follow the official circuit-sparsity layout: ``{L}.resid_in``, ``{L}.attn.act_in``,
``{L}.attn.q|k|v|y|resid_delta``, ``{L}.resid_mid``, ``{L}.mlp.act_in|post_act|resid_delta`` and
``final_resid``. See ``docs/hooks.md`` for shapes and the TransformerLens mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch

from sparsecircuits.errors import InputError

Intervention = Callable[[torch.Tensor], torch.Tensor]

BLOCK_SITES: tuple[str, ...] = (
    "resid_in",  # (B, T, d_model) residual stream entering the block
    "attn.act_in",  # (B, T, d_model) residual read: after ln_1 and AbsTopK
    "attn.q",  # (B, T, n_head*d_head) after AbsTopK
    "attn.k",  # (B, T, n_head*d_head)
    "attn.v",  # (B, T, n_head*d_head)
    "attn.y",  # (B, T, n_head*d_head) head outputs, before c_proj
    "attn.resid_delta",  # (B, T, d_model) attention write, after c_proj and AbsTopK
    "resid_mid",  # (B, T, d_model) residual between attention and MLP
    "mlp.act_in",  # (B, T, d_model) residual read: after ln_2 and AbsTopK
    "mlp.post_act",  # (B, T, d_mlp) neurons after the nonlinearity and AbsTopK
    "mlp.resid_delta",  # (B, T, d_model) MLP write, after c_proj and AbsTopK
)
FINAL_SITE = "final_resid"  # (B, T, d_model) residual stream before ln_f


def site_names(n_layer: int) -> list[str]:
    """Every hook site of a model with ``n_layer`` blocks, in forward order."""
    return [f"{i}.{s}" for i in range(n_layer) for s in BLOCK_SITES] + [FINAL_SITE]


class Hooks:
    """What to record and what to change during one forward pass.

    ``cache_names``: names to record (``None`` records nothing; use :func:`site_names` for all).
    ``interventions``: ``{name: fn(tensor) -> tensor}``, applied before recording.
    ``detach``: store detached tensors; ``False`` keeps them in the graph so gradients w.r.t.
    cached activations can be taken with ``torch.autograd.grad``.
    """

    __slots__ = ("_cache_names", "_interventions", "cache", "detach", "prefix")

    def __init__(
        self,
        *,
        cache_names: Collection[str] | None = None,
        interventions: Mapping[str, Intervention] | None = None,
        detach: bool = True,
        prefix: str = "",
        _cache: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._cache_names = frozenset(cache_names or ())
        self._interventions = dict(interventions or {})
        self.detach = detach
        self.prefix = prefix
        self.cache: dict[str, torch.Tensor] = {} if _cache is None else _cache

    def scoped(self, prefix: str) -> Hooks:
        """A view of the same hooks whose site names get ``prefix.`` prepended (one block)."""
        child = Hooks.__new__(Hooks)
        child._cache_names = self._cache_names
        child._interventions = self._interventions
        child.detach = self.detach
        child.prefix = f"{self.prefix}{prefix}."
        child.cache = self.cache
        return child

    def __call__(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """Apply the intervention registered for ``site`` (if any) and record the result."""
        name = self.prefix + site
        fn = self._interventions.get(name)
        if fn is not None:
            out = fn(x)
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                raise InputError(
                    f"intervention at '{name}' must return a tensor of shape {tuple(x.shape)}"
                )
            x = out
        if name in self._cache_names:
            self.cache[name] = x.detach() if self.detach else x
        return x


class _NoHooks:
    """The do-nothing hook context used by plain forward passes (no lookups, no allocation)."""

    __slots__ = ()

    def scoped(self, prefix: str) -> _NoHooks:
        return self

    def __call__(self, site: str, x: torch.Tensor) -> torch.Tensor:
        return x


NO_HOOKS = _NoHooks()
