"""Sparse vs dense circuit sizes, as the paper ran its headline comparison (Gao et al. 2025:
circuits in weight-sparse models are ~16x smaller, geometric mean of weight edges over tasks, at
the same target loss).

For every task and model: a random search of pruning configs around one centre config under a
CPU budget per model that is the same for every model; the circuit is judged on the HELD-OUT
test templates (:func:`~sparsecircuits.circuits.compare_stats.reached`); its node order (by
decreasing mask logit tau, trained at the primary target) is re-cut for the other targets with
forward passes only; and the empty circuit (every node ablated) is measured, so a task that
the bigram table, biases and the embedding's direct path decide on their own is flagged. No
task is dropped: the ratios list every task they leave out and why
(:mod:`~sparsecircuits.circuits.compare_stats`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sparsecircuits.circuits.compare_stats import (
    all_ratios,
    pretrain_losses,
    reached,
    target_key,
)
from sparsecircuits.circuits.edges import WEIGHT_KINDS, edge_set
from sparsecircuits.circuits.nodes import NodeSpace
from sparsecircuits.circuits.pipeline import (
    LoadedModel,
    ablation_values,
    find_circuit,
    load_for_circuits,
    task_data,
)
from sparsecircuits.circuits.prune import CircuitEvaluator, PruneConfig, cut_k, gates_for
from sparsecircuits.circuits.report import MASKS_FILE, SEARCH_FILE, save_prune_outputs
from sparsecircuits.circuits.schema import CIRCUIT_FILE, CircuitDoc, load_circuit
from sparsecircuits.errors import CheckpointError, InputError
from sparsecircuits.fileio import atomic_write_json, cache_root, read_json_object
from sparsecircuits.tasks.metrics import calibrated, diff_loss

log = logging.getLogger(__name__)

SCHEMA, VERSION = "sparsecircuits.compare", 2
RESULT_FILE = "compare.json"
KEY_FILE = "compare_key.json"  # beside each circuit: the settings it was found with


@dataclass(frozen=True)
class CompareOptions:
    """How ``compare`` runs; the pruning centre config is passed beside it.

    ``targets``: target losses (nats per prompt) at which to report the ratio besides the
    config's ``target_loss`` (the primary target the masks are trained at; the node order is
    re-cut for the others). ``trials``: search trials per (model, task), the centre first.
    ``budget_per_model_s``: search seconds per model, split evenly over the tasks (a trial
    starts only while its task's share is left, so a task may overrun by one trial).
    ``eval_windows``: held-out windows for the pretraining losses (None: all; 0: skip them).
    ``eval_corpus``: their corpus (None: the sparse model's training corpus). ``dense_matched``:
    a dense model whose held-out loss matches the sparse model's, compared too.
    ``allow_different_tokenizers``: report per-token losses of models with other tokenizers.
    ``cache_dir``: the token cache (None: the package's cache directory)."""

    targets: tuple[float, ...] = ()
    trials: int = 6
    budget_per_model_s: float = 3600.0
    eval_windows: int | None = None
    eval_corpus: str | None = None
    dense_matched: str | None = None
    allow_different_tokenizers: bool = False
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise InputError(f"--trials must be >= 1, got {self.trials}")
        if not (self.budget_per_model_s > 0 and math.isfinite(self.budget_per_model_s)):
            raise InputError(
                f"--budget-per-model must be > 0 seconds, got {self.budget_per_model_s}"
            )
        bad = [t for t in self.targets if not (t > 0 and math.isfinite(t))]
        if bad:
            raise InputError(f"--targets must be positive losses (nats per prompt), got {bad[0]}")
        if self.eval_windows is not None and self.eval_windows < 0:
            raise InputError(f"--eval-windows must be >= 0, got {self.eval_windows}")

    def all_targets(self, cfg: PruneConfig) -> list[float]:
        """Every target, the primary ``cfg.target_loss`` included, ascending."""
        return sorted({*self.targets, cfg.target_loss})


@dataclass
class _Found:
    doc: CircuitDoc
    order: torch.Tensor  # flat node indices by decreasing tau
    n_on: int  # nodes with tau >= 0 (where prune's bisection starts)
    config: PruneConfig  # the winning trial's config
    info: dict[str, Any]  # trials, search_s, wall_s


def compare_models(
    sparse: str,
    dense: str,
    tasks: Sequence[str],
    cfg: PruneConfig,
    *,
    options: CompareOptions | None = None,
    device: str | torch.device = "cpu",
    out: Path | None = None,
    on_task: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Prune every task on every model (see the module docstring) and return the comparison
    (the ``compare.json`` layout of ``docs/circuits.md``).

    With ``out``, each circuit is written to ``out/<model kind>/<task>/`` as it is found and
    reused on a rerun when the model weights, task and search settings match, and
    ``out/compare.json`` is rewritten atomically after every task (``complete`` false until
    the last), so a killed comparison keeps its partial results and resumes where it stopped.
    ``on_task(task, result)`` is called after each task."""
    opts = options or CompareOptions()
    tasks = list(dict.fromkeys(tasks))  # each task once, in the given order
    if not tasks:
        raise InputError("compare needs at least one task")
    targets = opts.all_targets(cfg)
    specs = {"sparse": sparse, "dense": dense}
    if opts.dense_matched is not None:
        specs["dense_matched"] = opts.dense_matched
    lms = {kind: load_for_circuits(spec, device=device) for kind, spec in specs.items()}
    share = opts.budget_per_model_s / len(tasks)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "version": VERSION,
        "complete": False,
        "sparse": sparse,
        "dense": dense,
        "dense_matched": opts.dense_matched,
        "prune_config": cfg.model_dump(mode="json"),
        "target_loss": cfg.target_loss,
        "targets": targets,
        "masks_trained_at": cfg.target_loss,
        "search": {
            "trials_per_task": opts.trials,
            "budget_per_model_s": opts.budget_per_model_s,
            "budget_per_task_s": share,
            "same_for_every_model": True,
        },
        "models": {
            kind: {
                "spec": lm.spec,
                "weights_hash": lm.hash,
                "trials": 0,
                "search_s": 0.0,
                "wall_s": 0.0,
                "tasks_reused": 0,
            }
            for kind, lm in lms.items()
        },
        "pretrain_loss": None,
        "tasks": {},
    }
    if opts.eval_windows == 0:
        result["pretrain_loss"] = {"skipped": "--eval-windows 0"}
    else:  # first: a tokenizer mismatch refuses before any pruning
        result["pretrain_loss"] = pretrain_losses(
            lms,
            corpus=opts.eval_corpus,
            windows=opts.eval_windows,
            cache_dir=opts.cache_dir or cache_root(),
            allow_different_tokenizers=opts.allow_different_tokenizers,
        )
    for i, task in enumerate(tasks):
        row: dict[str, Any] = {}
        for kind, lm in lms.items():
            directory = Path(out) / kind / task if out is not None else None
            row[kind] = measure(lm, task, cfg, targets=targets, trials=opts.trials,
                                budget_s=share, directory=directory)  # fmt: skip
            m = result["models"][kind]
            for key in ("trials", "search_s", "wall_s"):
                m[key] += row[kind][key]
            m["tasks_reused"] += int(row[kind]["reused"])
        result["tasks"][task] = row
        _finish(result, list(lms)[1:], targets, complete=i == len(tasks) - 1)
        if out is not None:
            atomic_write_json(Path(out) / RESULT_FILE, result)
        if on_task is not None:
            on_task(task, result)
    return result


def _finish(result: dict[str, Any], baselines: list[str], targets: list[float], *, complete: bool):
    result["complete"] = complete
    result["ratios"] = all_ratios(result["tasks"], baselines, targets)
    primary = target_key(result["target_loss"])
    result["geomean_ratio"] = result["ratios"]["dense"][primary]["all"]["geomean"]


def measure(
    lm: LoadedModel,
    task: str,
    cfg: PruneConfig,
    *,
    targets: list[float],
    trials: int,
    budget_s: float,
    directory: Path | None = None,
) -> dict[str, Any]:
    """One model's row for one task: the searched circuit (or the one saved in ``directory``
    with the same settings), its size and losses at every target, and the empty circuit's
    test loss. Sizes: nodes, weight edges (``edges.WEIGHT_KINDS``) and all edges."""
    key = {
        "weights_hash": lm.hash,
        "task": task,
        "center": cfg.model_dump(mode="json"),
        "trials": trials,
        "budget_s": budget_s,
    }
    found = _reusable(directory, key) if directory is not None else None
    reused = found is not None
    if found is None:
        t0 = time.perf_counter()
        doc, res, history = find_circuit(lm, task, cfg, trials=trials, budget_s=budget_s)
        info = {
            "trials": len(history),
            "search_s": sum(t.seconds for t in history),
            "wall_s": time.perf_counter() - t0,
        }
        found = _Found(doc, res.order, int((res.tau >= 0).sum()), res.config, info)
        if directory is not None:
            save_prune_outputs(directory, doc, res, history)
            atomic_write_json(directory / KEY_FILE, {"key": key, **info})
    t0 = time.perf_counter()
    at, (empty_train, empty) = _at_targets(lm, task, found, targets)
    doc = found.doc
    log.info("%s on %s: %d weight edges (test loss %.3f)", task, lm.spec, doc.n_weight_edges,
             doc.loss.circuit_test)  # fmt: skip
    return {
        "n_nodes": doc.n_nodes,
        "n_edges": doc.n_edges,
        "n_weight_edges": doc.n_weight_edges,
        "loss_full_test": doc.loss.full_test,
        "loss_train": doc.loss.circuit,
        "loss_test": doc.loss.circuit_test,
        "reached": reached(doc.loss.circuit_test, doc.target_loss),
        "reached_train": doc.loss.circuit <= doc.target_loss,
        "empty_loss_train": empty_train,
        "empty_loss_test": empty,
        "decided_outside": reached(empty, doc.target_loss),
        "at": at,
        **found.info,
        "cut_s": time.perf_counter() - t0,
        "reused": reused,
    }


def _at_targets(
    lm: LoadedModel, task: str, found: _Found, targets: list[float]
) -> tuple[dict[str, dict[str, Any]], tuple[float, float]]:
    """({target key: size and losses of the circuit cut for that target}, the empty circuit's
    (train, test) loss). The primary target is the searched circuit itself; the others bisect
    the same node order as pruning does (fewest top-k nodes whose train loss <= target), then
    judge the test loss. Calibration, when on, is fitted on the train pairs at each k."""
    cfg, doc, order = found.config, found.doc, found.order
    space = NodeSpace(lm.model.config, mask_embed=cfg.mask_embed)
    data = task_data(lm, task, cfg)
    ablation = ablation_values(lm, space, cfg.ablation, data.train_batch)
    ev = CircuitEvaluator(lm.model, space=space, ablation=ablation, frozen_norms=cfg.frozen_norms)
    cals: dict[int, Any] = {}
    seen: dict[int, float] = {}

    def train_loss(k: int) -> float:
        if k not in seen:
            seen[k], cals[k] = ev.loss(data.judge, gates_for(space, order[:k]),
                                       calibration=cfg.calibrate)  # fmt: skip
        return seen[k]

    def test_loss(k: int) -> float:
        train_loss(k)
        gates = gates_for(space, order[:k])
        return diff_loss(calibrated(ev.diffs(data.test, gates), data.test.signs.cpu(), cals[k]))

    empty = test_loss(0)  # and train_loss(0), cached
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        if t == doc.target_loss:  # the circuit the search found
            n, w, e = doc.n_nodes, doc.n_weight_edges, doc.n_edges
            lt, lh = doc.loss.circuit, doc.loss.circuit_test
        else:
            n, _ = cut_k(train_loss, n_on=found.n_on, total=space.total, target=t,
                         max_iters=cfg.max_bisect_iters)  # fmt: skip
            counts = edge_set(lm.model, space, order[:n]).count_by_kind()
            w, e = sum(counts[k] for k in WEIGHT_KINDS), sum(counts.values())
            lt, lh = train_loss(n), test_loss(n)
        out[target_key(t)] = {
            "n_nodes": n,
            "n_weight_edges": w,
            "n_edges": e,
            "loss_train": lt,
            "loss_test": lh,
            "reached": reached(lh, t),
            "reached_train": lt <= t,
            "decided_outside": reached(empty, t),
        }
    return out, (seen[0], empty)


def _reusable(directory: Path, key: dict[str, Any]) -> _Found | None:
    """The circuit saved in ``directory`` by an earlier run with the same ``key`` (model
    weights, task, centre config, trials and budget), or None."""
    paths = [directory / n for n in (CIRCUIT_FILE, MASKS_FILE, SEARCH_FILE, KEY_FILE)]
    if not all(p.is_file() for p in paths):
        return None
    try:
        saved = read_json_object(directory / KEY_FILE)
        if saved.get("key") != key:
            return None
        doc = load_circuit(directory)
        masks = load_file(str(directory / MASKS_FILE))
        config = PruneConfig.from_dict(doc.prune_config, source=str(directory / CIRCUIT_FILE))
    except (CheckpointError, OSError, ValueError, SafetensorError) as err:
        log.warning("not reusing %s: %s", directory, err)
        return None
    if doc.model.weights_hash != key["weights_hash"] or doc.task != key["task"]:
        return None
    missing = [k for k in ("trials", "search_s", "wall_s") if k not in saved]
    missing += [k for k in ("order", "tau") if k not in masks]
    if missing:  # an old or hand-edited folder: prune again rather than fail
        log.warning("not reusing %s: %s lacks %s", directory, KEY_FILE, ", ".join(missing))
        return None
    log.info("reusing %s", directory / CIRCUIT_FILE)
    info = {k: saved[k] for k in ("trials", "search_s", "wall_s")}
    return _Found(doc, masks["order"], int((masks["tau"] >= 0).sum()), config, info)
