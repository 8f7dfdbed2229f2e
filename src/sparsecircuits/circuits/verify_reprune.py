"""The faithfulness checks that prune again (one mask training each): negative control tasks,
the task on randomly re-initialised weights, and pruning-seed stability (see ``verify.py``)."""

from __future__ import annotations

from itertools import combinations
from typing import Any

from sparsecircuits.circuits import verdicts as V
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.verify import Context
from sparsecircuits.circuits.verify_tools import (
    CONTROL_KINDS,
    KEPT_IN_RANDOM_INIT,
    prune_control,
    prune_task,
    random_ablation,
    random_init_model,
)
from sparsecircuits.errors import SparseCircuitsError


def _larger(run: dict[str, Any], n: int) -> bool:
    return V.missed_or_larger(run["reached"], run["n_nodes"], n, ratio=V.SIZE_RATIO)


def reference_size(ctx: Context) -> tuple[int, str]:
    """The node count a control is measured against, and where it came from: the task itself
    re-pruned with exactly the controls' settings (same step cap), so that neither a padded
    circuit file nor fewer re-pruning steps makes a control look relatively small; the file's
    own count if that re-prune misses the target. Cached on the context."""
    if ctx.reference is None:
        ctx.reference = prune_task(ctx.lm, ctx.doc.task, ctx.prune_config())
        ctx.reference.pop("kept")
    ref = ctx.reference
    if ref["reached"]:
        return ref["n_nodes"], f"the task re-pruned with the same settings: {ref['n_nodes']} nodes"
    return ctx.doc.n_nodes, f"the circuit file: {ctx.doc.n_nodes} nodes (the re-prune missed)"


def check_negative_controls(ctx: Context) -> dict:
    """Each control task needs >= SIZE_RATIO x the task's nodes, or misses the target."""
    cfg, (n, source) = ctx.prune_config(), reference_size(ctx)
    runs: dict[str, dict[str, Any]] = {}
    for kind in CONTROL_KINDS:
        try:
            run = prune_control(ctx.lm, ctx.doc.task, kind, cfg)
        except SparseCircuitsError as err:  # e.g. control tokens that collide in this tokenizer
            runs[kind] = {"task": f"{ctx.doc.task}__{kind}", "error": str(err)}
            continue
        runs[kind] = {**run, "passed": _larger(run, n)}
    done = [r for r in runs.values() if "error" not in r]
    parts = [
        f"{k} {r['n_nodes']} nodes loss {r['loss']:.3f} ({'reached' if r['reached'] else 'missed'})"
        if "error" not in r
        else f"{k} not run ({r['error']})"
        for k, r in runs.items()
    ]
    verdict = V.verdict(all(r["passed"] for r in done)) if done else "N/A"
    return V.check_result(
        "negative_controls",
        verdict,
        f"each control misses the target or needs >= {V.SIZE_RATIO:g}x the circuit's nodes",
        f"with the circuit's config (reference: {source}): " + "; ".join(parts) + ".",
        n_nodes_task=n,
        reference=ctx.reference,
        controls=runs,
        prune_steps=cfg.steps,
    )


def check_random_init(ctx: Context) -> dict:
    """The task on random weights (same sparsity, corpus statistics kept) needs >= SIZE_RATIO x
    the task's nodes, or misses."""
    cfg, (n, source) = ctx.prune_config(), reference_size(ctx)
    rlm = random_init_model(ctx.lm, seed=ctx.options.seed)
    space = NodeSpace(rlm.model.config, mask_embed=cfg.mask_embed)
    ablation = random_ablation(rlm, space, cfg, ctx.doc.task)
    run = prune_task(rlm, ctx.doc.task, cfg, ablation=ablation)
    run.pop("kept")
    kept = [k for k in KEPT_IN_RANDOM_INIT if getattr(rlm.model, k, None) is not None]
    keeps = f"; kept as trained: {', '.join(kept)}" if kept else ""
    return V.check_result(
        "random_init",
        V.verdict(_larger(run, n)),
        f"the re-initialised model's circuit misses the target or has >= {V.SIZE_RATIO:g}x nodes",
        f"randomly re-initialised weights (same sparsity pattern{keeps}; ablation values "
        f"recomputed): full-model loss {run['loss_full']:.3f}, circuit {run['n_nodes']} nodes "
        f"with loss {run['loss']:.3f} ({'reached' if run['reached'] else 'missed'} target "
        f"{cfg.target_loss:.3f}) vs the trained model's reference, {source}.",
        n_nodes_task=n,
        reference=ctx.reference,
        random_model_hash=rlm.hash,
        kept_as_trained=kept,
        prune_steps=cfg.steps,
        **run,
    )


def check_seed_stability(ctx: Context) -> dict:
    """Node-set overlap (Jaccard) across pruning seeds, the circuit's own first."""
    doc = ctx.doc
    runs = [{"seed": ctx.cfg.seed, "n_nodes": len(ctx.kept), "reached": doc.reached,
             "loss": doc.loss.circuit, "loss_test": doc.loss.circuit_test,
             "kept": ctx.kept.tolist(), "source": "circuit"}]  # fmt: skip
    for s in range(ctx.cfg.seed + 1, ctx.cfg.seed + ctx.options.seeds):
        run = prune_task(ctx.lm, doc.task, ctx.prune_config(seed=s))
        runs.append({"seed": s, **run, "source": "re-pruned"})
    sets = [set(r.pop("kept")) for r in runs]
    pairs = [V.jaccard(a, b) for a, b in combinations(sets, 2)]
    mean = sum(pairs) / len(pairs)
    sizes = ", ".join(str(r["n_nodes"]) for r in runs)
    return V.check_result(
        "seed_stability",
        V.verdict(V.stable(mean)),
        f"mean pairwise Jaccard overlap of the seeds' node sets >= {V.MIN_JACCARD}",
        f"{len(runs)} pruning seeds give {sizes} nodes; pairwise Jaccard overlap mean "
        f"{mean:.2f}, min {min(pairs):.2f} (pass >= {V.MIN_JACCARD}).",
        jaccard_mean=mean,
        jaccard_min=min(pairs),
        jaccard=pairs,
        runs=runs,
    )
