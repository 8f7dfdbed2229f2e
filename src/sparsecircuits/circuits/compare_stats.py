"""The verdicts and numbers of ``compare`` (:mod:`sparsecircuits.circuits.compare`): when a
circuit reaches its target, the dense / sparse ratios with the tasks left out and why, and both
models' pretraining losses on the same held-out files.

Losses: task losses in nats per prompt (``docs/tasks.md``), pretraining losses in nats per token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sparsecircuits.circuits.prune import geometric_mean
from sparsecircuits.errors import InputError

log = logging.getLogger(__name__)

TRAIN_CONFIG_FILE = "train_config.json"  # beside a shipped model, or in a run above model/


def reached(loss_test: float, target: float) -> bool:
    """The one criterion of the comparison: a circuit reaches ``target`` (nats per prompt) when
    its loss on the HELD-OUT test templates is at most ``target``. The train-template loss
    (which the node count was bisected on) is reported beside it, never judged."""
    return loss_test <= target


def target_key(target: float) -> str:
    """The JSON key of a target loss: ``0.15`` -> ``"0.15"``."""
    return f"{target:g}"


def edge_ratio(sparse_edges: int, dense_edges: int) -> float:
    """Dense / sparse weight edges; a count of 0 is taken as 1 so every ratio and its logarithm
    stay defined (a circuit with no weight edge is as small as one with a single edge)."""
    return max(1, dense_edges) / max(1, sparse_edges)


def ratio_summary(
    tasks: dict[str, dict[str, Any]], baseline: str, target: str, *, without_flagged: bool
) -> dict[str, Any]:
    """The geometric-mean ratio ``baseline`` / sparse weight edges at ``target`` (a
    :func:`target_key`) over every task that both models reach on the test templates, with
    every other task listed under ``excluded`` with its reason (no task is left out silently).
    ``without_flagged`` also excludes tasks that the empty circuit of either model already
    reaches ("decided outside the node space": the bigram table, biases and the token
    embedding's direct path to the logits, which no node gates without ``mask_embed``)."""
    ratios: dict[str, float] = {}
    excluded: dict[str, str] = {}
    for name, row in tasks.items():
        s, d = row["sparse"]["at"][target], row[baseline]["at"][target]
        missed = [kind for kind, p in (("sparse", s), (baseline, d)) if not p["reached"]]
        flagged = [kind for kind, p in (("sparse", s), (baseline, d)) if p["decided_outside"]]
        if missed:
            excluded[name] = "missed by " + ("both" if len(missed) == 2 else missed[0])
        elif without_flagged and flagged:
            excluded[name] = f"decided outside the node space on {' and '.join(flagged)}"
        else:
            ratios[name] = edge_ratio(s["n_weight_edges"], d["n_weight_edges"])
    return {
        "geomean": geometric_mean(list(ratios.values())) if ratios else None,
        "n_tasks": len(ratios),
        "ratios": ratios,
        "excluded": excluded,
    }


def all_ratios(
    tasks: dict[str, dict[str, Any]], baselines: list[str], targets: list[float]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{baseline: {target: {"all": summary, "without_flagged": summary}}}`` of
    :func:`ratio_summary` for every baseline model kind and target."""
    return {
        b: {
            target_key(t): {
                "all": ratio_summary(tasks, b, target_key(t), without_flagged=False),
                "without_flagged": ratio_summary(tasks, b, target_key(t), without_flagged=True),
            }
            for t in targets
        }
        for b in baselines
    }


# ------------------------------------------------------------------ pretraining (held-out) loss
def training_data(model_dir: Path) -> tuple[str, float] | None:
    """(corpus spec, val_fraction) a model was trained on, from the ``train_config.json`` beside
    it (shipped models) or in the run directory above ``model/``; None when there is none."""
    for path in (model_dir / TRAIN_CONFIG_FILE, model_dir.parent / TRAIN_CONFIG_FILE):
        if path.is_file():
            from sparsecircuits.train.config import TrainConfig

            cfg = TrainConfig.from_json_file(path)
            return cfg.corpus, cfg.val_fraction
    return None


def check_tokenizers(fingerprints: dict[str, str], *, allow_different: bool) -> bool:
    """Whether every model shares the sparse model's tokenizer. If not, losses per token are
    not comparable: refuse (InputError) unless ``allow_different``."""
    same = len(set(fingerprints.values())) == 1
    if not same and not allow_different:
        differ = ", ".join(k for k, v in fingerprints.items() if v != fingerprints["sparse"])
        raise InputError(
            f"the {differ} model's tokenizer differs from the sparse model's, so their "
            "pretraining losses per token are not comparable; pass "
            "--allow-different-tokenizers to print them anyway"
        )
    return same


def pretrain_losses(
    lms: dict[str, Any],
    *,
    corpus: str | None,
    windows: int | None,
    cache_dir: Path,
    allow_different_tokenizers: bool = False,
) -> dict[str, Any]:
    """Every model's next-token loss (nats/token) on the held-out files of one corpus: the
    sparse model's training corpus (or ``corpus``), split with its ``val_fraction``, each model
    through :func:`sparsecircuits.train.metrics.heldout_loss` (what ``eval-loss`` and the model
    cards call) on the first ``windows`` windows of block_size + 1 tokens (None: every window).

    ``lms``: ``{kind: LoadedModel}`` with ``"sparse"`` first. The token cache under
    ``cache_dir`` is the one training uses; the losses themselves are never cached."""
    from sparsecircuits.data import build_token_cache, load_corpus
    from sparsecircuits.train.metrics import heldout_loss

    fps = {kind: lm.tokenizer.fingerprint() for kind, lm in lms.items()}
    same = check_tokenizers(fps, allow_different=allow_different_tokenizers)
    found = training_data(lms["sparse"].directory)
    if corpus is None and found is None:
        raise InputError(
            f"{lms['sparse'].directory}: no {TRAIN_CONFIG_FILE} to name the training corpus; "
            "give --eval-corpus (or --eval-windows 0 to skip the pretraining losses)"
        )
    spec = corpus if corpus is not None else found[0]  # type: ignore[index]
    val_fraction = found[1] if found is not None else 0.02
    c = load_corpus(spec, val_fraction=val_fraction)
    out: dict[str, Any] = {
        "corpus": spec,
        "val_fraction": val_fraction,
        "val_files": len(c.val),
        "same_tokenizer": same,
        "unit": "nats/token",
        "models": {},
    }
    for kind, lm in lms.items():
        log.info("held-out loss of %s on %s (token cache in %s)", kind, spec, cache_dir)
        _, val = build_token_cache(c, lm.tokenizer, cache_dir=cache_dir / "tokens")
        dev = next(lm.model.parameters()).device
        ev = heldout_loss(lm.model, val, windows=windows, device=dev)
        out["models"][kind] = {
            "val_loss": ev["val_loss"],
            "windows": ev["val_tokens"] // lm.model.config.block_size,
            "windows_available": val.num_windows(lm.model.config.block_size + 1),
            "tokens": ev["val_tokens"],
        }
    return out
