"""``sparsecircuits analyze``: compute once, beside ``circuit.json``, everything costly the
dashboard shows (``analysis.json``, schema in ``viz/analysis_schema.py``).

Per circuit node: activation statistics and quantile snippets over pretraining windows, and its
activations on the task's first pairs; per attention head with a kept q/k/v node: its pattern on
the first task prompt; the token-embedding columns of the residual channels the circuit uses;
the direct path of residual writes to the two target logits; the training log. One batched
forward pass over the windows caches every hook site the nodes need.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparsecircuits import tasks
from sparsecircuits.circuits.means import pretrain_windows
from sparsecircuits.circuits.nodes import Location, Node, NodeSpace
from sparsecircuits.circuits.pipeline import LoadedModel, load_for_circuits
from sparsecircuits.circuits.schema import CIRCUIT_FILE, CircuitDoc, load_circuit
from sparsecircuits.errors import CheckpointError
from sparsecircuits.fileio import atomic_write_bytes
from sparsecircuits.model.gpt import GPT
from sparsecircuits.tasks.metrics import pad_prompts
from sparsecircuits.viz import analysis_parts as parts
from sparsecircuits.viz.analysis_parts import sig, sig_list
from sparsecircuits.viz.analysis_schema import (
    ANALYSIS_FILE,
    QUANTILES,
    AnalysisDoc,
    dump_analysis,
    load_analysis,
)

log = logging.getLogger(__name__)

CORPUS = "stdlib"
TASK_PAIRS = 8  # task pairs whose per-token activations are stored
BATCH = 8  # pretraining windows per forward pass


def analyze(
    circuit_dir: str | Path,
    *,
    model: str | None = None,
    n_windows: int = 64,
    force: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[AnalysisDoc, Path, bool]:
    """Load or compute ``circuit_dir/analysis.json``.

    ``model``: the model directory (default: the one named in circuit.json). An existing valid
    file for the same weights is reused unless ``force``. Returns (document, path, reused).
    """
    circuit_dir = Path(circuit_dir)
    if circuit_dir.is_file():
        circuit_dir = circuit_dir.parent
    doc = load_circuit(circuit_dir)
    path = circuit_dir / ANALYSIS_FILE
    if path.exists() and not force:
        try:
            existing = load_analysis(path, weights_hash=doc.model.weights_hash)
        except CheckpointError as err:
            log.warning("recomputing the analysis: %s", err)
        else:
            if existing.n_windows == n_windows:
                return existing, path, True
            log.info("recomputing: %s has %d windows, asked for %d", path, existing.n_windows,
                     n_windows)  # fmt: skip
    lm = load_for_circuits(model or doc.model.id, device=device)
    doc = load_circuit(circuit_dir, model=lm.model)  # refuses other weights
    check_nodes(doc, lm.model, source=str(circuit_dir / CIRCUIT_FILE))
    result = compute_analysis(lm, doc, n_windows=n_windows)
    write_analysis(result, path)
    return result, path, False


def check_nodes(doc: CircuitDoc, model: GPT, *, source: str) -> None:
    """Raise CheckpointError unless every node of ``doc`` exists in ``model`` (a layer, location
    and channel it has): an out-of-range node would otherwise fail deep in the forward pass or
    read another channel."""
    space = NodeSpace(model.config, mask_embed=doc.mask_embed)
    groups = {(g.layer, g.loc): g for g in space.groups}
    n_layer = model.config.n_layer
    for n in doc.nodes:
        g = groups.get((n.layer, n.loc))
        if g is not None and 0 <= n.index < g.size:
            continue
        if g is not None:
            why = f"index {n.index} is outside [0, {g.size}) at {g.key}"
        elif n.loc is Location.EMBED and not doc.mask_embed:
            why = "the circuit has no embedding nodes (mask_embed is false)"
        elif n.loc is Location.EMBED:
            why = "embedding nodes sit at layer -1"
        else:
            why = f"layer {n.layer} is outside the model's layers 0..{n_layer - 1}"
        raise CheckpointError(
            f"{source}: node {n.id} (layer {n.layer}, {n.loc.value}, index {n.index}) does not "
            f"exist in model {doc.model.id}: {why}"
        )


def write_analysis(doc: AnalysisDoc, path: str | Path) -> None:
    """Write compact JSON atomically (indentation would triple the size of the float arrays)."""
    data = json.dumps(dump_analysis(doc), separators=(",", ":"), allow_nan=False)
    atomic_write_bytes(path, data.encode())


def analysis_writer(*, n_windows: int = 64) -> Callable[[LoadedModel, CircuitDoc, Path], None]:
    """A function writing ``analysis.json`` of a circuit into a directory (for importers below
    this layer, e.g. ``interop.viz_import``)."""

    def write(lm: LoadedModel, doc: CircuitDoc, directory: Path) -> None:
        write_analysis(compute_analysis(lm, doc, n_windows=n_windows), directory / ANALYSIS_FILE)

    return write


@torch.no_grad()
def compute_analysis(lm: LoadedModel, doc: CircuitDoc, *, n_windows: int = 64) -> AnalysisDoc:
    """Everything of ``analysis.json`` for circuit ``doc`` of model ``lm``."""
    t0 = time.perf_counter()
    model, tok = lm.model, lm.tokenizer
    names: dict[int, str] = {}

    def token(i: int) -> str:
        if i not in names:
            names[i] = tok.decode([i])
        return names[i]

    nodes = {n.id: Node(n.layer, n.loc, n.index) for n in doc.nodes}
    block = model.config.block_size
    windows = pretrain_windows(tok, corpus=CORPUS, n_windows=n_windows, length=block)
    acts = node_activations(model, windows, nodes)  # id -> (N, T)
    log.info("activations of %d nodes on %d windows: %.1f s", len(nodes), n_windows,
             time.perf_counter() - t0)  # fmt: skip
    batch = tasks.get(doc.task).build(
        tok, split=doc.split, n=max(doc.n_pairs, TASK_PAIRS), seed=doc.seed, max_len=block
    )
    batch = batch.head(TASK_PAIRS)
    heads = parts.attention_heads(doc)
    extra = [f"{layer}.attn.{s}" for layer in {h[0] for h in heads} for s in ("q", "k")]
    task_a, cache_a = prompt_activations(model, batch.prompts_a, nodes, extra_sites=extra)
    task_b, _ = prompt_activations(model, batch.prompts_b, nodes)
    tokens_a = [[token(i) for i in p] for p in batch.prompts_a]
    tokens_b = [[token(i) for i in p] for p in batch.prompts_b]
    out_nodes: dict[str, Any] = {}
    for nid, node in nodes.items():
        a = acts[nid]
        out_nodes[nid] = {
            "site": node.site,
            "channel": node.index,
            "stats": stats(a),
            "samples": samples(a, windows, token),
            "task": task_section(task_a[nid], task_b[nid], tokens_a, tokens_b),
        }
    a0_len = len(batch.prompts_a[0])
    cache0 = {k: v[:1, :a0_len] for k, v in cache_a.items()}
    attention = {
        f"{layer}.{head}": parts.head_attention(model, cache0, layer, head, chans, tokens_a[0])
        for (layer, head), chans in heads.items()
    }
    ids = [int(batch.target_a[0]), int(batch.target_b[0])]
    data = {
        "schema": "sparsecircuits.analysis",
        "circuit_weights_hash": doc.model.weights_hash,
        "task": doc.task,
        "corpus": CORPUS,
        "n_windows": n_windows,
        "window": block,
        "quantiles": list(QUANTILES),
        "nodes": out_nodes,
        "attention": attention,
        "embeddings": parts.embeddings(model, parts.residual_channels(doc), token),
        "metrics": parts.training_metrics(lm.directory),
        "targets": {
            "tokens": [token(i) for i in ids],
            "ids": ids,
            "direct": parts.direct_logits(model, doc, ids),
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    result = AnalysisDoc.model_validate(data)
    log.info("analysis of %d nodes in %.1f s", len(nodes), time.perf_counter() - t0)
    return result


def _sites(nodes: dict[str, Node]) -> dict[str, tuple[list[str], list[int]]]:
    """{hook site: (node ids, channels)} for every non-embedding node."""
    by_site: dict[str, tuple[list[str], list[int]]] = defaultdict(lambda: ([], []))
    for nid, n in nodes.items():
        if n.loc is not Location.EMBED:
            by_site[n.site][0].append(nid)
            by_site[n.site][1].append(n.index)
    return dict(by_site)


def _gather(
    model: GPT, idx: torch.Tensor, nodes: dict[str, Node], extra_sites: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward of ``idx`` (B, T): per node id its activation (B, T) (token nodes: 1 where
    the token is theirs), and the full cached tensors of ``extra_sites``."""
    by_site = _sites(nodes)
    dev = next(model.parameters()).device
    _, cache = model.run_with_cache(idx.to(dev), names=sorted({*by_site, *extra_sites}))
    out: dict[str, torch.Tensor] = {}
    for site, (ids, chans) in by_site.items():
        sel = cache[site][..., chans].float().cpu()  # (B, T, k)
        for j, nid in enumerate(ids):
            out[nid] = sel[..., j]
    for nid, n in nodes.items():
        if n.loc is Location.EMBED:
            out[nid] = (idx == n.index).float()
    return out, {s: cache[s].float().cpu() for s in extra_sites}


def node_activations(
    model: GPT, windows: torch.Tensor, nodes: dict[str, Node]
) -> dict[str, torch.Tensor]:
    """Activation of every node on ``windows`` (N, T), batched: {id: (N, T) float32}."""
    parts_: dict[str, list[torch.Tensor]] = defaultdict(list)
    for start in range(0, windows.shape[0], BATCH):
        got, _ = _gather(model, windows[start : start + BATCH], nodes, [])
        for nid, a in got.items():
            parts_[nid].append(a)
    return {nid: torch.cat(v) for nid, v in parts_.items()}


def prompt_activations(
    model: GPT, prompts: list[list[int]], nodes: dict[str, Node], *, extra_sites: list[str] = ()
) -> tuple[dict[str, list[list[float]]], dict[str, torch.Tensor]]:
    """Per node id, per prompt: its rounded activation at each token; and ``extra_sites``'
    cached tensors (right-padded batch, prompt order)."""
    idx, lengths = pad_prompts(prompts)
    got, extra = _gather(model, idx, nodes, list(extra_sites))
    out = {}
    for nid, a in got.items():
        rows = sig_list(a)  # one rounding pass per node: (B, T) nested lists
        out[nid] = [row[: int(n)] for row, n in zip(rows, lengths, strict=True)]
    return out, extra


def stats(a: torch.Tensor) -> dict[str, float]:
    """Mean, std, fraction nonzero, min and max of all entries of ``a``."""
    flat = a.reshape(-1).double()
    return {
        "mean": sig(flat.mean()),
        "std": sig(flat.std()) if flat.numel() > 1 else 0.0,
        "frac_nonzero": sig((flat != 0).double().mean()),
        "min": sig(flat.min()),
        "max": sig(flat.max()),
    }


def samples(a: torch.Tensor, windows: torch.Tensor, token) -> dict[str, list[dict[str, Any]]]:
    """Snippets at the quantiles of ``a`` (N, T): ``top`` at 1-q, ``bottom`` at q. Each holds
    the focus token with up to 24 tokens before and 4 after it (one window, no wrap-around)."""
    flat = a.reshape(-1)
    order = torch.argsort(flat, stable=True)
    last, width = flat.numel() - 1, a.shape[1]
    picks = []  # (side, q, window, lo, hi, focus position)
    for q in QUANTILES:
        for side, rank in (("top", round((1 - q) * last)), ("bottom", round(q * last))):
            n, t = divmod(int(order[rank]), width)
            lo, hi = max(0, t - parts.SNIPPET_BEFORE), min(width, t + parts.SNIPPET_AFTER + 1)
            picks.append((side, q, n, lo, hi, t))
    values = sig_list(torch.cat([a[n, lo:hi] for _, _, n, lo, hi, _ in picks]))
    out: dict[str, list[dict[str, Any]]] = {"top": [], "bottom": []}
    start = 0
    for side, q, n, lo, hi, t in picks:
        acts = values[start : start + hi - lo]
        start += hi - lo
        out[side].append(
            {
                "q": q,
                "value": acts[t - lo],
                "tokens": [token(int(i)) for i in windows[n, lo:hi]],
                "acts": acts,
                "focus": t - lo,
            }
        )
    return out


def task_section(
    rows_a: list[list[float]], rows_b: list[list[float]], tokens_a: list[list[str]],
    tokens_b: list[list[str]],
) -> dict[str, Any]:  # fmt: skip
    """Per-token activations on the pairs' A and B prompts and the final-position means."""

    def prompts(rows: list[list[float]], toks: list[list[str]]) -> list[dict[str, Any]]:
        return [{"tokens": t, "acts": a} for a, t in zip(rows, toks, strict=True)]

    def final_mean(rows: list[list[float]]) -> float:
        return sig(sum(a[-1] for a in rows) / len(rows))

    return {
        "a": prompts(rows_a, tokens_a),
        "b": prompts(rows_b, tokens_b),
        "mean_a": final_mean(rows_a),
        "mean_b": final_mean(rows_b),
    }
