"""Find one task's circuit end to end: load, build prompts and ablation values, prune, measure,
and describe it as a :class:`~sparsecircuits.circuits.schema.CircuitDoc`."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from sparsecircuits import tasks
from sparsecircuits.circuits.edges import WEIGHT_KINDS, edge_set
from sparsecircuits.circuits.masking import Ablation
from sparsecircuits.circuits.means import activation_means, load_or_compute_means, zero_values
from sparsecircuits.circuits.nodes import LAYER_LOCATIONS, NodeSpace
from sparsecircuits.circuits.prompts import PromptSet
from sparsecircuits.circuits.prune import (
    CircuitEvaluator,
    PruneConfig,
    PruneResult,
    gates_for,
    prune,
)
from sparsecircuits.circuits.schema import (
    EDGES_FILE,
    CircuitDoc,
    LayerDelta,
    Losses,
    ModelRef,
    edge_record,
    node_record,
)
from sparsecircuits.circuits.search import Trial, search
from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.errors import InputError
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import load_model, resolve_model_dir, weights_hash
from sparsecircuits.tasks.batch import TaskBatch
from sparsecircuits.tasks.metrics import calibrated, diff_accuracy, diff_loss, pad_prompts

log = logging.getLogger(__name__)

PROBE_PAIRS = 16  # pairs used for per-node / per-layer ablation deltas
MAX_EXACT_DELTAS = 64  # larger circuits get linear (gradient) per-node deltas
EDGES_INLINE = 50_000  # more edges (dense-model circuits) go to edges.safetensors


@dataclass
class LoadedModel:
    spec: str
    directory: Path
    model: GPT
    tokenizer: Tokenizer
    hash: str


def load_for_circuits(spec: str, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Model, tokenizer and weights hash of a model directory, run or shipped name."""
    directory = resolve_model_dir(spec)
    model = load_model(directory, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(str(spec), directory, model, Tokenizer.load(directory), weights_hash(model))


def ablation_values(lm: LoadedModel, space: NodeSpace, kind: str, train: TaskBatch) -> Ablation:
    """Ablation values of ``kind``: pretraining means, zeros, or means over the task's train
    prompts (every real position)."""
    if kind == "zero":
        return Ablation("zero", zero_values(space))
    if kind == "task_mean":
        idx, lengths = pad_prompts([*train.prompts_a, *train.prompts_b])
        dev = next(lm.model.parameters()).device
        values = activation_means(lm.model, idx.to(dev), space=space, lengths=lengths)
        return Ablation("task_mean", values)
    values = load_or_compute_means(
        lm.model, lm.tokenizer, model_hash=lm.hash, model_dir=lm.directory
    )
    return Ablation("mean", values)


@dataclass
class TaskData:
    train_batch: TaskBatch
    train: PromptSet  # minibatches for mask training
    judge: PromptSet  # the same pairs packed by length, for bisection and reporting
    test: PromptSet  # held-out templates
    probe: PromptSet  # the first PROBE_PAIRS train pairs: per-node and per-layer deltas
    test_batch: TaskBatch  # the held-out pairs themselves (interchange needs the pairing)


def task_data(lm: LoadedModel, task: str, cfg: PruneConfig) -> TaskData:
    t = tasks.get(task)
    dev = next(lm.model.parameters()).device
    max_len = lm.model.config.block_size
    tb = t.build(lm.tokenizer, split="train", n=cfg.n_train_pairs, seed=cfg.seed, max_len=max_len)
    hb = t.build(lm.tokenizer, split="test", n=cfg.n_test_pairs, seed=cfg.seed, max_len=max_len)
    return TaskData(
        tb,
        PromptSet(tb, chunk_size=2 * cfg.batch_pairs, shuffle_seed=cfg.seed, device=dev),
        PromptSet(tb, chunk_size=32, device=dev),
        PromptSet(hb, chunk_size=32, device=dev),
        PromptSet(tb.head(PROBE_PAIRS), chunk_size=32, device=dev),
        hb,
    )


def node_deltas(
    ev: CircuitEvaluator, prompts: PromptSet, kept: torch.Tensor, base: float
) -> tuple[list[float], str]:
    """Loss change when each kept node alone is ablated from the circuit: exact for small
    circuits, else the linear estimate ``-dL/dg_i`` at the circuit's gates."""
    space = ev.space
    gates = gates_for(space, kept)
    if len(kept) <= MAX_EXACT_DELTAS:
        out = []
        for i in kept.tolist():
            g = gates.clone()
            g[i] = 0.0
            out.append(ev.loss(prompts, g)[0] - base)
        return out, "exact"
    dev = next(ev.model.parameters()).device
    g = gates.to(dev).requires_grad_(True)
    loss = prompts.loss(ev.logits_fn(g, skip_full=False))
    (grad,) = torch.autograd.grad(loss, g)
    return (-grad.cpu()[kept]).tolist(), "linear"


def layer_deltas(
    ev: CircuitEvaluator, prompts: PromptSet, kept: torch.Tensor, base: float
) -> list[LayerDelta]:
    """Per layer and block (attention / MLP), the loss change when all of that block's circuit
    nodes are ablated at once."""
    space = ev.space
    out = []
    for layer in range(space.config.n_layer):
        for block, locs in (("attn", LAYER_LOCATIONS[:5]), ("mlp", LAYER_LOCATIONS[5:])):
            sel = []
            for loc in locs:
                g = space.group(layer, loc)
                sel.append(kept[(kept >= g.offset) & (kept < g.offset + g.size)])
            drop = torch.cat(sel)
            delta = 0.0
            if drop.numel():
                gates = gates_for(space, kept)
                gates[drop] = 0.0
                delta = ev.loss(prompts, gates)[0] - base
            out.append(LayerDelta(layer=layer, block=block, n_nodes=int(drop.numel()), delta=delta))
    return out


def find_circuit(
    lm: LoadedModel,
    task: str,
    cfg: PruneConfig,
    *,
    trials: int = 1,
    budget_s: float = math.inf,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[CircuitDoc, PruneResult, list[Trial]]:
    """Prune ``task`` on ``lm`` with ``cfg`` (or the best of ``trials`` configs around it within
    ``budget_s`` seconds); returns the circuit document, the raw result and the trials."""
    if trials < 1:
        raise InputError(f"search trials must be >= 1, got {trials}")
    space = NodeSpace(lm.model.config, mask_embed=cfg.mask_embed)
    data = task_data(lm, task, cfg)
    ablation = ablation_values(lm, space, cfg.ablation, data.train_batch)
    ev = CircuitEvaluator(lm.model, space=space, ablation=ablation, frozen_norms=cfg.frozen_norms)

    def run(c: PruneConfig) -> PruneResult:
        return prune(ev, data.train, data.judge, c, on_step=on_step)

    if trials == 1:
        result = run(cfg)
        history = [Trial(cfg, result.k, result.loss_circuit, result.reached, result.seconds)]
    else:
        result, history = search(run, cfg, trials=trials, budget_s=budget_s)
    doc = describe(lm, task, result.config, ev, data, result)
    return doc, result, history


def describe(
    lm: LoadedModel,
    task: str,
    cfg: PruneConfig,
    ev: CircuitEvaluator,
    data: TaskData,
    result: PruneResult,
) -> CircuitDoc:
    """Measure a pruning result (test loss, deltas, edges) into a circuit document.

    Circuit losses use the calibration found by pruning (if any); per-node and per-layer
    deltas are measured on ``data.probe`` (a subset of the train pairs) to stay cheap."""
    space, model = ev.space, lm.model
    kept = result.kept
    gates, ones = gates_for(space, kept), torch.ones(space.total)

    def stats(prompts: PromptSet, g: torch.Tensor, *, cal: bool) -> tuple[float, float]:
        d = ev.diffs(prompts, g)
        if cal:
            d = calibrated(d, prompts.signs.cpu(), result.calibration)
        return diff_loss(d), diff_accuracy(d)

    full_train = stats(data.judge, ones, cal=False)
    circ_train = stats(data.judge, gates, cal=True)
    full_test = stats(data.test, ones, cal=False)
    circ_test = stats(data.test, gates, cal=True)
    probe_base = ev.loss(data.probe, gates)[0]
    deltas, method = node_deltas(ev, data.probe, kept, probe_base)
    tau = result.tau
    nodes = [
        node_record(space.node(i), d_head=model.config.d_head, tau=float(tau[i]), delta=d)
        for i, d in zip(kept.tolist(), deltas, strict=True)
    ]
    edges = edge_set(model, space, kept)
    result.edges = edges  # a large set is written beside circuit.json (report.py)
    inline = len(edges) <= EDGES_INLINE
    by_kind = edges.count_by_kind()
    by_loc: dict[str, int] = {}
    for n in nodes:
        by_loc[n.loc.value] = by_loc.get(n.loc.value, 0) + 1
    c = model.config
    return CircuitDoc(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=ModelRef(
            id=lm.spec,
            weights_hash=lm.hash,
            n_layer=c.n_layer,
            d_model=c.d_model,
            n_head=c.n_head,
            d_head=c.d_head,
            d_mlp=c.mlp_width,
            d_pos_emb=c.d_pos_emb,
        ),
        task=task,
        split="train",
        n_pairs=cfg.n_train_pairs,
        n_test_pairs=cfg.n_test_pairs,
        seed=cfg.seed,
        ablation=cfg.ablation,
        mask_embed=cfg.mask_embed,
        frozen_norms=cfg.frozen_norms,
        target_loss=cfg.target_loss,
        reached=result.reached,
        calibration=(result.calibration._asdict() if result.calibration else None),
        prune_config=cfg.model_dump(mode="json"),
        total_nodes=space.total,
        n_nodes=len(nodes),
        n_edges=len(edges),
        n_weight_edges=sum(by_kind[k] for k in WEIGHT_KINDS),
        n_nodes_by_location=by_loc,
        n_edges_by_kind=by_kind,
        loss=Losses(
            full=full_train[0],
            circuit=circ_train[0],
            circuit_test=circ_test[0],
            full_test=full_test[0],
        ),
        accuracy={
            "full": full_train[1],
            "circuit": circ_train[1],
            "full_test": full_test[1],
            "circuit_test": circ_test[1],
        },
        delta_method=method,
        nodes=nodes,
        edges=[edge_record(e) for e in edges.edges(space)] if inline else [],
        edges_file=None if inline else EDGES_FILE,
        layer_deltas=layer_deltas(ev, data.probe, kept, probe_base),
        pruning_curve=result.curve,
        k_curve=[{"k": float(k), "loss": v} for k, v in result.k_curve],
        seconds=result.seconds,
    )
