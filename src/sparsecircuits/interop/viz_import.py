"""``sparsecircuits import-viz``: a circuit published by OpenAI (``viz_data.pt``, the file their
viewer ``circuit_sparsity/viz.py`` reads) as our ``circuit.json``, so our dashboard opens it.

What the official file holds (loaded with ``torch.load(weights_only=True)``, never otherwise):

- ``circuit_data``: ``{"L.attn.q": LongTensor of kept channels, ...}`` keyed by the official
  hook names, which are our hook sites (``circuits/nodes.py`` SITE); it may also carry a
  ``prune_config`` entry;
- ``importances``: ``loss`` (full model) and ``interv_loss`` (circuit), ``ch_interv_losses``
  (per location, the loss with each kept channel ablated, in ``circuit_data`` order),
  ``layer_interv_losses`` (``"L.attn"``/``"L.mlp"``: the loss with that block's nodes
  ablated), ``beeg_model_config`` and the viewer's own tables (``pair_data``, ``task_samples``)
  that we do not use: our edges come from the model's weights and ``analysis.json`` from our
  own pass;
- ``all_loss`` (``(step, loss)`` of the official search), ``num_total_nodes``,
  ``prune_config``, ``samples``.

**Losses.** The official task loss of a pair is the *sum* of its two prompts' losses, ours the
per-prompt mean, so every loss is halved (``LOSS_SCALE``), as the official viewer's own comments
say ("off by a factor of 2"). Per-block values follow the viewer's arithmetic exactly: it
subtracts the halved circuit loss from ``layer_interv_losses`` as stored.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from sparsecircuits import tasks
from sparsecircuits.circuits.edges import WEIGHT_KINDS, edge_set
from sparsecircuits.circuits.nodes import SITE, Location, Node, NodeSpace
from sparsecircuits.circuits.pipeline import EDGES_INLINE, LoadedModel
from sparsecircuits.circuits.prune import PruneConfig
from sparsecircuits.circuits.schema import (
    EDGES_FILE,
    CircuitDoc,
    ImportRec,
    LayerDelta,
    Losses,
    ModelRef,
    edge_record,
    node_record,
    save_circuit,
)
from sparsecircuits.errors import CheckpointError, InputError, SparseCircuitsError
from sparsecircuits.fileio import atomic_dir, atomic_write
from sparsecircuits.interop.download import file_sha256
from sparsecircuits.model.config import format_validation_error
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import load_model, resolve_model_dir, weights_hash

log = logging.getLogger(__name__)
# Writes the dashboard's data (analysis.json) for a circuit of a loaded model into a directory.
Analyzer = Callable[[LoadedModel, CircuitDoc, Path], None]

FORMAT = "openai.viz_data"
LOSS_SCALE = 0.5  # official per-pair sums -> our per-prompt means
SITE_LOCATION: dict[str, Location] = {site: loc for loc, site in SITE.items()}
# Stand-ins for what the official file does not record (docs/interop.md gives the reasons).
TARGET_LOSS = 0.15  # the paper's target, on our scale
PLACEHOLDERS = [
    "split", "n_pairs", "n_test_pairs", "seed", "ablation", "target_loss", "reached",
    "prune_config", "loss.full_test", "loss.circuit_test", "accuracy", "nodes[].tau",
    "pruning_curve", "seconds",
]  # fmt: skip
_LOCATION = re.compile(r"(\d+)\.((?:attn|mlp)\.\w+)")
_BLOCK = re.compile(r"(\d+)\.(attn|mlp)")


@dataclass(frozen=True)
class OfficialCircuit:
    """The parts of a ``viz_data.pt`` we import (losses on the official scale)."""

    nodes: dict[str, list[int]]  # official location -> kept channels, in file order
    loss: float  # full model
    interv_loss: float  # circuit
    ch_losses: dict[str, list[float]]  # location -> loss with each kept channel ablated
    layer_losses: dict[str, float]  # "L.attn" / "L.mlp" -> loss with the block's nodes ablated
    all_loss: list[tuple[float, float]]  # (search step, loss)
    bookkeeping: dict[str, Any]  # num_total_nodes, prune_config, beeg_model_config


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_viz` wrote."""

    directory: Path
    doc: CircuitDoc
    analysed: bool
    note: str | None  # why analysis.json was not written (None when it was)


def _err(src: str, field: str, what: str) -> CheckpointError:
    return CheckpointError(f"{src}: field '{field}': {what}")


def _get(data: Any, key: str, src: str, field: str) -> Any:
    """``data[key]`` of a required field (``field``: where ``data`` sits in the file)."""
    if not isinstance(data, dict):
        raise _err(src, field, f"expected a dict, got {_show(data)}")
    if key not in data:
        raise CheckpointError(f"{src}: field '{f'{field}.{key}' if field else key}' is missing")
    return data[key]


def _number(x: Any, src: str, field: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype != torch.bool:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise _err(src, field, f"expected a finite number, got {_show(x)}")
    return float(x)


def _numbers(x: Any, src: str, field: str, *, integer: bool) -> list:
    if isinstance(x, torch.Tensor):
        ok = x.dim() == 1 and (not integer or not (x.is_floating_point() or x.is_complex()))
        if not ok or x.dtype == torch.bool:
            kind = "integer" if integer else "numeric"
            raise _err(src, field, f"expected a 1-D {kind} tensor, got {_show(x)}")
        x = x.tolist()
    if not isinstance(x, list | tuple):
        raise _err(src, field, f"expected a list or 1-D tensor, got {_show(x)}")
    if integer and not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise _err(src, field, "expected integer channel indices")
    return list(x) if integer else [_number(v, src, field) for v in x]


def _show(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {str(x.dtype).removeprefix('torch.')} tensor"
    return repr(x) if isinstance(x, int | float | str) else type(x).__name__


def read_viz_data(path: str | Path) -> OfficialCircuit:
    """Load and check ``viz_data.pt`` (one-line CheckpointError naming the field)."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise CheckpointError(f"{src}: no such file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types; never retry with unsafe unpickling
        text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())  # one line, no colours
        why = text.partition("Unpickler error:")[2] or text
        first = why.partition(". ")[0].strip()[:160] or type(err).__name__
        raise CheckpointError(
            f"{src}: cannot be read with torch.load(weights_only=True) ({first}); it is not "
            "loaded any other way"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{src}: expected a dict (viz_data.pt), got {type(raw).__name__}")
    circuit = _get(raw, "circuit_data", src, "")
    if not isinstance(circuit, dict) or not circuit:
        raise _err(src, "circuit_data", f"expected a non-empty dict, got {_show(circuit)}")
    book: dict[str, Any] = {}
    nodes: dict[str, list[int]] = {}
    for key, value in circuit.items():
        if key == "prune_config":  # some releases keep the config here
            book["prune_config"] = value
            continue
        nodes[str(key)] = _numbers(value, src, f"circuit_data.{key}", integer=True)
    imp = _get(raw, "importances", src, "")
    loss = _number(_get(imp, "loss", src, "importances"), src, "importances.loss")
    interv = _number(_get(imp, "interv_loss", src, "importances"), src, "importances.interv_loss")
    ch_raw = imp.get("ch_interv_losses") or {}  # optional: node deltas stay unknown
    if not isinstance(ch_raw, dict):
        raise _err(src, "importances.ch_interv_losses", f"expected a dict, got {_show(ch_raw)}")
    ch = {
        str(k): _numbers(v, src, f"importances.ch_interv_losses.{k}", integer=False)
        for k, v in ch_raw.items()
    }
    for key, values in ch.items():
        if key in nodes and len(values) != len(nodes[key]):
            raise _err(
                src, f"importances.ch_interv_losses.{key}",
                f"{len(values)} values for the {len(nodes[key])} channels of circuit_data",
            )  # fmt: skip
    lay_raw = imp.get("layer_interv_losses") or {}
    if not isinstance(lay_raw, dict):
        raise _err(src, "importances.layer_interv_losses", f"expected a dict, got {_show(lay_raw)}")
    layers = {
        str(k): _number(v, src, f"importances.layer_interv_losses.{k}") for k, v in lay_raw.items()
    }
    steps = []
    for i, row in enumerate(raw.get("all_loss") or []):
        where = f"all_loss[{i}]"
        if not isinstance(row, list | tuple) or len(row) != 2:
            raise _err(src, where, f"expected a (step, loss) pair, got {_show(row)}")
        steps.append((_number(row[0], src, where), _number(row[1], src, where)))
    kept = ((raw, "num_total_nodes"), (raw, "prune_config"), (imp, "beeg_model_config"))
    for holder, key in kept:  # the file's own record, kept JSON-converted
        if holder.get(key) is not None:
            book[key] = holder[key]
    return OfficialCircuit(nodes, loss, interv, ch, layers, steps, book)


def infer_task(path: str | Path) -> str | None:
    """The task of ``viz/<model>/<task>/<sweep>/<k>/viz_data.pt`` when it names one of ours,
    with the official ``_beeg``/``_beeg3`` variant suffixes dropped (None if it does not)."""
    parts = Path(path).resolve().parts
    if len(parts) < 4:
        return None
    name = re.sub(r"_beeg\d*$", "", parts[-4])
    return name if name in tasks.names() else None


def _json(x: Any) -> Any:
    """A JSON-safe copy of the file's bookkeeping (tensors as lists, odd values as text)."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, dict):
        return {str(k): _json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x if x is None or isinstance(x, bool | int | float | str) else repr(x)


def _check_config(off: OfficialCircuit, model: GPT, *, src: str, spec: str) -> None:
    """Refuse a model whose shape differs from the file's ``beeg_model_config``."""
    cfg = off.bookkeeping.get("beeg_model_config")
    if not isinstance(cfg, dict):
        return
    c = model.config
    ours = {"n_layer": c.n_layer, "n_head": c.n_head, "d_model": c.d_model, "d_head": c.d_head,
            "d_mlp": c.mlp_width, "vocab_size": c.vocab_size,
            "block_size": c.block_size}  # fmt: skip
    bad = [f"{k}={cfg[k]} (model: {v})" for k, v in ours.items()
           if isinstance(cfg.get(k), int) and cfg[k] != v]  # fmt: skip
    if "d_pos_emb" in cfg and cfg["d_pos_emb"] != c.d_pos_emb:  # null = positions added
        bad.append(f"d_pos_emb={cfg['d_pos_emb']} (model: {c.d_pos_emb})")
    if bad:
        raise CheckpointError(
            f"{src}: field 'importances.beeg_model_config': made for another model than {spec}: "
            f"{', '.join(bad)}; pass the model the circuit was pruned in"
        )


def _kept_nodes(off: OfficialCircuit, space: NodeSpace, *, src: str, spec: str) -> list[Node]:
    """Our nodes for the file's locations, checked against the model (one-line errors)."""
    known = ", ".join(f"L.{s}" for s in SITE.values())
    out: list[Node] = []
    for key, channels in off.nodes.items():
        m = _LOCATION.fullmatch(key)
        loc = SITE_LOCATION.get(m.group(2)) if m else None
        if m is None or loc is None:
            raise _err(src, "circuit_data", f"location '{key}' is not a node location ({known})")
        layer = int(m.group(1))
        if layer >= space.config.n_layer:
            n = space.config.n_layer
            raise _err(src, "circuit_data", f"location '{key}': {spec} has layers 0..{n - 1}")
        g = space.group(layer, loc)
        for i in channels:
            if not 0 <= i < g.size:  # read sites include d_pos_emb position channels if any
                raise _err(src, f"circuit_data.{key}", f"index {i} outside [0, {g.size}) of {spec}")
        if len(set(channels)) != len(channels):
            raise _err(src, f"circuit_data.{key}", "a channel is listed twice")
        out += [Node(layer, loc, i) for i in channels]
    return out


def build_doc(
    off: OfficialCircuit, model: GPT, *, spec: str, digest: str, task: str, src: str, sha: str
) -> tuple[CircuitDoc, Any]:
    """The circuit document (and its edge set) of ``off`` in ``model``."""
    space = NodeSpace(model.config)
    _check_config(off, model, src=src, spec=spec)
    nodes = _kept_nodes(off, space, src=src, spec=spec)
    order = sorted(range(len(nodes)), key=lambda j: space.flat_index(nodes[j]))
    circuit = off.interv_loss * LOSS_SCALE
    deltas: list[float | None] = []
    for key, channels in off.nodes.items():
        ch = off.ch_losses.get(key)
        deltas += [None] * len(channels) if ch is None else [v * LOSS_SCALE - circuit for v in ch]
    c = model.config
    recs = [node_record(nodes[j], d_head=c.d_head, tau=0.0, delta=deltas[j]) for j in order]
    kept = torch.tensor([space.flat_index(nodes[j]) for j in order], dtype=torch.long)
    edges = edge_set(model, space, kept)
    by_kind = edges.count_by_kind()
    by_loc: dict[str, int] = {}
    for n in recs:
        by_loc[n.loc.value] = by_loc.get(n.loc.value, 0) + 1
    layer_deltas = []
    for key, value in off.layer_losses.items():
        m = _BLOCK.fullmatch(key)
        if m is None or int(m.group(1)) >= c.n_layer:
            raise _err(src, "importances.layer_interv_losses", f"'{key}' is not a block of {spec}")
        layer, block = int(m.group(1)), m.group(2)
        n = sum(1 for r in recs if r.layer == layer and SITE[r.loc].startswith(block + "."))
        # as the official viewer: layer_interv_losses[k] - interv_loss / 2
        layer_deltas.append(LayerDelta(layer=layer, block=block, n_nodes=n, delta=value - circuit))
    layer_deltas.sort(key=lambda d: (d.layer, d.block))
    cfg = PruneConfig(target_loss=TARGET_LOSS)
    inline = len(edges) <= EDGES_INLINE
    official = _json(off.bookkeeping)
    official["pruning_losses"] = [{"step": s, "loss": v * LOSS_SCALE} for s, v in off.all_loss]
    try:
        doc = CircuitDoc(
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            model=ModelRef(id=spec, weights_hash=digest, n_layer=c.n_layer, d_model=c.d_model,
                           n_head=c.n_head, d_head=c.d_head, d_mlp=c.mlp_width,
                           d_pos_emb=c.d_pos_emb),
            task=task, split="train", n_pairs=cfg.n_train_pairs, n_test_pairs=cfg.n_test_pairs,
            seed=cfg.seed, ablation="mean", mask_embed=False, frozen_norms=False,
            target_loss=cfg.target_loss, reached=circuit <= cfg.target_loss, calibration=None,
            prune_config=cfg.model_dump(mode="json"), total_nodes=space.total,
            n_nodes=len(recs), n_edges=len(edges),
            n_weight_edges=sum(by_kind[k] for k in WEIGHT_KINDS),
            n_nodes_by_location=by_loc, n_edges_by_kind=by_kind,
            loss=Losses(full=off.loss * LOSS_SCALE, circuit=circuit, circuit_test=circuit,
                        full_test=off.loss * LOSS_SCALE),
            accuracy={}, delta_method="exact", nodes=recs,
            edges=[edge_record(e) for e in edges.edges(space)] if inline else [],
            edges_file=None if inline else EDGES_FILE, layer_deltas=layer_deltas,
            pruning_curve=[], k_curve=[{"k": float(len(recs)), "loss": circuit}], seconds=0.0,
            imported_from=ImportRec(format=FORMAT, file=src, sha256=sha, loss_scale=LOSS_SCALE,
                                    placeholders=PLACEHOLDERS, official=official),
        )  # fmt: skip
    except ValidationError as err:
        raise CheckpointError(format_validation_error(err, source=src)) from None
    return doc, edges


def import_viz(
    path: str | Path,
    *,
    model: str | Path,
    out: str | Path,
    task: str | None = None,
    analyze: Analyzer | None = None,
    force: bool = False,
    device: str | torch.device = "cpu",
) -> ImportResult:
    """Write ``out/circuit.json`` (plus ``edges.safetensors`` for large circuits and, where
    possible, ``analysis.json``) for the official circuit file ``path`` in ``model`` (the
    official model directory it was pruned in, or any directory ``load_model`` reads).

    ``task``: our task name (default: from the ``viz/<model>/<task>/...`` path); ``analyze``:
    a function writing the dashboard's data for the circuit into the directory it is given
    (the CLI passes ``viz.analysis``'s; this layer does not import the dashboard), run when
    the model directory has a tokenizer and the task is one we know;
    ``force``: replace a non-empty ``out``. Everything is checked before anything is written,
    and ``out`` appears complete or not at all.
    """
    out, src = Path(out), str(path)
    if out.exists() and not (out.is_dir() and (force or not any(out.iterdir()))):
        raise InputError(f"{out} exists and is not an empty directory (--force replaces one)")
    off = read_viz_data(path)
    task = task or infer_task(path)
    if task is None:
        raise InputError(
            f"{src}: cannot tell the task from the path (viz/<model>/<task>/<sweep>/<k>/); "
            "give --task NAME"
        )
    model_dir = resolve_model_dir(model)
    spec = str(Path(model).resolve()) if Path(model).exists() else str(model)
    gpt = load_model(model_dir, device=device)
    for p in gpt.parameters():
        p.requires_grad_(False)
    digest = weights_hash(gpt)
    doc, edges = build_doc(off, gpt, spec=spec, digest=digest, task=task, src=src,
                           sha=file_sha256(path))  # fmt: skip
    lm, note = (None, None)
    if analyze is not None:
        lm, note = _analysable(doc, gpt, model_dir, spec, digest)
    with atomic_dir(out) as tmp:
        if doc.edges_file is not None:
            arrays = {k: getattr(edges, k).contiguous() for k in ("src", "dst", "kind", "weight")}
            atomic_write(tmp / doc.edges_file, lambda t: save_file(arrays, t))
        save_circuit(doc, tmp)
        if lm is not None and analyze is not None:
            analyze(lm, doc, tmp)
    if note:
        log.warning("%s: no analysis.json (%s)", out, note)
    return ImportResult(out, doc, lm is not None, note if analyze else "not asked for")


def _analysable(
    doc: CircuitDoc, model: GPT, model_dir: Path, spec: str, digest: str
) -> tuple[LoadedModel | None, str | None]:
    """The loaded model for the analysis, or None and why it cannot run."""
    from sparsecircuits.data.tokenizer import Tokenizer

    if doc.task not in tasks.names():
        return None, f"'{doc.task}' is not one of our tasks; pass --task with one that is"
    try:
        tok = Tokenizer.load(model_dir)
    except SparseCircuitsError as err:
        return None, f"no tokenizer for the model ({err})"
    if tok.vocab_size > model.config.vocab_size:
        return None, f"tokenizer of {tok.vocab_size} tokens, model of {model.config.vocab_size}"
    return LoadedModel(spec, model_dir, model, tok, digest), None
