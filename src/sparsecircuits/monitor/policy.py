"""The monitor's policy: a versioned YAML file mapping family flags to actions.

::

    version: 1
    flag: {z: 4.0, k: 3, n: 8}        # optional: defaults for every rule (else the baseline's)
    rules:
      - name: quotes-review             # optional; default "rules[i]"
        family: string-literal
        z: 6.0                          # optional per-rule threshold, k and n
        action: review                  # allow | log | review | dampen | block
      - family: brackets
        action: dampen
        dampen: {mode: scale, factor: 0.5}   # or {mode: mean_ablate}

A rule fires when its family's robust z exceeds its ``z`` for at least ``k`` of the last ``n``
tokens; a request's decision is the strictest action fired so far. ``dampen`` scales, or
replaces by their mean-ablation values, exactly that family's nodes for the rest of the request.
The policy's SHA-256 (of the file's bytes) is in every decision. Unknown families, actions or
fields are one-line ConfigErrors naming the file and the field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sparsecircuits.errors import ConfigError
from sparsecircuits.model.config import format_validation_error
from sparsecircuits.monitor.calibrate import FlagRule
from sparsecircuits.monitor.families import read_yaml
from sparsecircuits.monitor.runtime import Action


class Dampen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["scale", "mean_ablate"]
    factor: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _factor(self) -> Dampen:
        if self.mode == "scale" and self.factor is None:
            raise ValueError("mode 'scale' needs a factor")
        if self.mode == "mean_ablate" and self.factor is not None:
            raise ValueError("mode 'mean_ablate' takes no factor")
        return self


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None
    family: str
    action: Action
    z: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    k: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    dampen: Dampen | None = None

    @model_validator(mode="after")
    def _dampen(self) -> Rule:
        if self.action is Action.DAMPEN and self.dampen is None:
            raise ValueError("action 'dampen' needs dampen: {mode: scale, factor: F} or "
                             "{mode: mean_ablate}")  # fmt: skip
        if self.action is not Action.DAMPEN and self.dampen is not None:
            raise ValueError(f"'dampen' options given for action {self.action.value!r}")
        return self


class PolicyDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Literal[1]
    flag: FlagRule | None = None
    # Opt-in: when a rule first fires in a request, measure the family's causal share at that
    # token (two extra passes over the prefix; see monitor/scores.py causal_share).
    causal_share: bool = False
    rules: list[Rule] = Field(default_factory=list)


@dataclass(frozen=True)
class ResolvedRule:
    """A rule with its name and flag thresholds filled in."""

    name: str
    family: str
    action: Action
    flag: FlagRule
    dampen: Dampen | None


@dataclass(frozen=True)
class Policy:
    path: str
    sha256: str  # of the file's bytes
    doc: PolicyDoc

    def rules(self, default: FlagRule) -> list[ResolvedRule]:
        """Rules with thresholds from the rule, else the policy's ``flag``, else ``default``
        (the baseline's)."""
        base = self.doc.flag or default
        out = []
        for i, r in enumerate(self.doc.rules):
            try:
                flag = FlagRule(z=r.z if r.z is not None else base.z,
                                k=r.k if r.k is not None else base.k,
                                n=r.n if r.n is not None else base.n)  # fmt: skip
            except ValidationError as err:
                msg = format_validation_error(err, source=f"{self.path} rules.{i}")
                raise ConfigError(msg) from None
            out.append(ResolvedRule(r.name or f"rules[{i}]", r.family, r.action, flag, r.dampen))
        return out


def load_policy(path: str | Path, *, families: Collection[str] | None = None) -> Policy:
    """Read and validate a policy. ``families``: the names a rule may use (the catalogue's
    monitored families); a rule naming another is a ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such policy file") from None
    data = read_yaml(path, raw=raw)  # the bytes hashed below, not a second read
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'version' and 'rules'")
    try:
        doc = PolicyDoc.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=str(path))) from None
    names: set[str] = set()
    for i, r in enumerate(doc.rules):
        # k and n as far as the policy fixes them; the rest come from the baseline's flag and
        # are checked when the rules are resolved against it (Policy.rules)
        k = r.k if r.k is not None else (doc.flag.k if doc.flag else None)
        n = r.n if r.n is not None else (doc.flag.n if doc.flag else None)
        if k is not None and n is not None and k > n:
            raise ConfigError(f"{path}: field 'rules.{i}': k ({k}) must be <= n ({n})")
        name = r.name or f"rules[{i}]"
        if name in names:  # flags are kept per rule name: two rules must not share one
            raise ConfigError(f"{path}: field 'rules.{i}.name': {name!r} names two rules")
        names.add(name)
        if families is not None and r.family not in families:
            known = ", ".join(sorted(families)) or "none"
            raise ConfigError(
                f"{path}: field 'rules.{i}.family': unknown family {r.family!r} "
                f"(monitored: {known})"
            )
    return Policy(str(path), hashlib.sha256(raw).hexdigest(), doc)
