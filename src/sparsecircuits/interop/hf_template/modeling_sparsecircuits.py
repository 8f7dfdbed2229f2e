"""A sparsecircuits GPT for transformers (``AutoModelForCausalLM``, ``trust_remote_code=True``).

The weight-sparse GPT of Gao et al. (2025), nanoGPT-shaped: pre-norm blocks
``x += attn(norm(x)); x += mlp(norm(x))`` with AbsTopK activation sparsity at the configured
locations, an optional per-head attention sink, an optional bigram logit table and either
added or concatenated position embeddings. Parameter names are sparsecircuits' (and OpenAI's
checkpoints'): ``transformer.h.0.attn.c_attn.weight``, ...

This is the one sanctioned second copy of sparsecircuits' forward pass (``model/gpt.py``): every
``sparsecircuits export-hf`` runs both on the same inputs and refuses to write a directory where
they differ beyond float32 rounding (logits with the same AbsTopK selections, AbsTopK's output
values, its choices away from near-ties, generation, padded batches). It imports only torch,
transformers and its configuration.

Conventions:

- ``hidden_states`` (with ``output_hidden_states``): n_layer + 1 tensors (B, T, d_model), as in
  GPT-2: ``[i]`` is the residual stream entering block i (sparsecircuits' ``{i}.resid_in``;
  ``[0]`` the embeddings), the last is ``ln_f`` of the final residual (what the unembedding
  reads), not sparsecircuits' ``final_resid``, which is before ``ln_f``.
- Padding: ``attention_mask`` (B, past + T), 1 for real tokens, padding on the left. Positions
  count from each row's first real token (from the mask when ``position_ids`` is absent) and
  pad keys are invisible, so a padded row gives the logits of the row alone.
- Positions must be < ``block_size`` (the model has no position beyond its context): a longer
  sequence, cache included, raises ValueError; no window slides.
- AbsTopK ties: here ``torch.topk(|x|, k)`` + scatter (the official implementation); which of
  several entries tied in |x| at the threshold is kept is torch's choice (unspecified).
  sparsecircuits' kernels keep the lowest index. The kept values agree except when +a and -a
  tie at the threshold; zeros tied at the threshold (fewer than k nonzeros) give identical
  outputs either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_sparsecircuits import SparseCircuitsConfig


def abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` entries of largest |x| along the last dim, zero the rest (same shape)."""
    if k >= x.shape[-1]:
        return x
    idx = torch.topk(x.abs(), k, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


class Sparsify:
    """AbsTopK at the configured locations: ``k = int(afrac * width)`` per token."""

    def __init__(self, config: SparseCircuitsConfig) -> None:
        self.afrac = config.afrac
        self.locs = config.sparse_locs

    def __call__(self, x: torch.Tensor, loc: str) -> torch.Tensor:
        if loc not in self.locs:
            return x
        return abstopk(x, int(self.afrac * x.shape[-1]))


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (eps 1e-5, as in the official code)."""

    def __init__(self, ndim: int, *, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def make_norm(config: SparseCircuitsConfig, width: int) -> nn.Module:
    """RMSNorm (torch's default eps) or LayerNorm over ``width`` channels."""
    return nn.RMSNorm(width) if config.rms_norm else LayerNorm(width, bias=config.ln_bias)


class AttentionSink(nn.Module):
    """Holds the per-head sink logit ``b_h``: an always-visible extra key with k = v = 0."""

    def __init__(self, n_head: int) -> None:
        super().__init__()
        self.sink_logit = nn.Parameter(torch.zeros(n_head))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SparseCircuitsConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.d_head, self.d_attn = config.n_head, config.d_head, config.d_attn
        self.c_attn = nn.Linear(config.d_model_in, 3 * config.d_attn, bias=config.bias)
        self.c_proj = nn.Linear(config.d_attn, config.d_model, bias=config.bias)
        self.attn_imp = AttentionSink(config.n_head) if config.sink else None
        self.sparsify = Sparsify(config)

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor, past_key_values: Cache | None
    ) -> torch.Tensor:
        """x (B, T, d_model_in), visible (B, T, past + T) bool -> (B, T, d_model)."""
        B, T, _ = x.shape
        sp, H, D = self.sparsify, self.n_head, self.d_head
        x = sp(x, "attn_in")
        q, k, v = self.c_attn(x).split(self.d_attn, dim=-1)
        # Per token, so cached keys are exactly the keys a full pass computes.
        q, k, v = sp(q, "attn_q"), sp(k, "attn_k"), sp(v, "attn_v")
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # (B, H, past + T, D)
        scores = (q @ k.transpose(-1, -2)) * D**-0.5  # (B, H, T, past + T)
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        if self.attn_imp is not None:  # the sink: one more logit in every softmax, value 0
            sink = self.attn_imp.sink_logit.to(scores.dtype).view(1, H, 1, 1)
            scores = torch.cat([sink.expand(B, H, T, 1), scores], dim=-1)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        if self.attn_imp is not None:
            probs = probs[..., 1:]
        y = (probs @ v).transpose(1, 2).reshape(B, T, self.d_attn)
        return sp(self.c_proj(y), "attn_out")


class MLP(nn.Module):
    def __init__(self, config: SparseCircuitsConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model_in, config.mlp_width, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_width, config.d_model, bias=config.bias)
        self.gelu = config.activation_type == "gelu"  # else ReLU
        self.sparsify = Sparsify(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model_in) -> (B, T, d_model)."""
        sp = self.sparsify
        h = self.c_fc(sp(x, "mlp_in"))
        h = sp(F.gelu(h) if self.gelu else torch.relu(h), "mlp_neuron")  # exact (erf) GELU
        return sp(self.c_proj(h), "mlp_out")


class Block(nn.Module):
    def __init__(self, config: SparseCircuitsConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, config.d_model)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.d_model)
        self.mlp = MLP(config)
        self.cat_pos = config.d_pos_emb is not None
        if self.cat_pos:  # each read norms the position channels on its own
            self.ln_p1 = make_norm(config, config.d_pos_emb)
            self.ln_p2 = make_norm(config, config.d_pos_emb)
        self.relu_resid = config.residual_activation_type == "relu"
        self.sparsify = Sparsify(config)

    def _resid(self, x: torch.Tensor, loc: str) -> torch.Tensor:
        return self.sparsify(torch.relu(x) if self.relu_resid else x, loc)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None,
        visible: torch.Tensor,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        """x (B, T, d_model), pos (B, T, d_pos_emb) or None -> (B, T, d_model)."""
        read = self.ln_1(x)
        if self.cat_pos:
            read = torch.cat([read, self.ln_p1(pos)], dim=-1)
        x = self._resid(x + self.attn(read, visible, past_key_values), "resid_post_attn")
        read = self.ln_2(x)
        if self.cat_pos:
            read = torch.cat([read, self.ln_p2(pos)], dim=-1)
        return self._resid(x + self.mlp(read), "resid_post_mlp")


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    """Extra arguments transformers passes are ignored, except requests we cannot honour."""
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not supported by this model (no attention maps)")


class SparseCircuitsPreTrainedModel(PreTrainedModel):
    config_class = SparseCircuitsConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]  # noqa: RUF012 (transformers' convention)
    _skip_keys_device_placement = ["past_key_values"]  # noqa: RUF012
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init (only for weights a checkpoint lacks): N(0, 0.02), norms 1, rest 0."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear | LayerNorm) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.RMSNorm | LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        if isinstance(module, AttentionSink):
            nn.init.zeros_(module.sink_logit)
        if isinstance(module, SparseCircuitsForCausalLM):
            nn.init.zeros_(module.final_logits_bias)
            if module.bigram_table is not None:
                nn.init.zeros_(module.bigram_table)


class SparseCircuitsModel(SparseCircuitsPreTrainedModel):
    """Embeddings, blocks and the final norm (``transformer`` of the causal LM)."""

    def __init__(self, config: SparseCircuitsConfig) -> None:
        super().__init__(config)
        d_pos = config.d_pos_emb or (config.d_model if config.learned_pos_emb else 0)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if d_pos:
            self.wpe = nn.Embedding(config.block_size, d_pos)
            if config.sinusoidal_cat_pos_emb:  # fixed channels, read from the checkpoint
                self.wpe.weight.requires_grad_(False)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config, config.d_model)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    @staticmethod
    def _positions(
        attention_mask: torch.Tensor | None, past: int, n_new: int, device: torch.device
    ) -> torch.Tensor:
        """Positions (B or 1, T): counted from each row's first real token with a mask."""
        if attention_mask is None:
            return torch.arange(past, past + n_new, device=device)[None]
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n_new:]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """input_ids (B, T) or inputs_embeds (B, T, d_model) -> last_hidden_state (B, T,
        d_model) after ``ln_f``; ``past_key_values`` holds the keys of earlier tokens."""
        cfg = self.config
        _check_kwargs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache is None:
            use_cache = getattr(cfg, "use_cache", True)
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise TypeError("past_key_values must be a transformers Cache (e.g. DynamicCache)")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(
                f"attention_mask must be 2-D (batch, past + new) = {(B, past + T)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = self._positions(attention_mask, past, T, x.device)
        lo, hi = (int(p) for p in torch.aminmax(position_ids)) if position_ids.numel() else (0, 0)
        if lo < 0 or hi >= cfg.block_size:  # no position embedding there: never wrap or clamp
            raise ValueError(
                f"position {hi if hi >= cfg.block_size else lo} is outside the model's context: "
                f"positions must be in [0, block_size {cfg.block_size}) (at most "
                f"{cfg.block_size} tokens, cached ones included)"
            )
        pos = None
        if cfg.learned_pos_emb:
            x = x + self.wpe(position_ids)
        elif cfg.d_pos_emb is not None:
            pos = self.wpe(position_ids).expand(B, T, -1)
        # Query i (cache index past + i) sees keys at or before it that are real; it always
        # sees itself, so a pad query's softmax is never empty (no NaN reaches real rows).
        q_idx = torch.arange(past, past + T, device=x.device)[:, None]
        k_idx = torch.arange(past + T, device=x.device)[None]
        real = torch.ones(B, past + T, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            real = attention_mask.bool()
        visible = (k_idx <= q_idx) & (real[:, None, :] | (k_idx == q_idx))  # (B, T, past + T)
        hidden: list[torch.Tensor] = []
        want_hidden = output_hidden_states
        if want_hidden is None:
            want_hidden = getattr(cfg, "output_hidden_states", False)
        for block in self.h:
            if want_hidden:
                hidden.append(x)
            x = block(x, pos, visible, past_key_values)
        x = self.ln_f(x)
        if want_hidden:
            hidden.append(x)
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(hidden) if want_hidden else None,
        )
        return out if return_dict is not False else out.to_tuple()


class SparseCircuitsForCausalLM(SparseCircuitsPreTrainedModel, GenerationMixin):
    """The GPT with its unembedding, ``final_logits_bias`` and bigram logit table."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # noqa: RUF012

    def __init__(self, config: SparseCircuitsConfig) -> None:
        super().__init__(config)
        V = config.vocab_size
        self.transformer = SparseCircuitsModel(config)
        self.lm_head = nn.Linear(config.d_model, V, bias=False)
        self.register_buffer("final_logits_bias", torch.zeros(V))
        if not config.enable_bigram_table:
            self.bigram_table = None
        elif config.learnable_bigram_table:  # logits += bigram_table[current token]
            self.bigram_table = nn.Parameter(torch.zeros(V, V))
        else:
            self.register_buffer("bigram_table", torch.zeros(V, V))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (B, T, vocab) (the last ``logits_to_keep`` positions if > 0) and, with
        ``labels`` (B, T), the mean next-token cross-entropy in nats (-100 is ignored)."""
        _check_kwargs(kwargs)
        out = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        x, ids = out.last_hidden_state, input_ids
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            keep: slice | torch.Tensor = slice(-logits_to_keep, None)
        else:
            keep = logits_to_keep if isinstance(logits_to_keep, torch.Tensor) else slice(None)
        x = x[:, keep]
        logits = self.lm_head(x) + self.final_logits_bias
        if self.bigram_table is not None:
            if ids is None:
                raise ValueError("this model's bigram table needs input_ids (not inputs_embeds)")
            logits = logits + F.embedding(ids[:, keep], self.bigram_table)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
        )
        return result if return_dict is not False else result.to_tuple()
