"""Monitoring a dense model through its bridged sparse companion (Gao et al. 2025, section 6).

The served model is dense; the catalogue's families live in a weight-sparse companion joined to
it by bridges (``bridges/``). Per forward pass of the dense model, the monitor's hooks keep the
dense residual at the bridge sites it needs; ``observe`` encodes each into the companion's
residual (``Bridges[site].encode``), runs the companion from that site with its own KV cache
(mirroring the dense model's cache, and its re-read of the window once the context is full) and
scores the families on the companion's activations, with the same scorer, z and policy rules as
direct monitoring (``live.py``).

**Site rule.** A family is scored from the *latest bridge site at or before its earliest node*
in forward order: a node at ``{l}.attn.*`` crosses at ``{l}.resid_in``, one at ``{l}.mlp.*`` at
``{l}.resid_mid``. Every node of the family is then computed by the companion after the crossing
(an earlier node would be upstream of it, never recomputed), and as much as possible of the
computation before it is the dense model's own. One companion pass per distinct site, up to the
last block holding a node of its families.

**Fidelity.** Every family record in the telemetry, and every decision a bridged family fires,
carries the site and that site's fidelity as ``bridge eval`` measured it (``fidelity.json``
beside the bridges: encoder and decoder NMSE, KL and next-token agreement of the dense-to-sparse
hybrid). Startup is refused when that file is missing or measured other bridges: no
bridge-derived flag without it. The benign baseline must be calibrated through the same path
(:func:`calibrate_bridged`), and is bound to the bridges, the dense model and the sites.

**Not supported** (refused at startup, one line): ``dampen`` rules (the companion's activations
are not the served model's, so changing them changes nothing the client gets; carrying the
change into the dense residual with ``Bridges.decode_delta`` is not implemented) and the
policy's ``causal_share`` (it ablates nodes of the model being run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.evaluate import FIDELITY_FILE
from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.errors import ConfigError, InputError
from sparsecircuits.model.cache import KVCache, LayerCache
from sparsecircuits.model.config import format_validation_error
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks, site_names
from sparsecircuits.monitor.calibrate import BaselineDoc, BridgeBinding, FlagRule, calibrate
from sparsecircuits.monitor.catalog import CatalogDoc
from sparsecircuits.monitor.live import CircuitMonitor, CircuitMonitorFactory
from sparsecircuits.monitor.policy import Policy
from sparsecircuits.monitor.runtime import Action
from sparsecircuits.monitor.scores import FamilyNodes, FamilyScorer

EVIDENCE_KEYS = ("enc_nmse", "dec_nmse", "kl_d2s", "agree_d2s")  # what each score carries


def bridge_site(node_sites: Sequence[str], bridge_sites: Sequence[str], n_layer: int) -> str:
    """The latest of ``bridge_sites`` at or before the earliest of ``node_sites`` in forward
    order (see the module docstring), e.g. ``["1.mlp.post_act"]`` -> ``"1.resid_mid"``."""
    order = {s: i for i, s in enumerate(site_names(n_layer))}
    unknown = [s for s in (*node_sites, *bridge_sites) if s not in order]
    if unknown or not node_sites:
        raise ConfigError(f"no bridge site for node sites {list(node_sites)} "
                          f"({unknown[0] if unknown else 'none'} is not a site)")  # fmt: skip
    first = min(order[s] for s in node_sites)
    before = [b for b in bridge_sites if order[b] <= first]
    if not before:
        raise ConfigError(f"no bridge site at or before {min(node_sites, key=order.get)}")
    return max(before, key=order.__getitem__)


class SiteFidelity(BaseModel):
    """One row of ``fidelity.json`` (``bridges/evaluate.py``): NMSE both ways (fraction of
    variance unexplained), KL from the dense model to each hybrid (nats/token), agreement."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    site: str
    enc_nmse: float = Field(allow_inf_nan=False)
    dec_nmse: float = Field(allow_inf_nan=False)
    kl_d2s: float = Field(allow_inf_nan=False)
    kl_s2d: float = Field(allow_inf_nan=False)
    agree_d2s: float = Field(allow_inf_nan=False)
    agree_s2d: float = Field(allow_inf_nan=False)

    def evidence(self) -> dict[str, Any]:
        """What a score from this site carries: the site and its fidelity (4 decimals)."""
        return {"site": self.site, **{k: round(float(getattr(self, k)), 4) for k in EVIDENCE_KEYS}}


class _FidelityDoc(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    sites: list[SiteFidelity]
    weights_sha256: str


def load_fidelity(directory: str | Path, *, weights_sha256: str) -> dict[str, SiteFidelity]:
    """``directory/fidelity.json`` by site; one-line ConfigError when it is missing, malformed or
    measured bridges other than those whose weights hash to ``weights_sha256``."""
    from sparsecircuits.fileio import read_json_object

    path = Path(directory) / FIDELITY_FILE
    fix = f"run `sparsecircuits bridge eval {directory}` (no bridge-derived flag without it)"
    if not path.is_file():
        raise ConfigError(f"{path}: no measured bridge fidelity; {fix}")
    try:
        doc = _FidelityDoc.model_validate(read_json_object(path))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=str(path))) from None
    if doc.weights_sha256 != weights_sha256:
        raise ConfigError(f"{path}: measured other bridges (weights sha256 "
                          f"{doc.weights_sha256[:12]}..., loaded {weights_sha256[:12]}...); "
                          f"{fix}")  # fmt: skip
    return {r.site: r for r in doc.sites}


def same_tokenizer(dense_dir: Path, companion_dir: Path) -> None:
    """Bridges join positions token by token: both models must read the same ids."""
    if Tokenizer.load(dense_dir).fingerprint() != Tokenizer.load(companion_dir).fingerprint():
        raise InputError(f"companion {companion_dir.name}: another tokenizer than the dense "
                         f"model's ({dense_dir.name})")  # fmt: skip


def check_pair(dense: GPT, companion: GPT, bridges: Bridges) -> None:
    """Sizes agree, and the companion's context holds every window the dense model reads."""
    d, s = dense.config, companion.config
    if not (d.n_layer == s.n_layer == bridges.n_layer) or (d.vocab_size != s.vocab_size):
        raise InputError("the dense model, the companion and the bridges need one layer count "
                         "and one vocabulary")  # fmt: skip
    if (bridges.d_dense, bridges.d_sparse) != (d.d_model, s.d_model):
        raise InputError(f"bridges map width {bridges.d_dense} -> {bridges.d_sparse}, the "
                         f"models have {d.d_model} -> {s.d_model}")  # fmt: skip
    if s.block_size < d.block_size:
        raise InputError(f"the companion's context ({s.block_size}) is shorter than the dense "
                         f"model's ({d.block_size})")  # fmt: skip


@dataclass(frozen=True)
class _Group:
    """The families crossing at one bridge site: columns ``cols`` (F_g,) of the factory's
    family order, their scorer, and the blocks to run (``layer`` .. ``last``)."""

    site: str
    layer: int
    mid: bool  # start at the block's MLP (site ``{layer}.resid_mid``)
    last: int
    cols: torch.Tensor
    scorer: FamilyScorer


def _start(site: str) -> tuple[int, bool]:
    layer, _, rel = site.partition(".")
    return int(layer), rel == "resid_mid"  # final_resid is never a family's site


class BridgedPath:
    """Engagement of families measured on the companion from encoded dense residuals."""

    def __init__(self, companion: GPT, bridges: Bridges, families: Mapping[str, FamilyNodes]):
        self.companion, self.bridges = companion, bridges
        self.names = list(families)
        n = companion.config.n_layer
        self.site_of = {k: bridge_site(f.sites, bridges.sites, n) for k, f in families.items()}
        self.sites = sorted(set(self.site_of.values()), key=bridges.sites.index)  # dense sites
        dev = next(companion.parameters()).device
        self.groups: list[_Group] = []
        for site in self.sites:
            names = [k for k in self.names if self.site_of[k] == site]
            scorer = FamilyScorer({k: families[k] for k in names}).to(dev)
            cols = torch.tensor([self.names.index(k) for k in names], device=dev)
            last = max(int(s.partition(".")[0]) for s in scorer.sites)
            self.groups.append(_Group(site, *_start(site), last, cols, scorer))

    @torch.no_grad()
    def engagement(
        self,
        resid: Mapping[str, torch.Tensor],
        idx: torch.Tensor,
        kv: Mapping[str, KVCache] | None = None,
    ) -> torch.Tensor:
        """``resid[site]`` (B, W, d_dense) dense residuals, ``idx`` (B, W) their token ids;
        ``kv[site]``: a companion cache these W positions continue (None: a plain pass from
        position 0). Returns engagement (B, W, F), families in ``names`` order."""
        p = next(self.bridges.parameters())
        out = torch.zeros(*idx.shape, len(self.names), device=idx.device)
        for g in self.groups:
            x = self.bridges[g.site].encode(resid[g.site].to(p.device, p.dtype))
            hooks = Hooks(cache_names=g.scorer.sites)
            self._run(g, x.to(next(self.companion.parameters()).dtype), hooks,
                      None if kv is None else kv[g.site])  # fmt: skip
            out[..., g.cols.to(out.device)] = g.scorer(hooks.cache).to(out.device)
        return out

    def _run(self, g: _Group, x: torch.Tensor, hooks: Hooks, cache: KVCache | None) -> None:
        """The companion's blocks ``g.layer`` .. ``g.last`` from ``x`` (B, W, d_sparse) at
        ``g.site``, recording ``hooks``. Not ``GPT.forward_from``: that has no KV cache (each
        token would re-run the whole window) and runs on to the logits nobody reads."""
        m = self.companion
        offset = 0 if cache is None else cache.length
        if cache is not None:
            cache.check(x.shape[0], x.shape[1])
        pos = m.positions(x.shape[1], offset=offset)
        for i in range(g.layer, g.last + 1):
            block, bhk = m.transformer.h[i], hooks.scoped(str(i))
            if g.mid and i == g.layer:
                x = block.forward_mlp(x, bhk, pos=pos)
            else:
                x = block(x, bhk, pos=pos, past=None if cache is None else LayerCache(cache, i))
        if cache is not None:
            cache.advance(x.shape[1])


class BridgedMonitor(CircuitMonitor):
    """One request's telemetry, scored on the companion (see the module docstring)."""

    f: BridgedMonitorFactory

    def __init__(self, factory: BridgedMonitorFactory, request_id: str) -> None:
        super().__init__(factory, request_id)
        self._stash: dict[str, torch.Tensor] = {}
        self._kv: dict[str, KVCache] | None = None

    def hooks(self) -> Hooks:
        # An identity intervention, not a cache name: the engine hands observe() only the new
        # positions of its recorded sites, but after the window slides the companion must
        # re-read the whole window, which only the tensor inside the pass holds.
        return Hooks(interventions={s: self._keeper(s) for s in self.f.path.sites})

    def _keeper(self, site: str):
        def keep(x: torch.Tensor) -> torch.Tensor:
            self._stash[site] = x.detach()
            return x

        return keep

    def _engagement(self, cache: dict[str, torch.Tensor], n_new: int) -> torch.Tensor:
        resid, self._stash = self._stash, {}
        if not self.f.path.groups:
            return torch.zeros(n_new, 0)
        width = resid[self.f.path.sites[0]].shape[1]  # n_new, or the whole re-read window
        full = self._kv is None or width != n_new
        full = full or next(iter(self._kv.values())).length + width > self.f.companion_block
        if full:  # first pass, or the dense model re-read its window with a fresh cache
            self._kv = {s: KVCache.for_model(self.f.companion, batch=1) for s in self.f.path.sites}
        dev = next(self.f.companion.parameters()).device
        idx = torch.tensor([self._ids[-width:]], dtype=torch.long, device=dev)
        return self.f.path.engagement(resid, idx, self._kv)[0, -n_new:]

    def _evidence(self, family: str) -> dict[str, Any] | None:
        return dict(self.f.evidence[family])

    def telemetry(self) -> dict[str, Any]:
        tel = super().telemetry()
        for name, rec in tel["families"].items():
            rec["bridge"] = dict(self.f.evidence[name])
        tel["monitoring"] = self.f.monitoring()
        return tel


class BridgedMonitorFactory(CircuitMonitorFactory):
    """Per-request telemetry of ``dense`` scored on ``companion`` (the catalogue's model)
    through ``bridges``. ``fidelity``: ``bridge eval``'s rows by site (:func:`load_fidelity`);
    ``hashes``: ``{"sparse": ..., "dense": ...}`` weights hashes; ``bridges_sha256``: the
    bridges' weights hash (bridges.json)."""

    bridged = True

    def __init__(
        self,
        dense: GPT,
        companion: GPT,
        bridges: Bridges,
        catalog: CatalogDoc,
        baseline: BaselineDoc,
        policy: Policy,
        *,
        fidelity: Mapping[str, SiteFidelity],
        hashes: Mapping[str, str],
        bridges_sha256: str,
        companion_name: str,
        catalog_path: str | Path | None = None,
    ) -> None:
        super().__init__(companion, catalog, baseline, policy, catalog_path=catalog_path)
        check_pair(dense, companion, bridges)
        damp = [r for r in self.rules if r.action is Action.DAMPEN]
        if damp:
            raise ConfigError(
                f"{policy.path}: rule {damp[0].name!r} dampens {damp[0].family!r}, which is "
                "scored on the bridged companion, not on the served dense model; with --bridge "
                "use log, review or block"
            )
        if policy.doc.causal_share:
            raise ConfigError(f"{policy.path}: causal_share ablates the catalogue's nodes in the "
                              "model being run, which with --bridge is the dense model; turn "
                              "it off")  # fmt: skip
        p = next(companion.parameters())
        self.bridges = bridges.to(p.device, p.dtype).eval().requires_grad_(False)
        self.dense, self.companion, self.companion_name = dense, companion, companion_name
        self.companion_block = companion.config.block_size
        self.hashes, self.bridges_sha256 = dict(hashes), bridges_sha256
        self.path = BridgedPath(companion, self.bridges, self.families)
        want = BridgeBinding(bridges_sha256=bridges_sha256, dense_weights_hash=hashes["dense"],
                             sites=self.path.site_of)  # fmt: skip
        if baseline.bridge != want:
            raise ConfigError("the baseline was calibrated through other bridges, another dense "
                              "model or other sites; run `sparsecircuits monitor calibrate "
                              "--bridge DIR --dense MODEL` again")  # fmt: skip
        missing = [s for s in self.path.sites if s not in fidelity]
        if missing:
            raise ConfigError(f"{FIDELITY_FILE}: no fidelity measured at site {missing[0]!r}; "
                              "run `sparsecircuits bridge eval` again")  # fmt: skip
        self.evidence = {k: fidelity[s].evidence() for k, s in self.path.site_of.items()}

    def start(self, request_id: str) -> BridgedMonitor:
        return BridgedMonitor(self, request_id)

    def monitoring(self) -> dict[str, Any]:
        """How this telemetry was measured (in every record)."""
        return {"mode": "bridged", "companion": self.companion_name,
                "companion_weights_hash": self.hashes["sparse"],
                "dense_weights_hash": self.hashes["dense"],
                "bridges_sha256": self.bridges_sha256}  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "monitoring": "bridged", "bridge": self.monitoring(),
                "bridge_sites": {k: dict(v) for k, v in self.evidence.items()}}  # fmt: skip


@torch.no_grad()
def bridged_engagements(
    dense: GPT, path: BridgedPath, windows: torch.Tensor, *, batch: int = 8
) -> dict[str, np.ndarray]:
    """Per-token engagement along the bridged path over every position of ``windows`` (N, T)
    int64: ``{family: (N * T,) float64}`` (as ``calibrate.family_engagements``)."""
    dev = next(dense.parameters()).device
    out: dict[str, list[np.ndarray]] = {k: [] for k in path.names}
    for start in range(0, windows.shape[0], batch):
        idx = windows[start : start + batch].to(dev)
        hooks = Hooks(cache_names=path.sites)
        dense(idx, hooks=hooks)
        e = path.engagement(hooks.cache, idx)  # (B, T, F)
        for j, k in enumerate(path.names):
            out[k].append(e[..., j].flatten().double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def calibrate_bridged(
    dense: GPT,
    companion: GPT,
    bridges: Bridges,
    tokenizer: Tokenizer,
    catalog: CatalogDoc,
    *,
    catalog_sha256: str,
    bridges_sha256: str,
    dense_hash: str,
    windows: int = 16,
    corpus: str = "stdlib",
    flag: FlagRule | None = None,
) -> BaselineDoc:
    """``calibrate.calibrate`` along the bridged path: benign windows of the dense model's
    context, each family's engagement measured on the companion from its bridge site."""
    check_pair(dense, companion, bridges)
    p = next(companion.parameters())
    bridges = bridges.to(p.device, p.dtype).eval()
    fams = {k: catalog.family_nodes(k).to(p.device) for k in catalog.monitored()}
    path = BridgedPath(companion, bridges, fams)
    binding = BridgeBinding(bridges_sha256=bridges_sha256, dense_weights_hash=dense_hash,
                            sites=path.site_of)  # fmt: skip
    return calibrate(dense, tokenizer, catalog, catalog_sha256=catalog_sha256, windows=windows,
                     corpus=corpus, flag=flag, bridge=binding,
                     measure=lambda w: bridged_engagements(dense, path, w))  # fmt: skip
