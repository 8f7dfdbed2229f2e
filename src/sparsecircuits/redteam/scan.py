"""``sparsecircuits scan``: load a model with its circuit catalogue, baseline and policy, search
one family with one objective, write what was found.

Output directory: ``hits.jsonl`` (one line per distinct hit: span, prompt, scores,
constraints), ``trajectory.jsonl`` (the best candidate after each step), ``scan.json`` (the
run: seed, budget, mode, template, model/catalogue/policy hashes, counts, time), and the same
attempts as red teams read them: garak's ``report.jsonl`` and ``hitlog.jsonl`` with a Markdown
and an HTML summary (:mod:`sparsecircuits.redteam.report`). A report attempt's output is the
model's greedy continuation of its prompt (``OUTPUT_TOKENS`` tokens; for evade, the kept target
and the text after it, which the search scored), and the circuit detector's score is 1 when the
monitor's flag rule fires on the text the search scored: the prompt, or for evade the prompt
and that output (as garak's detectors score prompt + output).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsecircuits.audit.records import now_iso
from sparsecircuits.errors import InputError
from sparsecircuits.fileio import atomic_write_bytes, atomic_write_json
from sparsecircuits.redteam.objective import CircuitObjective, Measure, Objective
from sparsecircuits.redteam.search import Mode, Searcher, SearchResult
from sparsecircuits.redteam.template import Template, load_template

SCHEMA = "sparsecircuits.redteam.scan/1"
OUTPUT_TOKENS = 8  # greedy continuation shown with each reported attempt
MAX_REPORTED = 200  # attempts in the garak report: the hits first, then the trajectory


@dataclass(frozen=True)
class Monitor:
    """What a scan attacks: the model, its catalogue's family nodes, baseline, flag rule."""

    model: Any
    tokenizer: Any
    catalog: Any
    baseline: Any
    rules: dict[str, Any]  # family -> its FlagRules (the policy's, else the baseline's)
    hashes: dict[str, str]


def load_monitor(model_dir: Path, catalog: Path, *, policy: Path | None = None) -> Monitor:
    """The model at ``model_dir`` and the catalogue at ``catalog`` with the baseline beside
    it; ``policy`` (optional) gives each family's flag rule."""
    from sparsecircuits.data import Tokenizer
    from sparsecircuits.interop.download import file_sha256
    from sparsecircuits.model.io import load_model, weights_hash
    from sparsecircuits.monitor.calibrate import BASELINE_FILE, load_baseline
    from sparsecircuits.monitor.catalog import catalog_path, load_catalog
    from sparsecircuits.monitor.policy import load_policy

    m = load_model(model_dir, device="cpu").eval()
    path = catalog_path(catalog)
    cat = load_catalog(path, m)
    base = load_baseline(path.parent / BASELINE_FILE, catalog_sha256=file_sha256(path))
    # Each family's flag rules, as the server applies them: the policy's (a family it has no
    # rule for is never flagged), else the baseline's default.
    rules: dict[str, list] = {f: [base.flag] for f in cat.monitored()}
    hashes = {"weights_hash": weights_hash(m), "catalog_sha256": file_sha256(path),
              "baseline_sha256": file_sha256(path.parent / BASELINE_FILE)}  # fmt: skip
    if policy is not None:
        pol = load_policy(policy, families=cat.monitored())
        rules = {f: [] for f in cat.monitored()}
        for r in pol.rules(base.flag):
            rules[r.family].append(r.flag)
        hashes["policy_sha256"] = pol.sha256
    return Monitor(m, Tokenizer.load(model_dir), cat, base, rules, hashes)


BENIGN_WINDOWS = 16  # held-out windows of the context length, as the baseline was calibrated


def benign_max_quantiles(mon: Monitor, obj: CircuitObjective, width: int) -> tuple[float, float]:
    """(p50, p99) of the largest value of ``obj``'s measure (the family's engagement, or its
    causal share) over ``width`` consecutive positions of benign text (every start in the
    held-out windows the baseline uses): what a hit is compared with, statistic for
    statistic. Cached per model, catalogue, family, measure and width."""
    # keyed by the weights (their hash; else the object, for monitors built by hand) and the
    # catalogue: two models in one process differ, and a freed model's address may be reused
    model_key = mon.hashes.get("weights_hash") or id(mon.model)
    key = (model_key, mon.hashes.get("catalog_sha256"), obj.family.name, obj.measure, width)
    if key not in _BENIGN:
        import numpy as np
        import torch

        from sparsecircuits.circuits.means import pretrain_windows

        block = mon.model.config.block_size
        w = pretrain_windows(mon.tokenizer, n_windows=BENIGN_WINDOWS, length=block)
        with torch.no_grad():
            _, eng = obj._run(mon.model.embed(w), w, detach=True)
            e = obj._measured(eng)
            if obj.measure == "causal_share":
                e = e[:, 1:]  # position 0 predicts nothing (its share is -inf)
        maxima = e.unfold(1, width, 1).amax(-1).flatten().double().numpy()
        _BENIGN[key] = (float(np.quantile(maxima, 0.5)), float(np.quantile(maxima, 0.99)))
    return _BENIGN[key]


_BENIGN: dict[tuple, tuple[float, float]] = {}


def scan(
    mon: Monitor,
    *,
    family: str,
    objective: Objective,
    template: Template | None = None,
    mode: Mode = "gcg",
    budget: int = 512,
    seed: int = 0,
    batch: int = 64,
    topk: int = 64,
    measure: Measure = "engagement",
) -> tuple[Searcher, SearchResult]:
    """One seeded search; ``template`` None: the family's default; ``measure``: what engage
    and suppress drive (the family's engagement, or its causal share)."""
    if family not in mon.rules:
        known = ", ".join(sorted(mon.rules)) or "none"
        raise InputError(f"--family {family!r}: not in the catalogue (monitored: {known})")
    t = template or load_template(None, family=family)
    obj = CircuitObjective(mon.model, mon.catalog.family_nodes(family), mon.baseline,
                           objective=objective, rules=mon.rules[family],
                           min_target_prob=t.min_target_prob, measure=measure)  # fmt: skip
    searcher = Searcher(obj, mon.tokenizer, t, batch=batch, topk=topk)
    if objective != "evade":
        lay = searcher.layout
        obj.benign_max = benign_max_quantiles(mon, obj, lay.length - lay.span_lo)
    return searcher, searcher.run(mode=mode, budget=budget, seed=seed)


def write_scan(out: Path, searcher: Searcher, res: SearchResult, *, run: dict[str, Any]) -> dict:
    """Write the scan's files to ``out``; returns the ``scan.json`` document."""
    t = searcher.t

    def line(f) -> dict[str, Any]:  # prompt: what is sent; text: all the monitor read
        return {**dataclasses.asdict(f), "prompt": t.prefix + f.span + t.suffix,
                "text": t.text(f.span)}  # fmt: skip

    for name, rows in (("hits.jsonl", res.hits), ("trajectory.jsonl", res.trajectory)):
        atomic_write_bytes(out / name, "".join(json.dumps(line(f)) + "\n" for f in rows).encode())
    doc = {
        "schema": SCHEMA,
        "run_id": str(uuid.uuid4()),
        "started": now_iso(),
        **run,
        "template": t.model_dump(),
        "threshold": None if searcher.obj.objective == "evade" else searcher.obj.threshold(),
        "rules": [r.model_dump() for r in searcher.obj.rules],
        "evaluations": res.evaluations,
        "seconds": res.seconds,
        "hits": len(res.hits),
        "best": line(res.best),
    }
    atomic_write_json(out / "scan.json", doc)
    _garak(out, searcher, res, doc)
    return doc


def _garak(out: Path, searcher: Searcher, res: SearchResult, doc: dict[str, Any]) -> None:
    """The hits and the trajectory as a garak report (hits first, then the path there)."""
    import torch

    from sparsecircuits.redteam.report import Attempt, RunInfo, write_reports

    t, model, tok = searcher.t, searcher.obj.model, searcher.tok
    seen, chosen = set(), []
    for f in [*res.hits, *res.trajectory]:
        if f.span_ids not in seen and len(chosen) < MAX_REPORTED:
            seen.add(f.span_ids)
            chosen.append(f)
    attempts = []
    for seq, f in enumerate(chosen):
        if searcher.obj.objective == "evade":  # the output the search kept and scored
            output = (t.target or "") + t.after
        else:
            ids = searcher.ids(torch.tensor([f.span_ids]))[:, : searcher.layout.tgt]  # prompt
            room = model.config.block_size - ids.shape[1]
            with torch.no_grad():
                cont = model.generate(ids, max_new_tokens=max(0, min(OUTPUT_TOKENS, room)),
                                      temperature=0)  # fmt: skip
            output = tok.decode(cont[0, ids.shape[1] :].tolist())
        attempts.append(Attempt(
            seq=seq, prompt=t.prefix + f.span + t.suffix, span=f.span, outputs=[output],
            scores={f"circuit.{doc['family']}": 1.0 if f.flagged else 0.0},
            objective_value=f.loss, hit=f.hit,
            constraints={"fluency": f.fluent, "forbidden_strings": f.forbidden_ok,
                         "retokenizes": f.retokenizes,
                         **({} if f.python_valid is None else {"python_valid": f.python_valid})},
        ))  # fmt: skip
    run = RunInfo(run_id=doc["run_id"], started=doc.get("started", ""), seed=doc["seed"],
                  family=doc["family"], objective=doc["objective"], mode=doc["mode"],
                  budget=doc["budget"], model=doc["model"], hashes=doc["hashes"],
                  template=doc["template"], version=doc["version"],
                  measure=doc.get("measure", "engagement"))  # fmt: skip
    write_reports(out, run, attempts)
