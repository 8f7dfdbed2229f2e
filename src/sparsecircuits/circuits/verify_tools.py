"""Building blocks of the faithfulness checks (``verify.py``): their options, random node sets
matched to a circuit, re-pruning a task, negative control tasks, and a randomly re-initialised
model with the same sparsity pattern (decision rules and statistics: ``verdicts.py``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsecircuits import tasks
from sparsecircuits.circuits.masking import Ablation
from sparsecircuits.circuits.means import activation_means, pretrain_windows, zero_values
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.pipeline import LoadedModel, ablation_values, task_data
from sparsecircuits.circuits.prune import CircuitEvaluator, PruneConfig, gates_for, prune
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import weights_hash
from sparsecircuits.model.layers import LayerNorm

CONTROL_KINDS = ("constant", "arbitrary", "inverted")
# Tensors the random-init control keeps as trained: corpus statistics, not learned weights.
KEPT_IN_RANDOM_INIT = ("bigram_table",)


@dataclass(frozen=True)
class VerifyOptions:
    """How much work the checks do. ``prune_steps`` caps the re-prunes' mask-training steps
    (None: the circuit's own config, as the acceptance budget assumes)."""

    n_random: int = 20  # random node sets of the circuit's size
    seeds: int = 5  # pruning seeds, the circuit's own included
    relax_fractions: tuple[float, ...] = tuple(i / 10 for i in range(11))
    relax_seeds: int = 3
    prune_steps: int | None = None
    seed: int = 0  # random node sets, relaxation draws and the random re-initialisation
    quick: bool = False  # smoke-test settings (see :meth:`quick_mode`)

    @classmethod
    def quick_mode(cls, *, seeds: int = 2) -> VerifyOptions:
        """A smoke-test setting: 20 random sets, 5 relaxation points x 2, <= 20 prune steps."""
        return cls(
            n_random=20,
            seeds=seeds,
            relax_fractions=(0.0, 0.25, 0.5, 0.75, 1.0),
            relax_seeds=2,
            prune_steps=20,
            quick=True,
        )


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm | nn.LayerNorm | LayerNorm)


@torch.no_grad()
def randomize_weights(model: GPT, *, seed: int = 0) -> GPT:
    """A copy of ``model`` with random weights on exactly the same sparsity pattern.

    Every floating parameter and buffer keeps its zeros; its nonzero entries are redrawn from
    N(0, s^2), s = the RMS of that tensor's nonzero values (its std for zero-mean weights, and
    defined for a single entry). This covers weights, embeddings, biases and sink logits. Two
    exceptions: norm gains and biases are reset to their initial 1 and 0 (a random
    sign-flipping gain is no network one would train), and the fixed **bigram table is kept**:
    it is a corpus statistic, not learned weights, and it lies outside the node space, so
    redrawing it would make the control miss for a reason unrelated to circuits. Seeded: the
    same ``seed`` gives the same weights.
    """
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    norm_params = {id(p) for m in out.modules() if _is_norm(m) for p in m.parameters()}
    for name, t in [*out.named_parameters(), *out.named_buffers()]:
        if not t.is_floating_point() or name in KEPT_IN_RANDOM_INIT:
            continue
        if id(t) in norm_params:
            t.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        nz = t != 0
        count = int(nz.sum())
        if count == 0:
            continue
        scale = t[nz].double().pow(2).mean().sqrt()
        new = torch.randn(count, generator=gen, dtype=torch.float64) * scale
        t[nz] = new.to(device=t.device, dtype=t.dtype)
    return out.eval()


def matched_random_sets(
    space: NodeSpace, kept: torch.Tensor, *, n: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """``n`` random node sets with the circuit's own (layer, location) histogram: for every
    group, as many nodes drawn uniformly from that group as the circuit has there. Flat
    indices, ascending."""
    counts = [
        (g, int(((kept >= g.offset) & (kept < g.offset + g.size)).sum())) for g in space.groups
    ]
    out = []
    for _ in range(n):
        parts = [g.offset + torch.randperm(g.size, generator=gen)[:c] for g, c in counts if c]
        out.append(torch.cat(parts).sort().values if parts else kept.new_empty(0))
    return out


def swapped_sets(
    space: NodeSpace, kept: torch.Tensor, *, k: int, n: int, gen: torch.Generator
) -> list[torch.Tensor]:
    """``n`` copies of the circuit with ``k`` random nodes swapped, each for a random node of
    the same (layer, location) group outside the circuit (a node with no such replacement is
    left in place). Flat indices, ascending."""
    inside = torch.zeros(space.total, dtype=torch.bool)
    inside[kept] = True
    out = []
    for _ in range(n):
        nodes = kept.clone()
        for pos in torch.randperm(len(kept), generator=gen)[:k].tolist():
            g = next(g for g in space.groups if g.offset <= int(nodes[pos]) < g.offset + g.size)
            free = (~inside[g.offset : g.offset + g.size]).nonzero().squeeze(1) + g.offset
            free = free[~torch.isin(free, nodes)]
            if len(free):
                nodes[pos] = free[torch.randint(len(free), (1,), generator=gen)]
        out.append(nodes.sort().values)
    return out


def prune_task(
    lm: LoadedModel, task: str, cfg: PruneConfig, *, ablation: Ablation | None = None
) -> dict[str, Any]:
    """Prune registered ``task`` on ``lm`` as ``pipeline.find_circuit`` does (same prompts,
    ablation and config; ``ablation`` overrides the values) but without describing the
    circuit. Returns n_nodes, reached, loss (train), loss_test, loss_full, kept, seconds."""
    space = NodeSpace(lm.model.config, mask_embed=cfg.mask_embed)
    data = task_data(lm, task, cfg)
    if ablation is None:
        ablation = ablation_values(lm, space, cfg.ablation, data.train_batch)
    ev = CircuitEvaluator(lm.model, space=space, ablation=ablation, frozen_norms=cfg.frozen_norms)
    result = prune(ev, data.train, data.judge, cfg)
    return {
        "n_nodes": result.k,
        "reached": result.reached,
        "loss": result.loss_circuit,
        "loss_test": ev.loss(data.test, gates_for(space, result.kept))[0],
        "loss_full": result.loss_full,
        "kept": result.kept.tolist(),
        "seconds": round(result.seconds, 2),
    }


def control_task(base: str, kind: str) -> tasks.Task:
    """The ``kind`` control of task ``base``: the registered ``<base>__<kind>`` if there is
    one, else built with the tasks package's default tokens (not registered)."""
    name = f"{base}__{kind}"
    if name in tasks.names(include_controls=True):
        return tasks.get(name)
    make = {
        "constant": tasks.constant_target,
        "arbitrary": tasks.arbitrary_mapping,
        "inverted": tasks.inverted,
    }[kind]
    return make(tasks.get(base), name=name)


def prune_control(lm: LoadedModel, base: str, kind: str, cfg: PruneConfig) -> dict[str, Any]:
    """:func:`prune_task` on the ``kind`` control of ``base`` (registered for the duration if
    it is not already). Returns the run without its node list, plus ``task``."""
    task = control_task(base, kind)
    registered = task.name in tasks.names(include_controls=True)
    if not registered:
        tasks.register(task)
    try:
        run = prune_task(lm, task.name, cfg)
    finally:
        if not registered:
            tasks.unregister(task.name)
    run.pop("kept")
    return {"task": task.name, **run}


def random_init_model(lm: LoadedModel, *, seed: int) -> LoadedModel:
    """``lm`` with :func:`randomize_weights` applied (same tokenizer, its own hash)."""
    model = randomize_weights(lm.model, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    spec = f"{lm.spec} (random init, seed {seed})"
    return LoadedModel(spec, lm.directory, model, lm.tokenizer, weights_hash(model))


def random_ablation(rlm: LoadedModel, space: NodeSpace, cfg: PruneConfig, task: str) -> Ablation:
    """Ablation values of ``cfg.ablation`` recomputed for the random model (pretraining means
    over 16 held-out windows, never cached; task means over its train prompts)."""
    if cfg.ablation == "zero":
        return Ablation("zero", zero_values(space))
    if cfg.ablation == "task_mean":
        return ablation_values(rlm, space, "task_mean", task_data(rlm, task, cfg).train_batch)
    model = rlm.model
    windows = pretrain_windows(rlm.tokenizer, n_windows=16, length=model.config.block_size)
    dev = next(model.parameters()).device
    return Ablation("mean", activation_means(model, windows.to(dev), space=space))
