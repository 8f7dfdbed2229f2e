"""jacobcd52's format (``sparse_pretrain_public``): ``config.json`` with ``model_config`` /
``sparsity_config`` and his ``SparseGPT`` state dict in ``pytorch_model.bin`` (or
``sparse_model.bin`` beside ``bridges.bin``) loads and gives the logits of his forward.

``reference_logits`` transcribes his ``SparseGPT.forward`` with plain torch ops (nothing from
``sparsecircuits.model``): AbsTopK keeps ``max(1, int(width * fraction))`` and skips a site
whose k covers it, ``resid_mid`` sparsifies the residual after the attention add, the sink is
his ``SDPAWithSink`` (an extra zero key whose logit is learned), attention is an explicit
softmax, and his model has no final logits bias.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sparsecircuits import load_model
from sparsecircuits.errors import CheckpointError, ConfigError

DEFAULT_LOCS = "attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_v,attn_k,attn_q"
BASE: dict[str, Any] = dict(
    n_layer=2,
    d_model=32,
    n_ctx=16,
    d_head=8,
    d_mlp=80,
    vocab_size=60,
    use_rms_norm=True,
    tie_embeddings=False,
    use_positional_embeddings=False,
    use_bigram_table=False,
    use_attention_sinks=True,
    activation="gelu",
    dropout=0.0,
    use_bias=True,
)
SPARSITY: dict[str, Any] = dict(
    enable_weight_sparsity=True,
    target_l0_fraction=0.015625,
    enable_activation_sparsity=True,
    activation_topk_fraction=0.25,
)
VARIANTS: dict[str, dict[str, Any]] = {
    "standalone": {},
    "bigram_pos_tied_layernorm_relu": dict(
        use_bigram_table=True,
        use_positional_embeddings=True,
        tie_embeddings=True,
        use_rms_norm=False,
        activation="relu",
        use_bias=False,
        use_attention_sinks=False,
    ),
    "dense": {"enable_activation_sparsity": False},
}


def his_state(m: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random weights under his module names (biases, norms and sinks non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    d, V, F_ = m["d_model"], m["vocab_size"], m["d_mlp"]

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {"wte.weight": rnd(V, d)}
    if m["use_positional_embeddings"]:
        sd["wpe.weight"] = rnd(m["n_ctx"], d, scale=0.5)

    def norm(prefix: str) -> None:
        sd[f"{prefix}.weight"] = 1.0 + rnd(d, scale=0.2)
        if not m["use_rms_norm"]:
            sd[f"{prefix}.bias"] = rnd(d, scale=0.2)

    def linear(prefix: str, n_out: int, n_in: int) -> None:
        sd[f"{prefix}.weight"] = rnd(n_out, n_in, scale=1 / math.sqrt(n_in))
        if m["use_bias"]:
            sd[f"{prefix}.bias"] = rnd(n_out, scale=0.2)

    for i in range(m["n_layer"]):
        b = f"blocks.{i}"
        norm(f"{b}.ln_1")
        linear(f"{b}.attn.c_attn", 3 * d, d)
        linear(f"{b}.attn.c_proj", d, d)
        if m["use_attention_sinks"]:
            sd[f"{b}.attn.attn_fn.sink_logit"] = rnd(d // m["d_head"])
        norm(f"{b}.ln_2")
        linear(f"{b}.mlp.c_fc", F_, d)
        linear(f"{b}.mlp.c_proj", d, F_)
    norm("ln_f")
    sd["lm_head.weight"] = sd["wte.weight"] if m["tie_embeddings"] else rnd(V, d, scale=0.2)
    if m["use_bigram_table"]:
        sd["bigram_table"] = rnd(V, V, scale=0.3)
    return sd


def reference_logits(
    m: dict[str, Any], s: dict[str, Any], sd: dict[str, torch.Tensor], idx: torch.Tensor
) -> torch.Tensor:
    """His SparseGPT.forward, transcribed. idx (B, T) -> logits (B, T, V)."""
    B, T = idx.shape
    d, Dh = m["d_model"], m["d_head"]
    H = d // Dh
    locs = set(s.get("activation_sparsity_locations", DEFAULT_LOCS).split(","))
    on = s["enable_activation_sparsity"]

    def sparsify(x: torch.Tensor, loc: str) -> torch.Tensor:
        if not on or loc not in locs:
            return x
        k = max(1, int(x.shape[-1] * s["activation_topk_fraction"]))
        if k >= x.shape[-1]:
            return x
        i = x.abs().topk(k, dim=-1).indices
        return torch.zeros_like(x).scatter(-1, i, x.gather(-1, i))

    def norm(x: torch.Tensor, p: str) -> torch.Tensor:
        if m["use_rms_norm"]:  # nn.RMSNorm, eps=None: the dtype's machine epsilon
            eps = torch.finfo(x.dtype).eps
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * sd[f"{p}.weight"]
        mu, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[f"{p}.weight"] + sd[f"{p}.bias"]

    def linear(x: torch.Tensor, p: str) -> torch.Tensor:
        y = x @ sd[f"{p}.weight"].T
        return y + sd[f"{p}.bias"] if m["use_bias"] else y

    x = sd["wte.weight"][idx]
    if m["use_positional_embeddings"]:
        x = x + sd["wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(m["n_layer"]):
        b = f"blocks.{i}"
        h = sparsify(norm(x, f"{b}.ln_1"), "attn_in")
        q, k, v = linear(h, f"{b}.attn.c_attn").split(d, dim=-1)
        q, k, v = sparsify(q, "attn_q"), sparsify(k, "attn_k"), sparsify(v, "attn_v")
        q, k, v = (t.view(B, T, H, Dh).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
        scores = scores.masked_fill(~causal, -math.inf)
        if m["use_attention_sinks"]:  # a zero key and value, logit = the head's sink logit
            sink = sd[f"{b}.attn.attn_fn.sink_logit"].view(1, H, 1, 1).expand(B, H, T, 1)
            att = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]
        else:
            att = torch.softmax(scores, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + sparsify(linear(y, f"{b}.attn.c_proj"), "attn_out")
        x = sparsify(x, "resid_mid")
        h = sparsify(norm(x, f"{b}.ln_2"), "mlp_in")
        h = linear(h, f"{b}.mlp.c_fc")
        h = F.gelu(h) if m["activation"] == "gelu" else torch.relu(h)
        h = sparsify(h, "mlp_neuron")
        x = x + sparsify(linear(h, f"{b}.mlp.c_proj"), "mlp_out")
    logits = norm(x, "ln_f") @ sd["lm_head.weight"].T
    if m["use_bigram_table"]:
        logits = logits + sd["bigram_table"][idx]
    return logits


def write_jacob(
    directory: Path,
    model_config: dict[str, Any],
    sparsity_config: dict[str, Any],
    sd: dict[str, torch.Tensor],
    *,
    weights: str = "pytorch_model.bin",
    yaml_locations: str | None = None,
    **top_level: Any,
) -> Path:
    """His upload layout (``train.py``'s ``upload_to_hub``)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_config": model_config,
        "sparsity_config": sparsity_config,
        "training_config": {"tokenizer_name": "SimpleStories/SimpleStories-1.25M"},
        **top_level,
    }
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(sd, directory / weights)
    if yaml_locations is not None:  # the lines his Config.to_yaml writes around the field
        (directory / "training_config.yaml").write_text(
            "sparsity:\n  enable_activation_sparsity: true\n  activation_topk_fraction: 0.25\n"
            f"  activation_sparsity_locations: {yaml_locations}\n"
        )
    return directory


def case(variant: str) -> tuple[dict, dict, dict]:
    v = VARIANTS[variant]
    m = {**BASE, **{k: x for k, x in v.items() if k in BASE}}
    s = {**SPARSITY, **{k: x for k, x in v.items() if k not in BASE}}
    return m, s, his_state(m, seed=sum(map(ord, variant)))


def check_logits(model, m: dict, s: dict, sd: dict) -> None:
    idx = torch.randint(0, m["vocab_size"], (3, m["n_ctx"]), generator=torch.Generator())
    with torch.no_grad():
        logits, _ = model(idx)
    torch.testing.assert_close(logits, reference_logits(m, s, sd, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_his_model_gives_his_logits(tmp_path, variant) -> None:
    m, s, sd = case(variant)
    model = load_model(write_jacob(tmp_path / variant, m, s, sd))
    assert model.config.n_head == m["d_model"] // m["d_head"]
    check_logits(model, m, s, sd)


def test_locations_come_from_training_config_yaml(tmp_path) -> None:
    m, s, sd = case("standalone")
    locs = DEFAULT_LOCS + ",resid_mid"
    model = load_model(write_jacob(tmp_path / "m", m, s, sd, yaml_locations=f'"{locs}"'))
    assert "resid_post_attn" in model.config.afrac_loctypes
    check_logits(model, m, {**s, "activation_sparsity_locations": locs}, sd)


def test_bridged_checkpoint_loads_the_sparse_model(tmp_path) -> None:
    m, s, sd = case("standalone")
    bridges = {"d_dense": "jacobcd52/ss_d128_f1", "encoder_afrac": 0.25, "n_layers": 2}
    directory = write_jacob(
        tmp_path / "b", m, s, sd, weights="sparse_model.bin", bridges_config=bridges
    )
    torch.save({"bridges.0.encoder.linear.weight": torch.zeros(4, 4)}, directory / "bridges.bin")
    check_logits(load_model(directory), m, s, sd)


def _error(exc_type: type[Exception], directory: Path) -> str:
    with pytest.raises(exc_type) as err:
        load_model(directory)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_resid_pre_is_refused_by_name(tmp_path) -> None:
    m, s, sd = case("standalone")
    locs = DEFAULT_LOCS + ",resid_mid,resid_pre"
    message = _error(ConfigError, write_jacob(tmp_path / "m", m, s, sd, yaml_locations=locs))
    assert "training_config.yaml" in message and "'resid_pre'" in message


@pytest.mark.parametrize(
    ("where", "field", "value"),
    [
        ("model", "n_experts", 4),
        ("model", "use_flash_attention", False),
        ("model", "activation", "silu"),
        ("sparsity", "activation_topk_fraction", 0.01),  # keeps no value of a 32-wide site
        ("top", "rope_config", {}),
    ],
)
def test_unsupported_fields_are_named(tmp_path, where, field, value) -> None:
    m, s, sd = case("standalone")
    extra = {field: value} if where == "top" else {}
    m = m | ({field: value} if where == "model" else {})
    s = s | ({field: value} if where == "sparsity" else {})
    message = _error(ConfigError, write_jacob(tmp_path / "m", m, s, sd, **extra))
    assert "config.json" in message and field in message


def test_missing_and_misshapen_weights_are_named_as_he_names_them(tmp_path) -> None:
    m, s, sd = case("standalone")
    key = "blocks.1.attn.attn_fn.sink_logit"
    message = _error(
        CheckpointError,
        write_jacob(tmp_path / "a", m, s, {k: v for k, v in sd.items() if k != key}),
    )
    assert "pytorch_model.bin" in message and key in message
    key = "blocks.0.mlp.c_fc.weight"
    message = _error(CheckpointError, write_jacob(tmp_path / "b", m, s, sd | {key: sd[key][:-1]}))
    assert "pytorch_model.bin" in message and key in message
    message = _error(
        CheckpointError,
        write_jacob(tmp_path / "c", m, s, sd | {"blocks.0.attn.causal_mask": torch.ones(1)}),
    )
    assert "blocks.0.attn.causal_mask" in message


class _NotATensor:  # pickled by reference: weights_only loading must refuse it
    pass


def test_weights_are_read_weights_only(tmp_path) -> None:
    m, s, sd = case("standalone")
    directory = write_jacob(tmp_path / "m", m, s, sd)
    torch.save({"wte.weight": _NotATensor()}, directory / "pytorch_model.bin")
    assert "pytorch_model.bin" in _error(CheckpointError, directory)
    (directory / "pytorch_model.bin").unlink()
    assert "pytorch_model.bin" in _error(CheckpointError, directory)
