"""Per-request circuit telemetry for the server: the ``MonitorFactory`` of ``runtime.py``.

Each pass, :class:`CircuitMonitor` records the sites of the monitored families; ``observe``
turns the new positions' activations into per-token engagement and robust z per family, feeds
every policy rule's streaming k-of-n counter, and returns the strictest decision fired so far.
After a ``dampen`` decision, the following passes carry an intervention on exactly that family's
nodes. Engagement is always measured on the activations *before* the monitor's own dampening
(the intervention hands its input to the monitor): otherwise a request that trips a mild
``dampen`` rule would blind every stricter rule on that family for the rest of the request.
Telemetry holds scores, flags and the decision, never activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsecircuits.errors import ConfigError
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks, Intervention
from sparsecircuits.monitor.calibrate import BaselineDoc, KOfN
from sparsecircuits.monitor.catalog import CatalogDoc
from sparsecircuits.monitor.policy import Policy, ResolvedRule
from sparsecircuits.monitor.runtime import Action, Decision
from sparsecircuits.monitor.scores import (
    FamilyNodes,
    FamilyScorer,
    causal_share,
    chain,
    dampen_interventions,
)

PROMPT = -1  # at_token of anything fired by the prompt's pass


def _r(x: float) -> float:
    return round(float(x), 4)


class CircuitMonitor:
    """Telemetry state of one request (see ``runtime.RequestMonitor``)."""

    def __init__(self, factory: CircuitMonitorFactory, request_id: str) -> None:
        self.f = factory
        self.request_id = request_id
        self.decision = Decision(Action.ALLOW, policy_sha256=factory.policy.sha256)
        self.counters = [KOfN(k=r.flag.k, n=r.flag.n) for r in factory.rules]
        self.fired: dict[str, list[int]] = {r.name: [] for r in factory.rules}
        self.eng: dict[str, list[float]] = {n: [] for n in factory.families}
        self.z: dict[str, list[float]] = {n: [] for n in factory.families}
        self.dampened: list[str] = []
        self._interventions: dict[str, Intervention] = {}
        self._pre: dict[str, torch.Tensor] = {}  # this pass's activations before dampening
        self._passes = 0
        self._ids: list[int] = []  # every observed position's token, in order
        self.causal: dict[str, dict[str, Any]] = {}  # rule -> causal share where it first fired
        self._generated = 0  # generated tokens whose activations were observed
        self._prompt_tokens = 0

    def hooks(self) -> Hooks:
        return Hooks(cache_names=self.f.sites, interventions=self._interventions)

    def observe(self, cache: dict[str, torch.Tensor], token_ids: list[int]) -> Decision:
        """``cache[site]`` (1, T_new, width) for the new positions; ``token_ids`` their ids."""
        n_new = len(token_ids)
        # The first pass is the prompt; each later position is one generated token.
        if self._passes == 0:
            at = [PROMPT] * n_new
            self._prompt_tokens = n_new
        else:
            at = list(range(self._generated, self._generated + n_new))
            self._generated += n_new
        self._passes += 1
        first = len(self._ids)  # absolute position of this pass's first new token
        self._ids += list(token_ids)
        # before the monitor's own dampening, where it acted; only the new positions (after a
        # slide the pass re-reads the whole window, but the engine hands over the new ones)
        seen = {**cache, **{k: v[:, -n_new:] for k, v in self._pre.items()}}
        self._pre = {}
        e_all = self._engagement(seen, n_new)  # (T_new, F)
        z_all = self.f.baseline.z_of(self.f.scorer.names, e_all).cpu().tolist()
        e_all = e_all.cpu().tolist()
        z_now: dict[str, list[float]] = {}
        for j, name in enumerate(self.f.scorer.names):
            self.eng[name] += [_r(row[j]) for row in e_all]
            self.z[name] += [_r(row[j]) for row in z_all]
            z_now[name] = [row[j] for row in z_all]
        for rule, counter in zip(self.f.rules, self.counters, strict=True):
            for pos, zv in enumerate(z_now[rule.family]):
                if counter.push(zv > rule.flag.z):
                    if not self.fired[rule.name] or self.fired[rule.name][-1] != at[pos]:
                        self.fired[rule.name].append(at[pos])
                    if self.f.policy.doc.causal_share and rule.name not in self.causal:
                        self.causal[rule.name] = self._causal(rule.family, first + pos, at[pos])
                    self._escalate(rule, at[pos], zv)
        return self.decision

    def _engagement(self, cache: dict[str, torch.Tensor], n_new: int) -> torch.Tensor:
        """Engagement (n_new, F) of the new positions, families in ``f.scorer.names`` order.
        Every family in one product, one transfer: this runs once per generated token."""
        return self.f.scorer(cache)[0]

    def _evidence(self, family: str) -> dict[str, Any] | None:
        """What a decision fired by ``family`` carries beside its scores (None: nothing)."""
        return None

    def _escalate(self, rule: ResolvedRule, at: int, z: float) -> None:
        if rule.action is Action.DAMPEN and rule.family not in self.dampened:
            d = rule.dampen
            assert d is not None  # the policy validator requires it
            fns = dampen_interventions(self.f.families[rule.family], mode=d.mode,
                                       factor=d.factor or 0.0)  # fmt: skip
            self._interventions = chain(self._interventions, fns)
            self._interventions = {s: self._seeing(s, fn) for s, fn in self._interventions.items()}
            self.dampened.append(rule.family)
        if rule.action.severity > self.decision.action.severity:
            self.decision = Decision(
                rule.action, policy_sha256=self.f.policy.sha256, family=rule.family,
                rule=rule.name, at_token=at,
                reason=f"{rule.family}: z > {rule.flag.z:g} on >= {rule.flag.k} of the last "
                f"{rule.flag.n} tokens (z {z:.2f})", bridge=self._evidence(rule.family),
            )  # fmt: skip

    def _causal(self, family: str, position: int, at: int) -> dict[str, Any]:
        """The family's causal share for the token at absolute ``position``: how much less
        likely that token, and the family's task logit differences, become when exactly its
        nodes are mean-ablated (the prefix before it re-run twice, at most a context long)."""
        if position < 1:
            return {"at_token": at, "skipped": "the first token has no prefix"}
        block = self.f.model.config.block_size
        prefix = torch.tensor([self._ids[max(0, position - block) : position]])
        fam, answers = self.f.families[family], self.f.catalog.answers(family)
        share = causal_share(self.f.model, prefix, self._ids[position], fam, answers=answers)
        return {"at_token": at, **{k: v for k, v in share.items() if k != "emitted"}}

    def _seeing(self, site: str, fn: Intervention) -> Intervention:
        """``fn``, handing its input to the monitor first (the first wrapper of a site wins,
        so with two dampened families the value before both is kept)."""

        def run(x: torch.Tensor) -> torch.Tensor:
            self._pre.setdefault(site, x.detach())
            return fn(x)

        return run

    def telemetry(self) -> dict[str, Any]:
        fams = {}
        for name in self.f.families:
            rules = [r for r in self.f.rules if r.family == name]
            fams[name] = {
                "engagement": self.eng[name],
                "z": self.z[name],
                "max_z": max(self.z[name], default=None),
                "flags": {r.name: self.fired[r.name] for r in rules},
                "dampened": name in self.dampened,
            }
        return {
            "request_id": self.request_id,
            "n_prompt_tokens": self._prompt_tokens,
            "n_generated_tokens": self._generated,
            "families": fams,
            "causal_share": self.causal,  # policy opt-in: where each rule first fired
            "decision": self.decision.to_json(),
        }


class CircuitMonitorFactory:
    """Starts a :class:`CircuitMonitor` per request from a catalogue, baseline and policy."""

    bridged = False  # scores measured on this model itself (bridged.py: through bridges)

    def __init__(
        self,
        model: GPT,
        catalog: CatalogDoc,
        baseline: BaselineDoc,
        policy: Policy,
        *,
        catalog_path: str | Path | None = None,
    ) -> None:
        missing = sorted(set(catalog.monitored()) - set(baseline.families))
        if missing:
            raise ConfigError(f"baseline has no numbers for family {missing[0]!r}; recalibrate")
        # z-scores compare engagement with benign engagement measured along the same path
        if baseline.bridge is not None and not self.bridged:
            raise ConfigError("the baseline was measured through bridges from a dense model; "
                              "serve it with --bridge, or calibrate without --bridge")  # fmt: skip
        if baseline.bridge is None and self.bridged:
            raise ConfigError("the baseline was measured on the sparse model itself, not "
                              "through the bridges; run `sparsecircuits monitor calibrate "
                              "--bridge DIR --dense MODEL`")  # fmt: skip
        dev = next(model.parameters()).device
        self.catalog, self.baseline, self.policy = catalog, baseline, policy
        self.model = model
        self.catalog_path = None if catalog_path is None else str(catalog_path)
        self.families: dict[str, FamilyNodes] = {
            n: catalog.family_nodes(n).to(dev) for n in catalog.monitored()
        }
        self.sites = sorted({s for f in self.families.values() for s in f.sites})
        self.scorer = FamilyScorer(self.families).to(dev)
        self.rules = policy.rules(baseline.flag)
        bad = [r.family for r in self.rules if r.family not in self.families]
        if bad:
            raise ConfigError(f"{policy.path}: family {bad[0]!r} has no admitted circuit")

    def start(self, request_id: str) -> CircuitMonitor:
        return CircuitMonitor(self, request_id)

    def describe(self) -> dict[str, Any]:
        return {
            "catalog": self.catalog_path,
            "weights_hash": self.catalog.weights_hash,
            "families": list(self.families),
            "baseline_catalog_sha256": self.baseline.catalog_sha256,
            "policy": self.policy.path,
            "policy_sha256": self.policy.sha256,
        }
