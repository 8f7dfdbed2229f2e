"""Pieces of ``analysis.json`` that need one prompt or only the weights: attention patterns,
token-embedding columns, the direct path to the target logits and the training log."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsecircuits.circuits.nodes import READS, WRITES, Location
from sparsecircuits.circuits.schema import CircuitDoc
from sparsecircuits.model.gpt import GPT

log = logging.getLogger(__name__)

SNIPPET_BEFORE = 24  # tokens of context before a snippet's focus token
SNIPPET_AFTER = 4
EMBED_TOP = 10  # tokens listed per embedding channel (each side)
HIST_BINS = 30
MAX_METRIC_ROWS = 2000  # longer logs are thinned (evaluation rows are always kept)


def sig(x: float) -> float:
    """``x`` rounded to 4 significant digits (non-finite values become 0)."""
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else 0.0


def sig_list(values: torch.Tensor | np.ndarray | Iterable[float]) -> list:
    """Values rounded to 4 significant digits as (nested) lists; see :func:`sig_array`."""
    return sig_array(values).tolist()


def sig_array(values: torch.Tensor | np.ndarray | Iterable[float]) -> np.ndarray:
    """An array of any shape rounded to 4 significant digits (non-finite values become 0)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    x = np.asarray(values, dtype=np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    mag = np.floor(np.log10(np.where(x == 0, 1.0, np.abs(x)))).astype(np.int64) - 3
    out = np.empty_like(x)
    big = mag >= 0  # scale by exact powers of ten: multiply for big values, divide for small
    step = 10.0 ** mag[big]
    out[big] = np.round(x[big] / step) * step
    scale = 10.0 ** -mag[~big]
    out[~big] = np.round(x[~big] * scale) / scale
    return out


def head_attention(
    model: GPT,
    cache: dict[str, torch.Tensor],
    layer: int,
    head: int,
    channels: list[int],
    prompt: list[str],
) -> dict[str, Any]:
    """One head's attention on one prompt from its cached q and k (1, T, d_attn).

    ``pattern`` (T, T+1) is the softmax over [sink, tokens] (the sink column is 0 for a model
    without sinks); ``channels[C]`` (T, T) is channel C's share q_C k_C / sqrt(d_head) of the
    attention logit, None above the diagonal."""
    d = model.config.d_head
    sl = slice(head * d, (head + 1) * d)
    q = cache[f"{layer}.attn.q"][0, :, sl].float()  # (T, d_head)
    k = cache[f"{layer}.attn.k"][0, :, sl].float()
    t = q.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = (q @ k.T / math.sqrt(d)).masked_fill(~causal, -math.inf)
    imp = model.transformer.h[layer].attn.attn_imp
    sink = float(imp.sink_logit[head]) if imp is not None else -math.inf
    full = torch.cat([torch.full((t, 1), sink), scores], dim=1)
    pattern = torch.softmax(full, dim=1)
    out_channels = {}
    for c in channels:
        share = torch.outer(q[:, c], k[:, c]) / math.sqrt(d)
        out_channels[str(c)] = [
            [sig(v) if j <= i else None for j, v in enumerate(row)]
            for i, row in enumerate(share.tolist())
        ]
    return {
        "prompt": prompt,
        "pattern": [sig_list(row) for row in pattern],
        "channels": out_channels,
    }


def attention_heads(doc: CircuitDoc) -> dict[tuple[int, int], list[int]]:
    """{(layer, head): sorted channels kept at q or k} for every head with a kept q/k/v node."""
    heads: dict[tuple[int, int], set[int]] = {}
    for n in doc.nodes:
        if n.head is None or n.channel is None:
            continue
        chans = heads.setdefault((n.layer, n.head), set())
        if n.loc in (Location.ATTN_Q, Location.ATTN_K):
            chans.add(n.channel)
    return {key: sorted(v) for key, v in sorted(heads.items())}


def residual_channels(doc: CircuitDoc) -> list[int]:
    """Residual channels the circuit reads or writes (sorted); a read's position channels
    (index >= d_model, with concatenated positions) are not residual channels."""
    d_model = doc.model.d_model
    return sorted({n.index for n in doc.nodes if n.loc in (*READS, *WRITES) and n.index < d_model})


@torch.no_grad()
def embeddings(model: GPT, channels: list[int], token: Callable[[int], str]) -> dict[str, Any]:
    """Per residual channel C: the 10 tokens of largest and smallest ``wte[:, C]`` and a
    30-bin histogram of the column; plus ``wpe`` (block_size, d_model) at 4 decimals (None for
    a model without learned positions)."""
    wte = model.transformer.wte.weight.detach().float().cpu()
    n = min(EMBED_TOP, wte.shape[0])
    out: dict[str, Any] = {}
    for c in channels:
        col = wte[:, c]
        top = torch.topk(col, n)
        bottom = torch.topk(col, n, largest=False)
        counts, edges = np.histogram(col.numpy(), bins=HIST_BINS)
        out[str(c)] = {
            "top": [[token(int(i)), sig(v)] for v, i in zip(top.values, top.indices, strict=True)],
            "bottom": [
                [token(int(i)), sig(v)] for v, i in zip(bottom.values, bottom.indices, strict=True)
            ],
            "hist": {"edges": sig_list(edges), "counts": [int(x) for x in counts]},
        }
    wpe = None
    if model.config.learned_pos_emb:
        w = model.transformer.wpe.weight.detach().float().cpu().numpy()
        wpe = np.round(w, 4).tolist()
    return {"channels": out, "wpe": wpe}


@torch.no_grad()
def direct_logits(model: GPT, doc: CircuitDoc, ids: list[int]) -> dict[str, list[float]]:
    """For every residual write node C: ``ln_f.weight[C] * lm_head[t, C]`` for each target t."""
    w = model.lm_head.weight.detach().float().cpu()[ids]  # (2, d_model)
    gain = getattr(model.transformer.ln_f, "weight", None)
    if gain is not None:
        w = w * gain.detach().float().cpu()[None, :]
    return {n.id: sig_list(w[:, n.index]) for n in doc.nodes if n.loc in WRITES}


def training_metrics(model_dir: Path) -> list[dict[str, Any]] | None:
    """Rows of the run's ``metrics.jsonl`` (beside the model, or in the run directory above a
    ``model/`` directory): step, train_loss, val_loss, l0_frac, dead_neurons (summed)."""
    candidates = [model_dir / "metrics.jsonl"]
    if model_dir.name == "model":
        candidates.append(model_dir.parent / "metrics.jsonl")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    rows: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a run still being written
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        row: dict[str, Any] = {"step": rec["step"]}
        for key in ("train_loss", "val_loss", "l0_frac"):
            v = rec.get(key)
            row[key] = sig(v) if isinstance(v, int | float) and math.isfinite(v) else None
        dead = rec.get("dead_neurons")
        if isinstance(dead, list):
            dead = sum(int(x) for x in dead)
        row["dead_neurons"] = int(dead) if isinstance(dead, int | float) else None
        rows.append(row)
    if len(rows) > MAX_METRIC_ROWS:
        stride = math.ceil(len(rows) / MAX_METRIC_ROWS)
        rows = [r for i, r in enumerate(rows) if i % stride == 0 or r["val_loss"] is not None]
    log.info("read %d training-log rows from %s", len(rows), path)
    return rows
