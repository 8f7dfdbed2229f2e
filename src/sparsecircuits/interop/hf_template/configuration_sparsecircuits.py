"""Configuration of a sparsecircuits GPT exported for transformers (``sparsecircuits export-hf``).

The fields are those of sparsecircuits' ``GPTConfig`` (OpenAI circuit-sparsity names), stored at
the top level of ``config.json``; ``afrac_loctypes`` is the official comma-separated string.
This file imports only transformers, so an exported directory loads without sparsecircuits.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

NODE_LOCS = "attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out"
ALL_LOCS = frozenset((*NODE_LOCS.split(","), "resid_post_attn", "resid_post_mlp"))


class SparseCircuitsConfig(PretrainedConfig):
    """Shape and variants of the GPT; defaults equal sparsecircuits' ``GPTConfig`` defaults."""

    model_type = "sparsecircuits_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 (transformers' convention)
    attribute_map = {  # noqa: RUF012 (the generic names transformers' utilities look up)
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_head",
        "head_dim": "d_head",
        "max_position_embeddings": "block_size",
    }

    def __init__(
        self,
        block_size: int = 256,
        vocab_size: int = 2048,
        n_layer: int = 4,
        n_head: int = 16,
        d_head: int = 16,
        d_model: int = 256,
        d_mlp: int | None = None,
        bias: bool = True,
        ln_bias: bool = True,
        rms_norm: bool = True,
        residual_activation_type: str = "identity",
        activation_type: str = "gelu",
        afrac: float | None = 0.25,
        afrac_loctypes: str | list[str] = NODE_LOCS,
        tied_unembed: bool = False,
        enable_bigram_table: bool = True,
        learnable_bigram_table: bool = False,
        sink: bool = True,
        learned_pos_emb: bool = True,
        d_pos_emb: int | None = None,
        sinusoidal_cat_pos_emb: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(afrac_loctypes, str):
            afrac_loctypes = ",".join(afrac_loctypes)
        unknown = sorted({s for s in afrac_loctypes.split(",") if s} - ALL_LOCS)
        if unknown:
            raise ValueError(f"afrac_loctypes: unknown location(s) {', '.join(unknown)}")
        if residual_activation_type not in ("identity", "relu"):
            raise ValueError(
                "residual_activation_type must be identity or relu, "
                f"got {residual_activation_type!r}"
            )
        if activation_type not in ("gelu", "relu"):
            raise ValueError(f"activation_type must be gelu or relu, got {activation_type!r}")
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_head = d_head
        self.d_model = d_model
        self.d_mlp = d_mlp
        self.bias = bias
        self.ln_bias = ln_bias
        self.rms_norm = rms_norm
        self.residual_activation_type = residual_activation_type
        self.activation_type = activation_type
        self.afrac = afrac
        self.afrac_loctypes = afrac_loctypes
        self.tied_unembed = tied_unembed
        self.enable_bigram_table = enable_bigram_table
        self.learnable_bigram_table = learnable_bigram_table
        self.sink = sink
        self.learned_pos_emb = learned_pos_emb
        self.d_pos_emb = d_pos_emb
        self.sinusoidal_cat_pos_emb = sinusoidal_cat_pos_emb
        # The unembedding is tied exactly when the GPT's is; transformers reads this name.
        kwargs["tie_word_embeddings"] = tied_unembed
        super().__init__(**kwargs)
        self.tie_word_embeddings = tied_unembed  # versions whose base class drops the kwarg

    @property
    def mlp_width(self) -> int:
        """Number of MLP neurons (``d_mlp``, defaulting to 4 * d_model)."""
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def d_attn(self) -> int:
        """Width of q, k and v: ``n_head * d_head``."""
        return self.n_head * self.d_head

    @property
    def d_model_in(self) -> int:
        """Width attention and the MLP read: d_model (+ d_pos_emb when concatenated)."""
        return self.d_model + (self.d_pos_emb or 0)

    @property
    def sparse_locs(self) -> frozenset[str]:
        """Locations where AbsTopK applies (none when ``afrac`` is None)."""
        if self.afrac is None:
            return frozenset()
        return frozenset(s for s in self.afrac_loctypes.split(",") if s)
