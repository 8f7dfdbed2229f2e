"""Robust per-family baselines of engagement on benign text, and the streaming flag rule.

``calibrate`` runs the model over benign windows (default: the stdlib corpus's held-out files)
and records, per family, the per-token engagement's median, MAD (median absolute deviation from
the median) and quantiles p50/p90/p99/p99.9 (numpy's default linear interpolation) into
``baseline.json``, which pins the catalogue file's SHA-256.

Flags: the robust z-score of engagement e is ``z = (e - median) / sigma`` with
``sigma = max(1.4826 * MAD, SIGMA_FLOOR)`` (1.4826 * MAD estimates a normal's standard
deviation; the floor, in engagement units, keeps a family whose benign engagement is almost
constant from flagging on noise). A family is flagged at a token when z > z_threshold for at
least k of the last n tokens (``KOfN``).

A baseline of a dense model monitored through bridges (``monitor/bridged.py``) is measured the
same way, on the engagement the bridged path computes, and names the bridges, the dense model
and each family's bridge site (``bridge``): z-scores are only comparable along one path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sparsecircuits.circuits.means import pretrain_windows
from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.errors import CheckpointError
from sparsecircuits.fileio import atomic_write_json, read_schema_json
from sparsecircuits.model.config import format_validation_error
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks
from sparsecircuits.monitor.catalog import CatalogDoc
from sparsecircuits.monitor.scores import engagement

SCHEMA = "sparsecircuits.monitor.baseline"
BASELINE_FILE = "baseline.json"
MAD_TO_SIGMA = 1.4826
SIGMA_FLOOR = 0.05  # engagement units (1 = benign mean activity)
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p99_9": 0.999}


class FlagRule(BaseModel):
    """Flag when z > ``z`` for at least ``k`` of the last ``n`` tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    z: float = Field(default=4.0, gt=0, allow_inf_nan=False)
    k: int = Field(default=3, ge=1)
    n: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _k_le_n(self) -> FlagRule:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must be <= n ({self.n})")
        return self


class FamilyBaseline(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n_tokens: int
    mean: float
    median: float
    mad: float
    sigma: float  # max(1.4826 * mad, SIGMA_FLOOR)
    p50: float
    p90: float
    p99: float
    p99_9: float


class BridgeBinding(BaseModel):
    """How a bridged baseline was measured: which bridges, from which dense model, and the
    bridge site each family's nodes were computed from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bridges_sha256: str  # bridges.json's weights_sha256
    dense_weights_hash: str
    sites: dict[str, str]  # family -> bridge site


class BaselineDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_: Literal["sparsecircuits.monitor.baseline"] = SCHEMA
    version: Literal[1] = 1
    created: str
    catalog_sha256: str
    weights_hash: str
    source: str  # what the benign text was
    flag: FlagRule  # default flag rule (a policy rule may override it)
    families: dict[str, FamilyBaseline]
    bridge: BridgeBinding | None = None  # None: measured on the catalogue's model itself

    def z(self, family: str, e: torch.Tensor) -> torch.Tensor:
        """Robust z-scores of engagement values ``e`` (any shape) of ``family``."""
        return self.z_of([family], e[..., None])[..., 0]

    def z_of(self, families: list[str], e: torch.Tensor) -> torch.Tensor:
        """Robust z-scores of engagements ``e`` (..., F), column j of ``families[j]``."""
        stats = [self.families[f] for f in families]
        median = torch.tensor([b.median for b in stats], dtype=e.dtype, device=e.device)
        sigma = torch.tensor([b.sigma for b in stats], dtype=e.dtype, device=e.device)
        return (e - median) / sigma


def robust_stats(values: np.ndarray) -> FamilyBaseline:
    """Median, MAD, sigma and quantiles of a 1-D array of engagements."""
    v = np.asarray(values, dtype=np.float64)
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med)))
    q = {k: float(np.quantile(v, p)) for k, p in QUANTILES.items()}
    return FamilyBaseline(n_tokens=len(v), mean=float(v.mean()), median=med, mad=mad,
                          sigma=max(MAD_TO_SIGMA * mad, SIGMA_FLOOR), **q)  # fmt: skip


class KOfN:
    """Streaming k-of-n rule: ``push(exceeds)`` per token returns whether at least ``k`` of the
    last ``n`` tokens (this one included) exceeded the threshold."""

    def __init__(self, *, k: int, n: int) -> None:
        self.k = k
        self.window: deque[bool] = deque(maxlen=n)

    def push(self, exceeds: bool) -> bool:
        self.window.append(bool(exceeds))
        return sum(self.window) >= self.k


@torch.no_grad()
def family_engagements(
    model: GPT, catalog: CatalogDoc, windows: torch.Tensor, *, batch: int = 8
) -> dict[str, np.ndarray]:
    """Per-token engagement of every monitored family over every position of ``windows``
    (N, T) int64: ``{family: (N * T,) float64}``."""
    fams = {n: catalog.family_nodes(n) for n in catalog.monitored()}
    sites = sorted({s for f in fams.values() for s in f.sites})
    dev = next(model.parameters()).device
    fams = {n: f.to(dev) for n, f in fams.items()}
    out: dict[str, list[np.ndarray]] = {n: [] for n in fams}
    for start in range(0, windows.shape[0], batch):
        hooks = Hooks(cache_names=sites)
        model(windows[start : start + batch].to(dev), hooks=hooks)
        for n, f in fams.items():
            out[n].append(engagement(hooks.cache, f).flatten().double().cpu().numpy())
    return {n: np.concatenate(v) for n, v in out.items()}


def calibrate(
    model: GPT,
    tokenizer: Tokenizer,
    catalog: CatalogDoc,
    *,
    catalog_sha256: str,
    windows: int = 16,
    corpus: str = "stdlib",
    flag: FlagRule | None = None,
    measure: Callable[[torch.Tensor], dict[str, np.ndarray]] | None = None,
    bridge: BridgeBinding | None = None,
) -> BaselineDoc:
    """Baselines of every monitored family over ``windows`` benign windows of block_size
    tokens (``model``'s: the served model) from ``corpus``'s held-out files.

    ``measure(windows (N, T) int64) -> {family: (N * T,) float64}``: the engagement of the path
    being calibrated (default: :func:`family_engagements` of ``model`` itself); a bridged path
    passes its own and its ``bridge`` binding, and gets the same statistics."""
    w = pretrain_windows(tokenizer, corpus=corpus, n_windows=windows,
                         length=model.config.block_size)  # fmt: skip
    eng = measure(w) if measure is not None else family_engagements(model, catalog, w)
    via = "" if bridge is None else ", through bridges"
    return BaselineDoc(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        catalog_sha256=catalog_sha256,
        weights_hash=catalog.weights_hash,
        source=f"{corpus} held-out files, {windows} windows of {model.config.block_size} "
        f"tokens{via}",
        flag=flag or FlagRule(),
        families={n: robust_stats(v) for n, v in eng.items()},
        bridge=bridge,
    )


def save_baseline(doc: BaselineDoc, path: str | Path) -> Path:
    path = Path(path)
    path = path / BASELINE_FILE if path.is_dir() else path
    data = doc.model_dump(mode="json")
    if data["bridge"] is None:  # a plain baseline's file stays as it was before bridges
        del data["bridge"]
    atomic_write_json(path, {"schema": data.pop("schema_"), **data})
    return path


def load_baseline(path: str | Path, *, catalog_sha256: str | None = None) -> BaselineDoc:
    """Read a baseline; with ``catalog_sha256``, refuse one fitted for another catalogue."""
    path = Path(path)
    path = path / BASELINE_FILE if path.is_dir() else path
    data = read_schema_json(path, schema=SCHEMA, what="monitor baseline")
    try:
        doc = BaselineDoc.model_validate(data)
    except ValidationError as err:
        raise CheckpointError(format_validation_error(err, source=str(path))) from None
    if catalog_sha256 is not None and doc.catalog_sha256 != catalog_sha256:
        raise CheckpointError(
            f"{path}: fitted for catalogue sha256 {doc.catalog_sha256[:12]}..., not the given "
            f"one ({catalog_sha256[:12]}...); run `sparsecircuits monitor calibrate` again"
        )
    return doc
