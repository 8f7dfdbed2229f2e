"""The circuit catalogue (``catalog.json``): which verified circuits each family watches.

``build_catalog`` prunes (or reuses) one circuit per task of the families file, runs the
``sufficiency`` and ``necessity`` checks of ``circuits/verify.py`` on it and **admits it only if
both PASS** (N/A is not a pass: necessity is N/A for a circuit that misses its target on held-out
templates). Rejected circuits are listed with the first check that did not pass and its summary.
Per family it stores the union of the admitted circuits' nodes ``{site: [channel, ...]}``, each
node's benign scale (``scores.benign_scales``) and pretraining mean (the circuits' mean-ablation
values), and each task's answer token pair. The file pins the model's weights hash;
``load_catalog`` refuses another model with a one-line error.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from sparsecircuits import tasks
from sparsecircuits.circuits.means import load_or_compute_means, pretrain_windows
from sparsecircuits.circuits.nodes import Location, NodeSpace
from sparsecircuits.circuits.pipeline import LoadedModel, find_circuit
from sparsecircuits.circuits.prune import PruneConfig
from sparsecircuits.circuits.report import save_prune_outputs
from sparsecircuits.circuits.schema import check_model, load_circuit
from sparsecircuits.circuits.verify import VerifyOptions, build_context, run_checks
from sparsecircuits.errors import CheckpointError, ConfigError, SparseCircuitsError
from sparsecircuits.fileio import atomic_write_json, read_schema_json
from sparsecircuits.model.config import format_validation_error
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import weights_hash
from sparsecircuits.monitor.families import FamilySet
from sparsecircuits.monitor.scores import FamilyNodes, benign_scales, site_location

log = logging.getLogger(__name__)

SCHEMA = "sparsecircuits.monitor.catalog"
VERSION = 1
CATALOG_FILE = "catalog.json"
ADMISSION_CHECKS = ("sufficiency", "necessity")


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckRec(_Doc):
    verdict: str  # PASS | FAIL | N/A
    summary: str
    uncertain: bool = False  # its 95% interval straddles the threshold


class CircuitEntry(_Doc):
    task: str
    path: str  # the circuit directory: relative to the catalogue's when inside it, else absolute
    n_nodes: int
    admitted: bool
    reason: str  # "" when admitted, else "<check> <verdict>: <summary>"
    checks: dict[str, CheckRec]
    answers: tuple[int, int]  # the task's most common (answer A, answer B) token ids


class FamilyEntry(_Doc):
    description: str
    tasks: list[str]
    admitted: list[str]
    rejected: list[str]
    n_nodes: int
    nodes: dict[str, list[int]]  # site -> channel indices (ascending)
    scale: dict[str, list[float]]  # benign mean |activation| per node, floored
    mean: dict[str, list[float]]  # pretraining mean per node (the mean-ablation value)


def _check_consistent(doc: CatalogDoc, *, source: str) -> None:
    """A family lists only admitted circuits, and its per-node lists agree in length (a
    hand-edited or stale file is refused here, not by a 500 on every request)."""
    for name, f in doc.families.items():
        bad = [t for t in f.admitted if t not in doc.circuits or not doc.circuits[t].admitted]
        if bad:
            raise CheckpointError(
                f"{source}: field 'families.{name}.admitted': {bad[0]!r} is not an admitted "
                "circuit of this catalogue"
            )
        for site, idx in f.nodes.items():
            if len(f.scale.get(site, ())) != len(idx) or len(f.mean.get(site, ())) != len(idx):
                raise CheckpointError(
                    f"{source}: field 'families.{name}': site {site!r} has {len(idx)} nodes "
                    "but other numbers of scales or means"
                )


def _check_sites(doc: CatalogDoc, model: GPT, *, source: str) -> None:
    """Every family node is a channel of ``model`` (its site exists and the index fits)."""
    space = NodeSpace(model.config)
    for name, f in doc.families.items():
        for site, idx in f.nodes.items():
            try:
                size = space.group(*site_location(site)).size
            except (ValueError, KeyError, SparseCircuitsError):
                raise CheckpointError(
                    f"{source}: field 'families.{name}.nodes': {site!r} is not a node site of "
                    "the model"
                ) from None
            if idx and not 0 <= min(idx) <= max(idx) < size:
                raise CheckpointError(
                    f"{source}: field 'families.{name}.nodes.{site}': an index is outside "
                    f"[0, {size})"
                )


class CatalogDoc(_Doc):
    schema_: Literal["sparsecircuits.monitor.catalog"] = SCHEMA
    version: Literal[1] = VERSION
    created: str
    model_id: str
    weights_hash: str
    scale_windows: int  # benign windows (stdlib held-out files) behind the scales
    circuits: dict[str, CircuitEntry]
    families: dict[str, FamilyEntry]

    def family_nodes(self, name: str) -> FamilyNodes:
        """The family's nodes as tensors (for ``scores``)."""
        f = self.families[name]
        t = lambda d, dt: {s: torch.tensor(v, dtype=dt) for s, v in d.items()}  # noqa: E731
        return FamilyNodes(name, t(f.nodes, torch.long), t(f.scale, torch.float32),
                           t(f.mean, torch.float32))  # fmt: skip

    def answers(self, name: str) -> dict[str, tuple[int, int]]:
        """Answer token pairs of the family's admitted tasks."""
        return {t: self.circuits[t].answers for t in self.families[name].admitted}

    def monitored(self) -> list[str]:
        """Families with at least one admitted circuit (the others have nothing to watch)."""
        return [n for n, f in self.families.items() if f.n_nodes > 0]


def _answers(lm: LoadedModel, task: str) -> tuple[int, int]:
    b = tasks.get(task).build(lm.tokenizer, split="train", n=32, seed=0,
                              max_len=lm.model.config.block_size)  # fmt: skip
    pairs = Counter(zip(b.target_a.tolist(), b.target_b.tolist(), strict=True))
    return pairs.most_common(1)[0][0]


def _stored_path(path: Path, out: Path) -> str:
    """A circuit directory as the catalogue stores it: relative to the catalogue's directory
    when inside it (the catalogue can move, e.g. into the package), else absolute."""
    path, out = Path(path).resolve(), Path(out).resolve()
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


def admit(results: list[dict], *, strict: bool = False) -> tuple[bool, str]:
    """(admitted, reason): admitted iff every admission check is PASS; else the first one
    that is not, with its verdict and summary. An uncertain PASS (its 95% interval straddles
    the threshold) admits, and the catalogue records it as uncertain; with ``strict`` it does
    not (the circuit must clear the threshold on the whole interval)."""
    for r in results:
        if r["verdict"] != "PASS":
            return False, f"{r['name']} {r['verdict']}: {r['summary']}"
        if strict and r.get("uncertain"):
            return False, f"{r['name']} PASS (uncertain): {r['summary']}"
    return True, ""


def build_catalog(
    lm: LoadedModel,
    *,
    families: FamilySet,
    out: str | Path,
    reuse: Mapping[str, str | Path] | None = None,
    prune_config: PruneConfig | None = None,
    options: VerifyOptions | None = None,
    scale_windows: int = 8,
    on_task: Callable[[str, str], None] | None = None,
    strict: bool = False,
) -> CatalogDoc:
    """Build ``out/catalog.json`` (circuits pruned here go to ``out/circuits/<task>/``).

    ``reuse``: ``{task: circuit dir}`` of circuits to take instead of pruning (their task and
    model must match). ``on_task(task, stage)`` reports progress ("prune", "check").
    """
    out = Path(out)
    reuse = {k: Path(v) for k, v in (reuse or {}).items()}
    unknown = sorted(set(reuse) - set(families.task_names()))
    if unknown:
        raise ConfigError(f"reused circuit for {unknown[0]!r}: no family lists that task")
    cfg = prune_config or PruneConfig()
    options = options or VerifyOptions()
    entries: dict[str, CircuitEntry] = {}
    kept: dict[str, list] = {}
    for task in families.task_names():
        if task in reuse:
            doc = load_circuit(reuse[task])
            check_model(doc, lm.model, source=str(reuse[task]))
            if doc.task != task:
                raise ConfigError(f"{reuse[task]}: a circuit of {doc.task!r}, not of {task!r}")
            path = reuse[task]
        else:
            if on_task:
                on_task(task, "prune")
            doc, result, trials = find_circuit(lm, task, cfg)
            path = out / "circuits" / task
            save_prune_outputs(path, doc, result, trials)
        if on_task:
            on_task(task, "check")
        results = run_checks(build_context(doc, lm, options), list(ADMISSION_CHECKS))
        ok, reason = admit(results, strict=strict)
        log.info("%s: %s%s", task, "admitted" if ok else "rejected", "" if ok else f" ({reason})")
        entries[task] = CircuitEntry(
            task=task, path=_stored_path(path, out), n_nodes=doc.n_nodes, admitted=ok,
            reason=reason,
            checks={r["name"]: CheckRec(verdict=r["verdict"], summary=r["summary"],
                                        uncertain=bool(r.get("uncertain")))
                    for r in results},
            answers=_answers(lm, task),
        )  # fmt: skip
        kept[task] = [n for n in doc.kept_nodes() if n.loc is not Location.EMBED]
    fams = _family_entries(lm, families, entries, kept, scale_windows)
    doc = CatalogDoc(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model_id=lm.spec,
        weights_hash=lm.hash,
        scale_windows=scale_windows,
        circuits=entries,
        families=fams,
    )
    save_catalog(doc, out)
    return doc


def _family_entries(lm, families, entries, kept, scale_windows) -> dict[str, FamilyEntry]:
    """Per family: the union of its admitted circuits' nodes with their scales and means."""
    unions: dict[str, dict[str, list[int]]] = {}
    for name, fam in families.families.items():
        nodes: dict[str, set[int]] = {}
        for task in fam.tasks:
            if entries[task].admitted:
                for n in kept[task]:
                    nodes.setdefault(n.site, set()).add(n.index)
        unions[name] = {s: sorted(v) for s, v in sorted(nodes.items())}
    all_sites: dict[str, set[int]] = {}
    for u in unions.values():
        for s, idx in u.items():
            all_sites.setdefault(s, set()).update(idx)
    scales: dict[str, torch.Tensor] = {}
    means: dict[str, torch.Tensor] = {}
    if all_sites:
        windows = pretrain_windows(lm.tokenizer, n_windows=scale_windows,
                                   length=lm.model.config.block_size)  # fmt: skip
        width = {s: sorted(v) for s, v in all_sites.items()}
        per_site = benign_scales(lm.model, windows, width)
        space = NodeSpace(lm.model.config)
        mu = load_or_compute_means(lm.model, lm.tokenizer, model_hash=lm.hash,
                                   model_dir=lm.directory)  # fmt: skip
        for s, idx in width.items():
            full = torch.zeros(space.group(*site_location(s)).size)
            full[idx] = per_site[s]
            scales[s] = full
            means[s] = mu[space.group(*site_location(s)).key]
    out = {}
    for name, fam in families.families.items():
        u = unions[name]
        out[name] = FamilyEntry(
            description=fam.description, tasks=list(fam.tasks),
            admitted=[t for t in fam.tasks if entries[t].admitted],
            rejected=[t for t in fam.tasks if not entries[t].admitted],
            n_nodes=sum(len(v) for v in u.values()), nodes=u,
            scale={s: [float(scales[s][i]) for i in idx] for s, idx in u.items()},
            mean={s: [float(means[s][i]) for i in idx] for s, idx in u.items()},
        )  # fmt: skip
    return out


def catalog_dict(doc: CatalogDoc) -> dict:
    data = doc.model_dump(mode="json")
    return {"schema": data.pop("schema_"), **data}


def save_catalog(doc: CatalogDoc, directory: str | Path) -> Path:
    """Write ``directory/catalog.json`` atomically; returns its path."""
    path = Path(directory) / CATALOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, catalog_dict(doc))
    return path


def catalog_path(path: str | Path) -> Path:
    path = Path(path)
    return path / CATALOG_FILE if path.is_dir() else path


def load_catalog(path: str | Path, model: GPT | None = None) -> CatalogDoc:
    """Read a catalogue (file or directory). With ``model``, refuse (CheckpointError, one line)
    unless its weights hash is the catalogue's."""
    path = catalog_path(path)
    data = read_schema_json(path, schema=SCHEMA, what="monitor catalogue")
    try:
        doc = CatalogDoc.model_validate(data)
    except ValidationError as err:
        raise CheckpointError(format_validation_error(err, source=str(path))) from None
    _check_consistent(doc, source=str(path))
    if model is not None:
        have = weights_hash(model)
        if have != doc.weights_hash:
            raise CheckpointError(
                f"{path}: built for model {doc.model_id} (weights sha256 "
                f"{doc.weights_hash[:12]}...), but the given model's weights hash to "
                f"{have[:12]}...; build a catalogue for this model"
            )
        _check_sites(doc, model, source=str(path))
    return doc
