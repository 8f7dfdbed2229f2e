"""GPTConfig: the model's shape and variants, with the field names of OpenAI's released configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from sparsecircuits.errors import ConfigError
from sparsecircuits.fileio import read_json_object

# Node locations where AbsTopK activation sparsity may be applied (official `afrac_loctypes`).
Loc = Literal[
    "attn_in",  # residual read before attention (after ln_1)          (B, T, d_model)
    "attn_q",  # query channels                                         (B, T, n_head*d_head)
    "attn_k",  # key channels
    "attn_v",  # value channels
    "attn_out",  # attention residual write (after c_proj)              (B, T, d_model)
    "mlp_in",  # residual read before the MLP (after ln_2)              (B, T, d_model)
    "mlp_neuron",  # MLP neurons after the nonlinearity                 (B, T, d_mlp)
    "mlp_out",  # MLP residual write (after c_proj)                     (B, T, d_model)
    "resid_post_attn",  # the residual stream itself, after the attention add
    "resid_post_mlp",  # the residual stream itself, after the MLP add
]
ALL_LOCS: tuple[str, ...] = get_args(Loc)
NODE_LOCS: tuple[str, ...] = ALL_LOCS[:8]  # the paper's 8 node locations


def format_validation_error(err: ValidationError, *, source: str) -> str:
    """One line naming the first offending field, what was expected and what was given."""
    first = err.errors()[0]
    if not first["loc"]:  # a model_validator's check: its message already names the fields
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    field = ".".join(str(p) for p in first["loc"])
    given = first.get("input")
    given_s = repr(given) if not isinstance(given, dict) else "an object"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown field '{field}'"
    if first["type"] == "missing":
        return f"{source}: missing required field '{field}'"
    return f"{source}: field '{field}': {first['msg']} (got {given_s})"


def read_width(d_model: int, d_pos_emb: int | None) -> int:
    """Width of a residual read (``attn.act_in``, ``mlp.act_in``): the residual's d_model
    channels, then d_pos_emb concatenated position channels (none when None)."""
    return d_model + (d_pos_emb or 0)


class StrictModel(BaseModel):
    """Base for every config: unknown fields and wrong types are errors, never ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, validate_default=True)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config"):
        """Validate ``data`` (a dict from JSON) into this config, raising a one-line ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, source=source)) from None

    @classmethod
    def from_json_file(cls, path: str | Path):
        """Load and validate a JSON file; missing or malformed files raise ConfigError."""
        return cls.from_dict(read_json_object(path), source=str(path))

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied."""
        return type(self).from_dict({**self.model_dump(), **changes}, source=type(self).__name__)


class GPTConfig(StrictModel):
    """Shape and variants of the GPT. Field names follow OpenAI's ``beeg_config.json``."""

    block_size: int = 256  # context length in tokens
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 16
    d_head: int = 16  # kept separate from d_model (paper: small heads, more monosemantic)
    d_model: int = 256
    d_mlp: int | None = None  # defaults to 4 * d_model
    bias: bool = True  # biases in every Linear of the blocks
    ln_bias: bool = True  # bias in LayerNorm (unused with RMSNorm)
    rms_norm: bool = True  # RMSNorm (paper) instead of LayerNorm: zero stays privileged
    residual_activation_type: Literal["identity", "relu"] = "identity"
    activation_type: Literal["gelu", "relu"] = "gelu"
    afrac: float | None = 0.25  # AbsTopK keep-fraction; None disables activation sparsity
    afrac_loctypes: tuple[Loc, ...] = NODE_LOCS
    tied_unembed: bool = False
    enable_bigram_table: bool = True  # dense vocab x vocab logit table indexed by current token
    learnable_bigram_table: bool = False  # False: a fixed buffer (filled from corpus statistics)
    sink: bool = True  # per-head attention-sink logit
    learned_pos_emb: bool = True  # add learned absolute position embeddings (wpe) to x
    # Concatenated position channels (official ``BlockCatPosEmb``): wpe is (block_size,
    # d_pos_emb), never added to the residual; every attention and MLP reads
    # ``cat([norm(x), norm_p(wpe)])``, so their inputs are d_model + d_pos_emb wide.
    d_pos_emb: int | None = None
    sinusoidal_cat_pos_emb: bool = False  # wpe = fixed sinusoids (frozen), not learned

    @field_validator("afrac_loctypes", mode="before")
    @classmethod
    def _split_loctypes(cls, v: Any) -> Any:
        # The official configs store a comma-separated string; we accept it and lists alike.
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, list):
            v = tuple(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> GPTConfig:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "d_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_mlp is not None and self.d_mlp < 1:
            raise ValueError(f"d_mlp must be >= 1, got {self.d_mlp}")
        if self.afrac is not None and not 0.0 < self.afrac <= 1.0:
            raise ValueError(f"afrac must be in (0, 1], got {self.afrac}")
        if self.d_pos_emb is not None:
            if self.d_pos_emb < 1:
                raise ValueError(f"d_pos_emb must be >= 1, got {self.d_pos_emb}")
            if self.learned_pos_emb:
                raise ValueError(
                    "d_pos_emb (concatenated positions) and learned_pos_emb (added positions) "
                    "exclude each other: set learned_pos_emb to false"
                )
        elif self.sinusoidal_cat_pos_emb:
            raise ValueError("sinusoidal_cat_pos_emb needs d_pos_emb (the position channels)")
        return self

    @property
    def cat_pos_emb(self) -> bool:
        """Whether positions are concatenated channels (``d_pos_emb`` set)."""
        return self.d_pos_emb is not None

    @property
    def d_model_in(self) -> int:
        """Width of what attention and the MLP read: d_model (+ d_pos_emb when concatenated)."""
        return read_width(self.d_model, self.d_pos_emb)

    @property
    def mlp_width(self) -> int:
        """Number of MLP neurons (``d_mlp``, defaulting to 4 * d_model)."""
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def d_attn(self) -> int:
        """Width of q, k and v: ``n_head * d_head``."""
        return self.n_head * self.d_head

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``afrac_loctypes`` as the official comma-separated string."""
        d = self.model_dump()
        d["afrac_loctypes"] = ",".join(self.afrac_loctypes)
        return d
