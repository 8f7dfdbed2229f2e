"""Faithfulness checks of a pruned circuit (Gao et al. 2025 section 4.1; Drori 2026).

Every check returns a record (``verdicts.check_result``) with a verdict (PASS / FAIL / N/A /
INFO), its criterion, a one-sentence summary with the numbers, the numbers themselves, and,
where the verdict rests on a mean over prompts, a 95% bootstrap interval over the held-out
pairs (``uncertain`` when it straddles the threshold). Losses are per-prompt two-token CE in
nats on the held-out test templates (chance ln 2 = 0.693). The checks, in report order:

1. ``sufficiency``: circuit loss <= target.
2. ``necessity``: only the circuit ablated in the full model removes >= half of the full
   model's margin over chance (N/A unless the circuit reached the target on held-out templates
   and the model does the task).
3. ``random_circuits``: the circuit beats every random node set with its own (layer, location)
   histogram.
4. ``swap_null``: the circuit beats >= 95% of copies of itself with 10% of its nodes swapped for
   random nodes of the same group.
5. ``interchange``: patching the circuit's node values from prompt B into prompt A makes A's
   output follow B's answer for >= 80% of held-out prompts (``interchange.py``).
6. ``negative_controls``, 7. ``random_init``, 11. ``seed_stability``: re-pruning checks
   (``verify_reprune.py``); 6 and 7 compare with the task re-pruned under the same settings.
8. ``ablation_kinds``: zero / pretrain-mean / task-mean ablation side by side (INFO).
9. ``frozen_norms``: circuit loss with norm factors frozen from the unpruned pass <= target
   (N/A for a circuit pruned with frozen norms).
10. ``mask_relaxation``: switching random pruned nodes back on moves the loss toward the full
    model without a bump (``verdicts.relaxation_ok``).

A logit calibration stored with the circuit (pruning with ``calibrate``; its scale is fitted
positive) is applied wherever the circuit's node set is judged against the target (1, 8, 9), as
pruning judged it; comparisons between node sets use raw logits. Every report says whether a
calibration was used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from sparsecircuits.circuits import verdicts as V
from sparsecircuits.circuits.masking import Ablation
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.pipeline import LoadedModel, TaskData, ablation_values, task_data
from sparsecircuits.circuits.prune import CircuitEvaluator, PruneConfig, gates_for
from sparsecircuits.circuits.schema import CircuitDoc
from sparsecircuits.circuits.verify_tools import VerifyOptions
from sparsecircuits.tasks.metrics import Calibration, calibrated, diff_losses

log = logging.getLogger(__name__)


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
    reference: dict[str, Any] | None = None  # the task re-pruned as the controls are

    @property
    def target(self) -> float:
        return self.doc.target_loss

    @property
    def calibration(self) -> Calibration | None:
        c = self.doc.calibration
        return Calibration(c.scale, c.shift) if c else None

    def losses(
        self, gates: torch.Tensor, *, ev: CircuitEvaluator | None = None, cal: bool = False
    ) -> torch.Tensor:
        """Per-prompt test losses (n_prompts,) under hard ``gates`` (total,); ``cal`` applies
        the circuit's stored logit calibration (if pruning fitted one)."""
        d = (ev or self.ev).diffs(self.data.test, gates)
        if cal:
            d = calibrated(d, self.data.test.signs.cpu(), self.calibration)
        return diff_losses(d)

    def loss(self, gates: torch.Tensor, *, ev: CircuitEvaluator | None = None) -> float:
        return float(self.losses(gates, ev=ev).mean())

    @cached_property
    def full(self) -> torch.Tensor:
        """Per-prompt test losses of the unpruned model."""
        return self.losses(torch.ones(self.space.total))

    @property
    def loss_full(self) -> float:
        return float(self.full.mean())

    @cached_property
    def circuit(self) -> torch.Tensor:
        """Per-prompt test losses of the circuit, raw logits."""
        return self.losses(gates_for(self.space, self.kept))

    @cached_property
    def circuit_cal(self) -> torch.Tensor:
        """Per-prompt test losses of the circuit as pruning judged it (with its calibration)."""
        return self.losses(gates_for(self.space, self.kept), cal=True)

    @property
    def reached_test(self) -> bool:
        return V.sufficient(float(self.circuit_cal.mean()), self.target)

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


def prompt_interval(values: torch.Tensor, ctx: Context) -> tuple[float, float]:
    """95% bootstrap interval of the mean of per-prompt ``values`` (test prompts, chunk
    order), resampling whole pairs: a pair's A and B prompts share their slot fills."""
    return V.mean_interval(ctx.data.test.pair_means(values), seed=ctx.options.seed)


def fmt(ci: tuple[float, float]) -> str:
    return f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}]"


# ----------------------------------------------------------------------------- checks
def check_sufficiency(ctx: Context) -> dict:
    """Circuit loss on the held-out test split (nats per prompt) <= target."""
    losses, raw = ctx.circuit_cal, float(ctx.circuit.mean())
    loss, ci = float(losses.mean()), prompt_interval(losses, ctx)
    cal = ctx.calibration
    note = (
        f"; with its logit calibration (scale {cal.scale:.3g}, shift {cal.shift:.3g}), "
        f"{raw:.3f} without"
        if cal
        else "; no logit calibration"
    )
    return V.check_result(
        "sufficiency",
        V.verdict(V.sufficient(loss, ctx.target)),
        "circuit test loss <= target",
        f"circuit loss {loss:.3f} ({fmt(ci)}) on {len(losses)} held-out prompts vs target "
        f"{ctx.target:.3f} (full model {ctx.loss_full:.3f}; {len(ctx.kept)} nodes{note}).",
        loss=loss,
        interval=list(ci),
        uncertain=V.straddles(ci, ctx.target),
        loss_full=ctx.loss_full,
        target=ctx.target,
        accuracy=float((losses < V.CHANCE).double().mean()),  # loss < ln 2 iff right
        loss_stored=ctx.doc.loss.circuit_test,
        loss_raw=raw,
        calibration=None if cal is None else cal._asdict(),
        n_nodes=len(ctx.kept),
    )


def check_necessity(ctx: Context) -> dict:
    """Only the circuit ablated in the full model: the share of the full model's margin over
    chance that is lost, >= NECESSITY_MIN_FRACTION (N/A if the circuit or model do not qualify)."""
    gates = torch.ones(ctx.space.total)
    gates[ctx.kept] = 0.0
    ablated, full = ctx.losses(gates), ctx.full
    loss, lf = float(ablated.mean()), ctx.loss_full
    criterion = (
        f"ablating only the circuit removes >= {V.NECESSITY_MIN_FRACTION:g} of the full "
        "model's margin over chance (judged only for circuits that reach the target on "
        "held-out templates)"
    )
    numbers: dict[str, Any] = dict(loss=loss, loss_full=lf, chance=V.CHANCE)
    if not V.necessity_applies(lf, ctx.reached_test):
        why = (
            "the circuit misses the target on held-out templates"
            if not ctx.reached_test
            else f"the full model's loss {lf:.3f} is not {V.NECESSITY_MIN_MARGIN} nats below "
            "chance (it does not do the task)"
        )
        return V.check_result(
            "necessity", "N/A", criterion,
            f"not judged: {why}. Ablating only the {len(ctx.kept)} circuit nodes gives loss "
            f"{loss:.3f} (full model {lf:.3f}).",
            **numbers,
        )  # fmt: skip
    frac = V.necessity_fraction(loss, lf)
    ab_p, full_p = (ctx.data.test.pair_means(x) for x in (ablated, full))  # resample pairs
    ci = V.bootstrap(
        lambda idx: (ab_p[idx].mean(1) - full_p[idx].mean(1)) / (V.CHANCE - full_p[idx].mean(1)),
        len(full_p),
        seed=ctx.options.seed,
    )
    return V.check_result(
        "necessity",
        V.verdict(V.necessary(frac)),
        criterion,
        f"ablating only the {len(ctx.kept)} circuit nodes in the full model gives loss "
        f"{loss:.3f} (full model {lf:.3f}, chance {V.CHANCE:.3f}): it removes {frac:.2f} of the "
        f"margin over chance ({fmt(ci)}; pass >= {V.NECESSITY_MIN_FRACTION:g}).",
        fraction=frac,
        interval=list(ci),
        uncertain=V.straddles(ci, V.NECESSITY_MIN_FRACTION),
        threshold=V.NECESSITY_MIN_FRACTION,
        **numbers,
    )


def check_ablation_kinds(ctx: Context) -> dict:
    """Test loss under zero, pretrain-mean and task-mean ablation (same nodes), INFO only."""
    gates = gates_for(ctx.space, ctx.kept)
    losses: dict[str, float] = {}
    for kind in ("zero", "mean", "task_mean"):
        if kind == ctx.cfg.ablation:
            losses[kind] = float(ctx.circuit_cal.mean())
            continue
        ablation = ablation_values(ctx.lm, ctx.space, kind, ctx.data.train_batch)
        ev = CircuitEvaluator(
            ctx.lm.model, space=ctx.space, ablation=ablation, frozen_norms=ctx.cfg.frozen_norms
        )
        losses[kind] = float(ctx.losses(gates, ev=ev, cal=True).mean())
    parts = ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
    return V.check_result(
        "ablation_kinds",
        "INFO",
        "reported without a verdict: how much the circuit depends on what pruned nodes become",
        f"circuit test loss by ablation kind: {parts} (pruned with {ctx.cfg.ablation}; target "
        f"{ctx.target:.3f}).",
        losses=losses,
        own_kind=ctx.cfg.ablation,
        target=ctx.target,
    )


def check_frozen_norms(ctx: Context) -> dict:
    """Test loss with norm factors from the unpruned pass <= target (N/A for a circuit pruned
    with frozen norms: that is sufficiency again)."""
    criterion = "circuit test loss with frozen norms <= target"
    if ctx.cfg.frozen_norms:
        return V.check_result(
            "frozen_norms", "N/A", criterion,
            "not judged separately: the circuit was pruned and judged with frozen norms, so "
            "sufficiency is this check.",
        )  # fmt: skip
    gates = gates_for(ctx.space, ctx.kept)
    ev = CircuitEvaluator(ctx.lm.model, space=ctx.space, ablation=ctx.ablation, frozen_norms=True)
    frozen_l = ctx.losses(gates, ev=ev, cal=True)
    frozen, live = float(frozen_l.mean()), float(ctx.circuit_cal.mean())
    ci = prompt_interval(frozen_l, ctx)
    return V.check_result(
        "frozen_norms",
        V.verdict(V.sufficient(frozen, ctx.target)),
        criterion,
        f"with norm factors frozen from the unpruned pass the circuit's loss is {frozen:.3f} "
        f"({fmt(ci)}) vs {live:.3f} as pruned (target {ctx.target:.3f}).",
        loss=frozen,
        interval=list(ci),
        uncertain=V.straddles(ci, ctx.target),
        loss_as_pruned=live,
        target=ctx.target,
    )


def check_mask_relaxation(ctx: Context) -> dict:
    """Random pruned nodes back on: the loss moves toward the full model's, without a bump."""
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
                losses.append(float(ctx.circuit.mean()) if n_on == 0 else full)
                continue
            on = off[torch.randperm(len(off), generator=gen)[:n_on]]
            losses.append(ctx.loss(gates_for(ctx.space, torch.cat([ctx.kept, on]))))
        curve.append({"fraction": frac, "loss": sum(losses) / len(losses), "losses": losses})
    rule = V.relaxation_ok(list(opts.relax_fractions), [p["loss"] for p in curve], full)
    shown = " ".join(f"{p['fraction']:g}:{p['loss']:.3f}" for p in curve)
    return V.check_result(
        "mask_relaxation",
        V.verdict(rule["ok"]),
        f"Spearman rho(fraction, |loss - full loss|) <= {V.MAX_RHO}, or the curve within "
        f"{V.FLAT_TOL} nats of the full model; and no rise of more than {V.MAX_RISE} nats above "
        "both endpoints",
        f"switching random pruned nodes back on (fraction:loss {shown}; full model {full:.3f}) "
        f"gives Spearman rho {rule['rho']:.2f} between fraction and distance to the full model"
        + (f"; the curve stays within {V.FLAT_TOL} nats of the full model" if rule["flat"] else "")
        + f"; it rises {max(rule['max_rise'], 0.0):.3f} above its endpoints (pass <= "
        f"{V.MAX_RISE}).",
        rho=rule["rho"],
        flat=rule["flat"],
        max_rise=rule["max_rise"],
        loss_full=full,
        curve=curve,
    )


def check_fns() -> dict[str, Callable[[Context], dict]]:
    """Every check by name, in report order."""
    # Both modules import Context from here, so they are imported when the checks run.
    from sparsecircuits.circuits import verify_nulls as N
    from sparsecircuits.circuits import verify_reprune as R

    return {
        "sufficiency": check_sufficiency,
        "necessity": check_necessity,
        "random_circuits": N.check_random_circuits,
        "swap_null": N.check_swap_null,
        "interchange": N.check_interchange,
        "negative_controls": R.check_negative_controls,
        "random_init": R.check_random_init,
        "ablation_kinds": check_ablation_kinds,
        "frozen_norms": check_frozen_norms,
        "mask_relaxation": check_mask_relaxation,
        "seed_stability": R.check_seed_stability,
    }


CHECKS: tuple[str, ...] = (
    "sufficiency", "necessity", "random_circuits", "swap_null", "interchange",
    "negative_controls", "random_init", "ablation_kinds", "frozen_norms", "mask_relaxation",
    "seed_stability",
)  # fmt: skip


def run_checks(ctx: Context, names: Sequence[str] | None = None) -> list[dict]:
    """Run the named checks (default: all, in report order); each result gets its wall time in
    ``seconds``."""
    fns = check_fns()
    out = []
    for name in names or CHECKS:
        start = time.perf_counter()
        result = fns[name](ctx)
        result["seconds"] = round(time.perf_counter() - start, 2)
        flag = " (uncertain)" if result["uncertain"] else ""
        log.info("%s: %s%s (%.1f s) %s", name, result["verdict"], flag, result["seconds"],
                 result["summary"])  # fmt: skip
        out.append(result)
    return out


__all__ = ["CHECKS", "Context", "VerifyOptions", "build_context", "run_checks"]
