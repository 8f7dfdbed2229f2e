"""The weight-sparse GPT of Gao et al. (2025), nanoGPT-shaped.

Pre-norm blocks ``x += attn(norm(x)); x += mlp(norm(x))`` with AbsTopK at the node locations,
an optional per-head attention sink and an optional bigram logit table. Parameter names match
OpenAI's released checkpoints (``transformer.h.0.attn.c_attn.weight``, ...). Weight sparsity is
not a model feature: the trainer projects weights (see ``model/sparsity.py``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparsecircuits.errors import InputError
from sparsecircuits.kernels import add_logit_tables, causal_attention, cross_entropy
from sparsecircuits.model.cache import KVCache, LayerCache
from sparsecircuits.model.config import GPTConfig
from sparsecircuits.model.hooks import NO_HOOKS, Hooks, Intervention, site_names
from sparsecircuits.model.layers import (
    ActSparsity,
    AttentionSink,
    Linear,
    attend_all,
    make_norm,
    sinusoids,
)
from sparsecircuits.model.sampling import sample_next

_NORM_WEIGHTS = ("ln_1.weight", "ln_2.weight", "ln_p1.weight", "ln_p2.weight", "ln_f.weight")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_head
        self.c_attn = Linear(config.d_model_in, 3 * config.d_attn, bias=config.bias)
        self.c_proj = Linear(config.d_attn, config.d_model, bias=config.bias)
        self.attn_imp = AttentionSink(config.n_head) if config.sink else None
        self.sparsify = ActSparsity(config)

    def forward(
        self,
        x: torch.Tensor,
        hk: Hooks,
        *,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        past: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). ``pos`` (1, T, d_pos_emb): normed position
        channels, concatenated to x. With ``query_pos`` (B,) only those positions are queried
        (keys and values still cover every position): -> (B, 1, d_model). With ``past`` the T
        tokens follow the cached ones: their keys join the cache and they attend to all."""
        B, T, _ = x.shape
        sp = self.sparsify
        if pos is not None:
            x = torch.cat([x, pos.expand(B, -1, -1)], dim=-1)  # (B, T, d_model + d_pos_emb)
        x = hk("act_in", sp(x, "attn_in"))  # (B, T, d_model_in)
        q, k, v = sp.linear(self.c_attn, x, ("attn_q", "attn_k", "attn_v"))  # (B, T, d_attn)
        if query_pos is not None:
            q = q[torch.arange(B, device=x.device), query_pos][:, None]  # (B, 1, d_attn)
        q, k, v = hk("q", q), hk("k", k), hk("v", v)  # q (B, Tq, n_head*d_head)
        Tq = q.shape[1]
        q = q.view(B, Tq, self.n_head, self.d_head).transpose(1, 2)
        k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (k, v))
        offset = 0
        if past is not None:
            offset = past.offset
            k, v = past.update(k, v)  # (B, H, offset + T, d_head)
        if query_pos is None and offset == 0:  # plain causal attention
            attend = self.attn_imp if self.attn_imp is not None else causal_attention
            y = attend(q, k, v)
        elif query_pos is None and Tq == 1:  # decoding one token: it sees every key
            y = attend_all(q, k, v, self.attn_imp)
        else:  # which keys each query sees: those at or before its own position
            if query_pos is not None:
                qpos = query_pos[:, None].to(x.device)
            else:
                qpos = offset + torch.arange(Tq, device=x.device)[None]
            visible = torch.arange(k.shape[2], device=x.device) <= qpos[..., None]
            if self.attn_imp is not None:
                y = self.attn_imp(q, k, v, visible)  # visible (B or 1, Tq, Tk)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
        y = hk("y", y.transpose(1, 2).reshape(B, Tq, self.n_head * self.d_head))
        return sp.linear(self.c_proj, y, ("attn_out",))[0]  # (B, Tq, d_model)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.d_model_in, config.mlp_width, bias=config.bias)
        self.gelu = config.activation_type == "gelu"  # else ReLU
        self.c_proj = Linear(config.mlp_width, config.d_model, bias=config.bias)
        self.sparsify = ActSparsity(config)

    def forward(self, x: torch.Tensor, hk: Hooks, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d_model), pos (1, T, d_pos_emb) or None -> (B, T, d_model)."""
        sp = self.sparsify
        if pos is not None:
            x = torch.cat([x, pos.expand(x.shape[0], -1, -1)], dim=-1)
        x = hk("act_in", sp(x, "mlp_in"))  # (B, T, d_model_in)
        if self.gelu:
            (h,) = sp.linear(self.c_fc, x, ("mlp_neuron",), gelu=True)
        else:
            h = sp(torch.relu(self.c_fc(x)), "mlp_neuron")
        x = hk("post_act", h)  # (B, T, d_mlp)
        return sp.linear(self.c_proj, x, ("mlp_out",))[0]  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        if config.d_pos_emb is not None:  # each read norms the position channels on its own
            self.ln_p1 = make_norm(config, width=config.d_pos_emb)
            self.ln_p2 = make_norm(config, width=config.d_pos_emb)
        self.cat_pos = config.d_pos_emb is not None
        self.relu_resid = config.residual_activation_type == "relu"
        self.sparsify = ActSparsity(config)

    def _resid(self, x: torch.Tensor, loc: str) -> torch.Tensor:
        return self.sparsify(torch.relu(x) if self.relu_resid else x, loc)

    def forward_attn(
        self,
        x: torch.Tensor,
        hk: Hooks,
        *,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        past: LayerCache | None = None,
    ) -> torch.Tensor:
        x = hk("resid_in", x)
        p = self.ln_p1(pos) if self.cat_pos else None
        delta = self.attn(self.ln_1(x), hk.scoped("attn"), pos=p, query_pos=query_pos, past=past)
        if query_pos is not None:  # keep only the queried positions from here on
            x = x[torch.arange(x.shape[0], device=x.device), query_pos][:, None]
        x = x + hk("attn.resid_delta", delta)
        return self._resid(x, "resid_post_attn")

    def forward_mlp(self, x: torch.Tensor, hk: Hooks, *, pos: torch.Tensor | None = None):
        """x (B, T, d_model), pos (1 or B, T, d_pos_emb) -> (B, T, d_model)."""
        x = hk("resid_mid", x)
        p = self.ln_p2(pos) if self.cat_pos else None
        x = x + hk("mlp.resid_delta", self.mlp(self.ln_2(x), hk.scoped("mlp"), p))
        return self._resid(x, "resid_post_mlp")

    def forward(
        self,
        x: torch.Tensor,
        hk: Hooks,
        *,
        pos: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
        past: LayerCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model) (B, 1, d_model with ``query_pos``)."""
        x = self.forward_attn(x, hk, pos=pos, query_pos=query_pos, past=past)
        if self.cat_pos and query_pos is not None:  # each row's queried position only
            pos = pos[0, query_pos.to(pos.device)][:, None]  # (B, 1, d_pos_emb)
        return self.forward_mlp(x, hk, pos=pos)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        d, V = config.d_model, config.vocab_size
        d_pos = config.d_pos_emb or (d if config.learned_pos_emb else 0)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, d),
                **({"wpe": nn.Embedding(config.block_size, d_pos)} if d_pos else {}),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=make_norm(config),
            )
        )
        self.lm_head = Linear(d, V, bias=False)
        if config.tied_unembed:
            self.lm_head.weight = self.transformer.wte.weight
        self.register_buffer("final_logits_bias", torch.zeros(V))
        if config.enable_bigram_table:
            table = torch.zeros(V, V)
            if config.learnable_bigram_table:
                self.bigram_table = nn.Parameter(table)
            else:
                self.register_buffer("bigram_table", table)
        else:
            self.bigram_table = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2 n_layer)), zero biases."""
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif name.endswith(_NORM_WEIGHTS):
                nn.init.ones_(p)
            elif p.dim() == 2 and name != "bigram_table":  # Linear and Embedding weights
                nn.init.normal_(p, std=0.02)
            else:  # biases, LayerNorm biases, sink logits, a learnable bigram table
                nn.init.zeros_(p)
        if self.config.sinusoidal_cat_pos_emb:  # fixed, like the official model's
            wpe = self.transformer.wpe.weight
            wpe.copy_(sinusoids(self.config.block_size, self.config.d_pos_emb))
            wpe.requires_grad_(False)

    # ----------------------------------------------------------------------------- forward
    def embed(self, idx: torch.Tensor, *, offset: int = 0) -> torch.Tensor:
        """Token (+ added position) embeddings of tokens at positions offset, offset + 1, ...
        idx: (B, T) int64 -> (B, T, d_model)."""
        if idx.dim() != 2:
            raise InputError(f"token ids must have shape (batch, seq), got {tuple(idx.shape)}")
        n_tok = idx.shape[1]
        if offset + n_tok > self.config.block_size:
            raise InputError(
                f"sequence of {offset + n_tok} tokens is longer than the model's context "
                f"(block_size {self.config.block_size})"
            )
        if idx.numel():
            lo, hi = torch.aminmax(idx)  # one device sync instead of two
            if int(lo) < 0 or int(hi) >= self.config.vocab_size:
                raise InputError(f"token ids must be in [0, {self.config.vocab_size})")
        x = self.transformer.wte(idx)
        if self.config.learned_pos_emb:
            x = x + self.transformer.wpe.weight[offset : offset + n_tok]
        return x

    def positions(self, n_tok: int, *, offset: int = 0) -> torch.Tensor | None:
        """Concatenated position channels of positions offset .. offset + n_tok - 1:
        (1, n_tok, d_pos_emb); None unless the config has ``d_pos_emb``."""
        if not self.config.cat_pos_emb:
            return None
        return self.transformer.wpe.weight[offset : offset + n_tok][None]

    def unembed(self, x: torch.Tensor, idx: torch.Tensor, hk: Hooks = NO_HOOKS) -> torch.Tensor:
        """Final norm and logits. x: (B, T, d_model), idx: (B, T) -> (B, T, vocab)."""
        x = hk("final_resid", x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return add_logit_tables(logits, self.final_logits_bias, self.bigram_table, idx)

    def forward_from(
        self, start: int | str, x: torch.Tensor, idx: torch.Tensor, *, hooks: Hooks | None = None
    ) -> torch.Tensor:
        """Run from a residual site to the logits.

        ``start``: a layer index L (x is ``{L}.resid_in``; L = n_layer means ``final_resid``) or
        a site name ``"{L}.resid_in"``, ``"{L}.resid_mid"`` or ``"final_resid"``.
        ``idx`` (B, T) is still needed for the bigram table. Returns logits (B, T, vocab).
        """
        layer, mid = self._parse_start(start)
        hk = hooks or NO_HOOKS
        pos = self.positions(x.shape[1])
        for i in range(layer, self.config.n_layer):
            block, bhk = self.transformer.h[i], hk.scoped(str(i))
            run = block.forward_mlp if (mid and i == layer) else block
            x = run(x, bhk, pos=pos)
        return self.unembed(x, idx, hk)

    def forward_last(
        self, idx: torch.Tensor, lengths: torch.Tensor, *, hooks: Hooks | None = None
    ) -> torch.Tensor:
        """Logits at each row's last real position only: idx (N, T) right-padded, lengths (N,)
        -> (N, vocab). The last block queries only that position (its sites after k and v
        hold one position per row) and the vocabulary projection runs once per row."""
        hk = hooks or NO_HOOKS
        last = lengths.to(idx.device) - 1
        x, pos = self.embed(idx), self.positions(idx.shape[1])
        n = self.config.n_layer
        for i, block in enumerate(self.transformer.h):
            x = block(x, hk.scoped(str(i)), pos=pos, query_pos=last if i == n - 1 else None)
        rows = torch.arange(idx.shape[0], device=idx.device)
        if n == 0:
            x = x[rows, last][:, None]
        return self.unembed(x, idx[rows, last][:, None], hk)[:, 0]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        hooks: Hooks | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> (logits (B, T, vocab), mean next-token CE in nats or None).

        With ``cache`` the tokens continue the ``cache.length`` cached ones (positions
        ``cache.length ..``); their keys and values are added to the cache."""
        if cache is None:
            logits = self.forward_from(0, self.embed(idx), idx, hooks=hooks)
        else:
            logits = self._forward_cached(idx, cache, hooks or NO_HOOKS)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def _parse_start(self, start: int | str) -> tuple[int, bool]:
        n = self.config.n_layer
        if isinstance(start, int):
            if not 0 <= start <= n:
                raise InputError(f"start layer {start} is outside [0, {n}]")
            return start, False
        if start == "final_resid":
            return n, False
        layer, _, site = start.partition(".")
        if layer.isdigit() and int(layer) < n and site in ("resid_in", "resid_mid"):
            return int(layer), site == "resid_mid"
        raise InputError(f"cannot start a forward pass at '{start}' (a residual site is needed)")

    # ------------------------------------------------------------------------------- hooks
    def hook_names(self) -> list[str]:
        """Every hook site, in forward order."""
        return site_names(self.config.n_layer)

    def run_with_cache(
        self,
        idx: torch.Tensor,
        *,
        names: Collection[str] | None = None,
        interventions: Mapping[str, Intervention] | None = None,
        detach: bool = True,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and record activations. ``names=None`` records every site.

        Returns ``(logits (B, T, vocab), {name: activation})``. With ``detach=False`` the cached
        tensors stay in the autograd graph (for gradients w.r.t. activations). With a KV
        ``cache`` (see ``forward``) the sites hold the new positions only.
        """
        all_names = self.hook_names()
        wanted = all_names if names is None else list(names)
        unknown = sorted(set(wanted) - set(all_names))
        if unknown:
            raise InputError(f"unknown hook name(s): {', '.join(unknown)}")
        self._check_interventions(interventions)
        hooks = Hooks(cache_names=wanted, interventions=interventions, detach=detach)
        logits, _ = self(idx, hooks=hooks, cache=cache)
        return logits, hooks.cache

    def run_with_hooks(
        self, idx: torch.Tensor, *, interventions: Mapping[str, Intervention]
    ) -> torch.Tensor:
        """Forward with ``{name: fn(activation) -> activation}`` applied; returns logits."""
        self._check_interventions(interventions)
        logits, _ = self(idx, hooks=Hooks(interventions=interventions))
        return logits

    def _check_interventions(self, interventions: Mapping[str, Intervention] | None) -> None:
        unknown = sorted(set(interventions or {}) - set(self.hook_names()))
        if unknown:
            raise InputError(f"unknown hook name(s) in interventions: {', '.join(unknown)}")

    # ------------------------------------------------------------------------------- misc
    def num_params(self) -> int:
        """Total parameter count (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _forward_cached(self, idx: torch.Tensor, cache: KVCache, hk: Hooks) -> torch.Tensor:
        cache.check(idx.shape[0], idx.shape[1])
        offset = cache.length
        x, pos = self.embed(idx, offset=offset), self.positions(idx.shape[1], offset=offset)
        for i, block in enumerate(self.transformer.h):
            x = block(x, hk.scoped(str(i)), pos=pos, past=LayerCache(cache, i))
        cache.advance(idx.shape[1])
        return self.unembed(x, idx, hk)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        interventions: Mapping[str, Intervention] | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by ``max_new_tokens`` sampled tokens; returns (B, T + new).
        ``temperature`` 0 takes the likeliest token. With ``use_cache`` each new token costs
        one position's pass (keys and values of earlier ones are cached); once the context is
        full, every step re-reads the last block_size tokens, exactly as without the cache.
        ``interventions`` run on every pass; with the cache they see only the new positions,
        so they must act on each position alike (e.g. an ablation)."""
        self._check_interventions(interventions)
        hooks = Hooks(interventions=interventions) if interventions else None
        block, cache = self.config.block_size, None
        for _ in range(max_new_tokens):
            if cache is not None and cache.length == idx.shape[1] - 1 < block:
                logits, _ = self(idx[:, -1:], cache=cache, hooks=hooks)
            else:  # first step, or the window slides: positions shift, the cache is stale
                cache = KVCache.for_model(self, batch=idx.shape[0]) if use_cache else None
                logits, _ = self(idx[:, -block:], cache=cache, hooks=hooks)
            last = logits[:, -1, :]
            nxt = sample_next(last, temperature=temperature, top_k=top_k, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
