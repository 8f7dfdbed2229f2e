"""Does circuit telemetry detect code-structure injections, and how does it compare with dense
residual probes and a lexical baseline? One table: AUROC and TPR at 1% FPR on the test split,
with stratified bootstrap 95% CIs (test items resampled, seeded).

Data: ``monitor.attacks`` (benign snippets vs snippets whose string literal or bracket is closed
early by an embedded payload; train/test use disjoint host templates and payloads; half benign).
Detectors, every one scored per item (higher = more likely an attack):

(a) family engagement: max over the item's tokens of the family's engagement (the robust z
    is a monotone transform of it, so its AUROC and TPR are the same); every monitored family,
    and the family with the best train AUROC. With a baseline, also the monitor's own flag rule
    (z > z_threshold on >= k of the last n tokens, anywhere in the item) as an operating point.
(b) dense L2 logistic-regression probes on the residual stream (``{L}.resid_mid``,
    ``final_resid``), mean-pooled over the item's tokens or at its last token: the best single
    site and the L2 strength chosen by 2-fold cross-validation over the *train* templates (fit
    on half the templates, score the other half), and all sites concatenated. scikit-learn is
    not a dependency: the regression is ``monitor.detect_metrics.fit_logistic`` (torch L-BFGS).
(c) lexical: the count of quote, bracket, ``;`` and ``#`` characters (no training), and a
    logistic regression on hashed character 1-3-gram counts (L2 by the same cross-validation).

Items longer than the context keep their last ``block_size`` tokens (the count is printed).

    python benchmarks/monitor_detect.py --catalog runs/monitor [--model stdlib-sparse]
        [--baseline CAT/baseline.json] [--n-train 2000] [--n-test 2000] [--seed 0]
        [--boot 1000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparsecircuits.circuits.pipeline import load_for_circuits
from sparsecircuits.model.hooks import Hooks
from sparsecircuits.monitor.attacks import DetectItem, detection_splits
from sparsecircuits.monitor.calibrate import (
    BASELINE_FILE,
    BaselineDoc,
    FlagRule,
    KOfN,
    load_baseline,
)
from sparsecircuits.monitor.catalog import CatalogDoc, load_catalog
from sparsecircuits.monitor.detect_metrics import (
    Estimate,
    auroc,
    bootstrap,
    fit_logistic,
    tpr_at_fpr,
)
from sparsecircuits.monitor.policy import load_policy
from sparsecircuits.monitor.scores import FamilyNodes, engagement

L2_GRID = (1e-3, 1e-1, 10.0)  # per standardised feature unit; chosen by template CV on train
NGRAM_BUCKETS = 4096
LEXICAL_CHARS = set("\"'()[]{};#")


@dataclass
class Features:
    """Per item of one split: per-token engagement of each family (list of (T_i,) arrays) and
    residual features per ``(site, pooling)`` (n, d_model) float32."""

    eng: dict[str, list[np.ndarray]] = field(default_factory=dict)
    resid: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=dict)
    truncated: int = 0

    def matrix(self, key: tuple[str, str]) -> np.ndarray:
        return np.stack(self.resid[key])


@torch.no_grad()
def extract(lm, fams: dict[str, FamilyNodes], items: list[DetectItem], batch: int) -> Features:
    """One forward pass per batch records the families' sites and the residual sites."""
    model, tok = lm.model, lm.tokenizer
    block, n_layer = model.config.block_size, model.config.n_layer
    resid_sites = [f"{i}.resid_mid" for i in range(n_layer)] + ["final_resid"]
    fam_sites = sorted({s for f in fams.values() for s in f.sites})
    feats = Features({n: [] for n in fams})
    for s in resid_sites:
        feats.resid[(s, "mean")], feats.resid[(s, "last")] = [], []
    ids = [tok.encode(it.text) for it in items]
    feats.truncated = sum(len(x) > block for x in ids)
    ids = [x[-block:] for x in ids]  # keep the end: the host line and any payload
    # Sorted by length so a batch pads little; right padding leaves a causal model's real
    # positions unchanged, and every statistic below reads real positions only.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out_eng: dict[str, dict[int, np.ndarray]] = {n: {} for n in fams}
    out_res: dict[tuple[str, str], dict[int, np.ndarray]] = {k: {} for k in feats.resid}
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        t_max = max(len(ids[i]) for i in chunk)
        x = torch.zeros(len(chunk), t_max, dtype=torch.long)
        for row, i in enumerate(chunk):
            x[row, : len(ids[i])] = torch.tensor(ids[i])
        hooks = Hooks(cache_names=fam_sites + resid_sites)
        model(x, hooks=hooks)
        e = {n: engagement(hooks.cache, f).numpy() for n, f in fams.items()}  # (B, T)
        for row, i in enumerate(chunk):
            n = len(ids[i])
            for name in fams:
                out_eng[name][i] = e[name][row, :n].astype(np.float64)
            for s in resid_sites:
                a = hooks.cache[s][row, :n].float()
                out_res[(s, "mean")][i] = a.mean(0).numpy()
                out_res[(s, "last")][i] = a[-1].numpy()
    for name in fams:
        feats.eng[name] = [out_eng[name][i] for i in range(len(items))]
    for key in feats.resid:
        feats.resid[key] = [out_res[key][i] for i in range(len(items))]
    return feats


def flag_rule(
    eng: list[np.ndarray], baseline: BaselineDoc, family: str, rule: FlagRule | None = None
) -> np.ndarray:
    """1.0 where a k-of-n rule (default: the baseline's) fires on any token of the item."""
    rule = rule or baseline.flag
    out = np.zeros(len(eng))
    for i, e in enumerate(eng):
        z = baseline.z(family, torch.from_numpy(e)).tolist()
        counter = KOfN(k=rule.k, n=rule.n)
        out[i] = float(any([counter.push(v > rule.z) for v in z]))
    return out


def ngrams(texts: list[str]) -> np.ndarray:
    """log1p counts of character 1-3-grams hashed (crc32: stable across runs) into buckets."""
    x = np.zeros((len(texts), NGRAM_BUCKETS))
    for row, t in enumerate(texts):
        for n in (1, 2, 3):
            for j in range(len(t) - n + 1):
                x[row, zlib.crc32(t[j : j + n].encode()) % NGRAM_BUCKETS] += 1
    return np.log1p(x)


def cv_auroc(x: np.ndarray, y: np.ndarray, groups: list[str], l2: float) -> float:
    """Mean AUROC of 2-fold cross-validation with folds by template (no template in both)."""
    names = sorted(set(groups))
    fold = np.array([names.index(g) % 2 for g in groups])
    scores = []
    for f in (0, 1):
        tr, va = fold != f, fold == f
        if len(set(y[va])) < 2 or len(set(y[tr])) < 2:
            continue
        scores.append(auroc(fit_logistic(x[tr], y[tr], l2=l2).decision(x[va]), y[va]))
    return float(np.mean(scores)) if scores else 0.5


def probe(
    xtr: np.ndarray, ytr: np.ndarray, groups: list[str], xte: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """(test scores, chosen l2, its CV AUROC): l2 by template CV on train, refit on all train."""
    cv = {l2: cv_auroc(xtr, ytr, groups, l2) for l2 in L2_GRID}
    l2 = max(cv, key=lambda k: cv[k])
    return fit_logistic(xtr, ytr, l2=l2).decision(xte), l2, cv[l2]


@dataclass(frozen=True)
class Row:
    method: str
    detail: str
    auroc: Estimate | None
    tpr: Estimate | None
    fpr: Estimate | None = None  # operating points only


def score_row(method: str, detail: str, s: np.ndarray, y: np.ndarray, args) -> Row:
    tpr: Callable = lambda a, b: tpr_at_fpr(a, b, 0.01)  # noqa: E731
    return Row(method, detail, bootstrap(auroc, s, y, n_boot=args.boot, seed=args.seed),
               bootstrap(tpr, s, y, n_boot=args.boot, seed=args.seed))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stdlib-sparse")
    ap.add_argument("--catalog", required=True, help="catalogue directory or catalog.json")
    ap.add_argument("--baseline", help="baseline.json (default: the catalogue directory's)")
    ap.add_argument("--policy", help="also judge each rule of this policy (its z, k and n)")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    lm = load_for_circuits(args.model)
    cat: CatalogDoc = load_catalog(args.catalog, lm.model)
    cat_dir = Path(args.catalog) if Path(args.catalog).is_dir() else Path(args.catalog).parent
    bpath = Path(args.baseline) if args.baseline else cat_dir / BASELINE_FILE
    baseline = load_baseline(bpath) if bpath.exists() else None
    fams = {n: cat.family_nodes(n) for n in cat.monitored()}
    if not fams:
        raise SystemExit(f"{args.catalog}: no family has an admitted circuit")
    data = detection_splits(n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    tr, te = data["train"], data["test"]
    ytr = np.array([it.label for it in tr])
    yte = np.array([it.label for it in te])
    groups = [it.template for it in tr]
    ftr = extract(lm, fams, tr, args.batch)
    fte = extract(lm, fams, te, args.batch)
    rows: list[Row] = []

    # (a) family engagement: max over tokens.
    mtr = {n: np.array([e.max() for e in ftr.eng[n]]) for n in fams}
    mte = {n: np.array([e.max() for e in fte.eng[n]]) for n in fams}
    train_auc = {n: auroc(mtr[n], ytr) for n in fams}
    best = max(train_auc, key=lambda n: train_auc[n])
    rows.append(score_row("engagement, best family", f"{best} (train AUROC "
                          f"{train_auc[best]:.3f})", mte[best], yte, args))  # fmt: skip
    for n in fams:
        rows.append(score_row("engagement", n, mte[n], yte, args))
    if baseline is not None:
        # the baseline's default rule per family, then (with --policy) each policy rule
        rules = [("flag rule", n, baseline.flag) for n in fams]
        if args.policy is not None:
            policy = load_policy(args.policy, families=fams)
            rules += [(f"policy {r.name}", r.family, r.flag) for r in policy.rules(baseline.flag)]
        rate = lambda lab: lambda s, y: float(s[y == lab].mean())  # noqa: E731
        for label, n, rule in rules:
            flags = flag_rule(fte.eng[n], baseline, n, rule)
            rows.append(Row(
                label, f"{n}: z>{rule.z:g}, {rule.k} of {rule.n}", None,
                bootstrap(rate(1), flags, yte, n_boot=args.boot, seed=args.seed),
                bootstrap(rate(0), flags, yte, n_boot=args.boot, seed=args.seed),
            ))  # fmt: skip

    # (b) dense probes: best single site per pooling (template CV on train), all concatenated.
    for pool in ("mean", "last"):
        keys = [k for k in ftr.resid if k[1] == pool]
        cv = {}
        for k in keys:
            x = ftr.matrix(k)
            cv[k] = max((cv_auroc(x, ytr, groups, l2), l2) for l2 in L2_GRID)
        k = max(cv, key=lambda key: cv[key])
        s = fit_logistic(ftr.matrix(k), ytr, l2=cv[k][1]).decision(fte.matrix(k))
        cvs = ", ".join(f"{kk[0]} {v[0]:.3f}" for kk, v in cv.items())
        print(f"probe CV AUROC on train ({pool}): {cvs}")
        detail = f"{k[0]} (l2 {cv[k][1]:g}, CV {cv[k][0]:.3f})"
        rows.append(score_row(f"probe, best site, {pool}", detail, s, yte, args))
        xtr = np.concatenate([ftr.matrix(k) for k in keys], axis=1)
        xte = np.concatenate([fte.matrix(k) for k in keys], axis=1)
        s, l2, c = probe(xtr, ytr, groups, xte)
        detail = f"{xtr.shape[1]} features (l2 {l2:g}, CV {c:.3f})"
        rows.append(score_row(f"probe, all sites, {pool}", detail, s, yte, args))

    # (c) lexical baselines.
    count = lambda items: np.array([sum(c in LEXICAL_CHARS for c in it.text) for it in items])  # noqa: E731
    rows.append(score_row("lexical, char count", "quotes, brackets, ; and #", count(te), yte,
                          args))  # fmt: skip
    s, l2, c = probe(ngrams([it.text for it in tr]), ytr, groups,
                     ngrams([it.text for it in te]))  # fmt: skip
    rows.append(score_row("lexical, char 1-3-gram LR", f"l2 {l2:g}, CV {c:.3f}", s, yte, args))

    print_table(args, cat, baseline, data, ftr, fte, rows)
    if args.json:
        Path(args.json).write_text(json.dumps([row_json(r) for r in rows], indent=1))


def row_json(r: Row) -> dict:
    est = lambda e: None if e is None else [e.value, e.lo, e.hi]  # noqa: E731
    return {"method": r.method, "detail": r.detail, "auroc": est(r.auroc),
            "tpr_at_1pct_fpr": est(r.tpr), "fpr": est(r.fpr)}  # fmt: skip


def print_table(args, cat, baseline, data, ftr, fte, rows: list[Row]) -> None:
    print(f"\nmodel {args.model}; catalogue {args.catalog} (families: "
          f"{', '.join(cat.monitored())}); baseline {'yes' if baseline else 'none'}")  # fmt: skip
    for split, f in (("train", ftr), ("test", fte)):
        items = data[split]
        n_pos = sum(it.label for it in items)
        print(f"{split}: n {len(items)} ({len(items) - n_pos} benign, {n_pos} attack), "
              f"{len({it.template for it in items})} host templates, "
              f"{f.truncated} truncated to the context")  # fmt: skip
    print(f"test-split metrics, stratified bootstrap 95% CIs ({args.boot} resamples, seed "
          f"{args.seed}); TPR at 1% FPR (flag rule: its own TPR and FPR)\n")  # fmt: skip
    w = max(len(r.method) for r in rows)
    d = max(len(r.detail) for r in rows)
    print(f"{'method':<{w}}  {'detail':<{d}}  {'AUROC [95% CI]':<22}  {'TPR@1%FPR [95% CI]':<22}")
    for r in rows:
        auc = r.auroc.fmt() if r.auroc else "-"
        tpr = r.tpr.fmt() if r.tpr else "-"
        extra = f"  (FPR {r.fpr.fmt()})" if r.fpr else ""
        print(f"{r.method:<{w}}  {r.detail:<{d}}  {auc:<22}  {tpr:<22}{extra}")


if __name__ == "__main__":
    main()
