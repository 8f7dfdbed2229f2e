"""Faithfulness checks of a pruned circuit (Gao et al. 2025 section 4.1; Drori 2026).

Every check returns a dict with ``name``, ``passed`` (bool), ``criterion`` and ``summary`` (one
sentence with the numbers) plus its numbers. Losses are per-prompt mean two-token CE in nats on
the held-out test templates unless a key says otherwise (chance = ln 2 = 0.693). The checks and
their pass criteria:

1. ``sufficiency``: circuit loss <= target.
2. ``necessity``: only the circuit's nodes ablated in the full model: loss >= 0.6.
3. ``random_circuits``: the circuit beats every random node set of its size.
4. ``negative_controls``: each control task (constant / arbitrary / inverted targets) pruned with
   the same config misses the target or needs >= 2x the circuit's nodes.
5. ``random_init``: the same for the task on random weights with the same sparsity pattern.
6. ``ablation_kinds``: zero / pretrain-mean / task-mean ablation side by side (informational;
   passes if the circuit's own kind reaches the target).
7. ``frozen_norms``: circuit loss with norm factors frozen from the unpruned pass <= target.
8. ``mask_relaxation``: switching random pruned nodes back on moves the loss toward the full
   model: Spearman rho(fraction, |mean loss - full loss|) <= -0.8, or the curve stays within
   0.05 nats of the full model throughout (nothing to move toward).
9. ``seed_stability``: mean pairwise Jaccard overlap of >= 2 seeds' node sets >= 0.5.

A logit calibration stored with the circuit (pruning with ``calibrate``) is applied wherever the
circuit's node set is judged against the target (1, 6, 7), as pruning judged it; comparisons
between node sets (2, 3, 8) use raw logits, since the calibration was fitted to the circuit.
Checks 4, 5 and 9 prune again (``verify_tools.prune_task``: the pipeline's prune without the
circuit description, so they cost one mask training each); the rest are forward passes only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from typing import Any

import torch
import torch.nn.functional as F

from sparsecircuits.circuits.masking import Ablation
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.pipeline import LoadedModel, TaskData, ablation_values, task_data
from sparsecircuits.circuits.prune import CircuitEvaluator, PruneConfig, gates_for
from sparsecircuits.circuits.schema import CircuitDoc
from sparsecircuits.circuits.verify_tools import (
    CONTROL_KINDS,
    VerifyOptions,
    check_result,
    jaccard,
    missed_or_larger,
    prune_control,
    prune_task,
    random_ablation,
    random_init_model,
    spearman,
)
from sparsecircuits.errors import SparseCircuitsError

log = logging.getLogger(__name__)

NECESSITY_MIN_LOSS = 0.6  # nats per prompt; chance is ln 2 = 0.693
SIZE_RATIO = 2.0  # controls / random init must need this many times the circuit's nodes
MIN_JACCARD = 0.5  # mean pairwise overlap of the seeds' node sets
MAX_RHO = -0.8  # Spearman rho of the relaxation curve
FLAT_TOL = 0.05  # nats: a relaxation curve this close to the full model is flat, not wrong


@dataclass
class Context:
    """Everything the checks share: the circuit, its model, prompts, ablation and evaluator."""

    doc: CircuitDoc
    lm: LoadedModel
    cfg: PruneConfig  # the circuit's pruning config
    space: NodeSpace
    data: TaskData
    ablation: Ablation
    ev: CircuitEvaluator
    kept: torch.Tensor  # flat indices, ascending
    options: VerifyOptions

    @property
    def target(self) -> float:
        return self.doc.target_loss

    def measure(
        self, gates: torch.Tensor, *, ev: CircuitEvaluator | None = None, cal: bool = False
    ) -> tuple[float, float]:
        """(test loss in nats per prompt, accuracy) under hard ``gates`` (total,); ``cal``
        applies the circuit's stored logit calibration (if pruning fitted one)."""
        d = (ev or self.ev).diffs(self.data.test, gates)
        if cal and self.doc.calibration:
            c = self.doc.calibration
            d = c["scale"] * d + c["shift"] * self.data.test.signs.cpu()
        return float(F.softplus(-d).mean()), float((d > 0).float().mean())

    def loss(self, gates: torch.Tensor, *, ev: CircuitEvaluator | None = None) -> float:
        return self.measure(gates, ev=ev)[0]

    @cached_property
    def loss_full(self) -> float:
        """Test loss of the unpruned model."""
        return self.loss(torch.ones(self.space.total))

    @cached_property
    def circuit(self) -> tuple[float, float]:
        """(test loss, accuracy) of the circuit, raw logits."""
        return self.measure(gates_for(self.space, self.kept))

    @cached_property
    def circuit_cal(self) -> tuple[float, float]:
        """(test loss, accuracy) of the circuit as pruning judged it (with its calibration)."""
        return self.measure(gates_for(self.space, self.kept), cal=True)

    def prune_config(self, **changes: Any) -> PruneConfig:
        """The circuit's config (steps capped by the options) with ``changes``."""
        if self.options.prune_steps is not None:
            changes.setdefault("steps", min(self.cfg.steps, self.options.prune_steps))
        return self.cfg.replace(**changes) if changes else self.cfg


def build_context(doc: CircuitDoc, lm: LoadedModel, options: VerifyOptions) -> Context:
    """Rebuild the circuit's prompts, ablation and evaluator exactly as pruning did."""
    cfg = PruneConfig.from_dict(doc.prune_config, source="circuit prune_config")
    space = NodeSpace(lm.model.config, mask_embed=cfg.mask_embed)
    data = task_data(lm, doc.task, cfg)
    ablation = ablation_values(lm, space, cfg.ablation, data.train_batch)
    ev = CircuitEvaluator(lm.model, space=space, ablation=ablation, frozen_norms=cfg.frozen_norms)
    kept = torch.tensor(doc.kept_flat(space), dtype=torch.long)
    return Context(doc, lm, cfg, space, data, ablation, ev, kept, options)


# ----------------------------------------------------------------------------- checks
def check_sufficiency(ctx: Context) -> dict:
    """Circuit loss on the held-out test split (nats per prompt) <= target."""
    (loss, acc), raw, full = ctx.circuit_cal, ctx.circuit[0], ctx.loss_full
    note = f"; {raw:.3f} without its logit calibration" if ctx.doc.calibration else ""
    return check_result(
        "sufficiency",
        loss <= ctx.target,
        "circuit test loss <= target",
        f"circuit loss {loss:.3f} on {ctx.data.test.n_prompts} held-out prompts vs target "
        f"{ctx.target:.3f} (full model {full:.3f}; {len(ctx.kept)} nodes{note}).",
        loss=loss,
        loss_full=full,
        target=ctx.target,
        accuracy=acc,
        loss_stored=ctx.doc.loss.circuit_test,
        loss_raw=raw,
        n_nodes=len(ctx.kept),
    )


def check_necessity(ctx: Context) -> dict:
    """Only the circuit's nodes ablated in the full model: test loss >= NECESSITY_MIN_LOSS."""
    gates = torch.ones(ctx.space.total)
    gates[ctx.kept] = 0.0
    (loss, acc), full = ctx.measure(gates), ctx.loss_full
    return check_result(
        "necessity",
        loss >= NECESSITY_MIN_LOSS,
        f"test loss with only the circuit ablated >= {NECESSITY_MIN_LOSS} (chance 0.693)",
        f"ablating only the {len(ctx.kept)} circuit nodes in the full model gives loss "
        f"{loss:.3f} and accuracy {acc:.2f} (full model {full:.3f}; pass >= "
        f"{NECESSITY_MIN_LOSS}).",
        loss=loss,
        accuracy=acc,
        loss_full=full,
        threshold=NECESSITY_MIN_LOSS,
    )


def check_random_circuits(ctx: Context) -> dict:
    """The circuit beats every random node set of its size (test loss)."""
    k, total = len(ctx.kept), ctx.space.total
    gen = torch.Generator().manual_seed(ctx.options.seed)
    losses = [
        ctx.loss(gates_for(ctx.space, torch.randperm(total, generator=gen)[:k]))
        for _ in range(ctx.options.n_random)
    ]
    loss = ctx.circuit[0]
    pct = 100.0 * sum(x <= loss for x in losses) / len(losses)
    mean, lo = sum(losses) / len(losses), min(losses)
    return check_result(
        "random_circuits",
        loss < lo,
        "circuit loss < the lowest loss of the random node sets",
        f"circuit loss {loss:.3f} vs {len(losses)} random {k}-node sets: mean {mean:.3f}, "
        f"min {lo:.3f} ({pct:.0f}% of the random sets do as well or better).",
        loss=loss,
        n_random=len(losses),
        random_mean=mean,
        random_min=lo,
        random_max=max(losses),
        percentile=pct,
        random_losses=losses,
    )


def check_negative_controls(ctx: Context) -> dict:
    """Each control task needs >= SIZE_RATIO x the nodes, or misses the target."""
    cfg, n = ctx.prune_config(), ctx.doc.n_nodes
    runs: dict[str, dict[str, Any]] = {}
    for kind in CONTROL_KINDS:
        try:
            run = prune_control(ctx.lm, ctx.doc.task, kind, cfg)
        except SparseCircuitsError as err:  # e.g. control tokens that collide in this tokenizer
            runs[kind] = {"task": f"{ctx.doc.task}__{kind}", "error": str(err)}
            continue
        runs[kind] = {**run, "passed": missed_or_larger(run, n, ratio=SIZE_RATIO)}
    done = [r for r in runs.values() if "error" not in r]
    parts = [
        f"{k} {r['n_nodes']} nodes loss {r['loss']:.3f} ({'reached' if r['reached'] else 'missed'})"
        if "error" not in r
        else f"{k} not run ({r['error']})"
        for k, r in runs.items()
    ]
    return check_result(
        "negative_controls",
        bool(done) and all(r["passed"] for r in done),
        f"each control misses the target or needs >= {SIZE_RATIO:g}x the circuit's nodes",
        f"with the circuit's config ({n} nodes for the task): " + "; ".join(parts) + ".",
        n_nodes_task=n,
        controls=runs,
        prune_steps=cfg.steps,
    )


def check_random_init(ctx: Context) -> dict:
    """The task on random weights (same sparsity) needs >= SIZE_RATIO x the nodes, or misses."""
    cfg, n = ctx.prune_config(), ctx.doc.n_nodes
    rlm = random_init_model(ctx.lm, seed=ctx.options.seed)
    space = NodeSpace(rlm.model.config, mask_embed=cfg.mask_embed)
    ablation = random_ablation(rlm, space, cfg, ctx.doc.task)
    run = prune_task(rlm, ctx.doc.task, cfg, ablation=ablation)
    run.pop("kept")
    verdict = "reached" if run["reached"] else "missed"
    return check_result(
        "random_init",
        missed_or_larger(run, n, ratio=SIZE_RATIO),
        f"the re-initialised model's circuit misses the target or has >= {SIZE_RATIO:g}x nodes",
        f"randomly re-initialised weights (same sparsity pattern): full-model loss "
        f"{run['loss_full']:.3f}, circuit {run['n_nodes']} nodes with loss {run['loss']:.3f} "
        f"({verdict} target {cfg.target_loss:.3f}) vs {n} nodes in the trained model.",
        n_nodes_task=n,
        random_model_hash=rlm.hash,
        prune_steps=cfg.steps,
        **run,
    )


def check_ablation_kinds(ctx: Context) -> dict:
    """Test loss under zero, pretrain-mean and task-mean ablation (same nodes)."""
    gates = gates_for(ctx.space, ctx.kept)
    losses: dict[str, float] = {}
    for kind in ("zero", "mean", "task_mean"):
        if kind == ctx.cfg.ablation:
            losses[kind] = ctx.circuit_cal[0]
            continue
        ablation = ablation_values(ctx.lm, ctx.space, kind, ctx.data.train_batch)
        ev = CircuitEvaluator(
            ctx.lm.model, space=ctx.space, ablation=ablation, frozen_norms=ctx.cfg.frozen_norms
        )
        losses[kind] = ctx.measure(gates, ev=ev, cal=True)[0]
    own = losses[ctx.cfg.ablation]
    parts = ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
    return check_result(
        "ablation_kinds",
        own <= ctx.target,
        "informational; passes if the circuit's own ablation kind reaches the target",
        f"circuit test loss by ablation kind: {parts} (pruned with {ctx.cfg.ablation}; target "
        f"{ctx.target:.3f}).",
        losses=losses,
        own_kind=ctx.cfg.ablation,
        target=ctx.target,
    )


def check_frozen_norms(ctx: Context) -> dict:
    """Test loss with norm factors from the unpruned pass <= target."""
    gates = gates_for(ctx.space, ctx.kept)
    ev = CircuitEvaluator(ctx.lm.model, space=ctx.space, ablation=ctx.ablation, frozen_norms=True)
    frozen, live = ctx.measure(gates, ev=ev, cal=True)[0], ctx.circuit_cal[0]
    note = " (pruned with frozen norms already)" if ctx.cfg.frozen_norms else ""
    return check_result(
        "frozen_norms",
        frozen <= ctx.target,
        "circuit test loss with frozen norms <= target",
        f"with norm factors frozen from the unpruned pass the circuit's loss is {frozen:.3f} "
        f"vs {live:.3f} as pruned{note} (target {ctx.target:.3f}).",
        loss=frozen,
        loss_as_pruned=live,
        target=ctx.target,
    )


def check_mask_relaxation(ctx: Context) -> dict:
    """Random pruned nodes back on: the loss moves toward the full model's."""
    opts = ctx.options
    pruned = torch.ones(ctx.space.total, dtype=torch.bool)
    pruned[ctx.kept] = False
    off = pruned.nonzero().squeeze(1)
    full = ctx.loss_full
    gen = torch.Generator().manual_seed(opts.seed)
    curve = []
    for frac in opts.relax_fractions:
        losses = []
        for _ in range(opts.relax_seeds):
            n_on = round(frac * len(off))
            if n_on in (0, len(off)):  # the circuit itself / the full model: no randomness
                losses.append(ctx.circuit[0] if n_on == 0 else full)
                continue
            on = off[torch.randperm(len(off), generator=gen)[:n_on]]
            losses.append(ctx.loss(gates_for(ctx.space, torch.cat([ctx.kept, on]))))
        curve.append({"fraction": frac, "loss": sum(losses) / len(losses), "losses": losses})
    dist = [abs(p["loss"] - full) for p in curve]
    rho = spearman(list(opts.relax_fractions), dist)
    flat = max(dist) <= FLAT_TOL
    rise = max(p["loss"] for p in curve) - max(curve[0]["loss"], full)
    shown = " ".join(f"{p['fraction']:g}:{p['loss']:.3f}" for p in curve)
    return check_result(
        "mask_relaxation",
        flat or (not math.isnan(rho) and rho <= MAX_RHO),
        f"Spearman rho(fraction, |loss - full loss|) <= {MAX_RHO}, or the curve stays within "
        f"{FLAT_TOL} nats of the full model",
        f"switching random pruned nodes back on (fraction:loss {shown}; full model {full:.3f}) "
        f"gives Spearman rho {rho:.2f} between fraction and distance to the full model"
        + (f"; the curve stays within {FLAT_TOL} nats of the full model (flat)" if flat else "")
        + f"; it rises at most {max(rise, 0.0):.3f} above its endpoints.",
        rho=rho,
        flat=flat,
        loss_full=full,
        max_rise=rise,
        curve=curve,
    )


def check_seed_stability(ctx: Context) -> dict:
    """Node-set overlap (Jaccard) across pruning seeds, the circuit's own first."""
    opts = ctx.options
    doc = ctx.doc
    runs = [{"seed": ctx.cfg.seed, "n_nodes": len(ctx.kept), "reached": doc.reached,
             "loss": doc.loss.circuit, "loss_test": doc.loss.circuit_test,
             "kept": ctx.kept.tolist(), "source": "circuit"}]  # fmt: skip
    for s in range(ctx.cfg.seed + 1, ctx.cfg.seed + opts.seeds):
        run = prune_task(ctx.lm, ctx.doc.task, ctx.prune_config(seed=s))
        runs.append({"seed": s, **run, "source": "re-pruned"})
    sets = [set(r.pop("kept")) for r in runs]
    pairs = [jaccard(a, b) for a, b in combinations(sets, 2)]
    mean = sum(pairs) / len(pairs)
    sizes = ", ".join(str(r["n_nodes"]) for r in runs)
    return check_result(
        "seed_stability",
        mean >= MIN_JACCARD,
        f"mean pairwise Jaccard overlap of the seeds' node sets >= {MIN_JACCARD}",
        f"{len(runs)} pruning seeds give {sizes} nodes; pairwise Jaccard overlap mean "
        f"{mean:.2f}, min {min(pairs):.2f} (pass >= {MIN_JACCARD}).",
        jaccard_mean=mean,
        jaccard_min=min(pairs),
        jaccard=pairs,
        runs=runs,
    )


CHECK_FNS: dict[str, Callable[[Context], dict]] = {
    "sufficiency": check_sufficiency,
    "necessity": check_necessity,
    "random_circuits": check_random_circuits,
    "negative_controls": check_negative_controls,
    "random_init": check_random_init,
    "ablation_kinds": check_ablation_kinds,
    "frozen_norms": check_frozen_norms,
    "mask_relaxation": check_mask_relaxation,
    "seed_stability": check_seed_stability,
}
CHECKS: tuple[str, ...] = tuple(CHECK_FNS)  # in report order


def run_checks(ctx: Context, names: Sequence[str] | None = None) -> list[dict]:
    """Run the named checks (default: all, in report order); each result gets its wall time in
    ``seconds``."""
    out = []
    for name in names or CHECKS:
        start = time.perf_counter()
        result = CHECK_FNS[name](ctx)
        result["seconds"] = round(time.perf_counter() - start, 2)
        verdict = "PASS" if result["passed"] else "FAIL"
        log.info("%s: %s (%.1f s) %s", name, verdict, result["seconds"], result["summary"])
        out.append(result)
    return out
