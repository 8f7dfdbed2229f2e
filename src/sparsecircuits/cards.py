"""Export a finished training run as a shipped model with a model card.

``export_run`` writes a compact copy of the run's final model (indices + values), verifies it
against the original, measures validation loss on every held-out window and the 20-task table,
and writes ``card.json`` plus a human-readable ``README.md`` (the model card) beside it.
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsecircuits.data import Tokenizer, TokenStore, build_token_cache, load_corpus
from sparsecircuits.fileio import atomic_dir, atomic_write_bytes, atomic_write_json
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import (
    SPARSITY_FILE,
    load_model,
    read_sparsity,
    save_model,
    weights_hash,
)
from sparsecircuits.model.summary import model_summary
from sparsecircuits.train.metrics import MetricsLog, heldout_loss
from sparsecircuits.train.trainer import (
    CONFIG_FILE,
    METRICS_FILE,
    default_cache_dir,
    read_run_config,
)


def machine_description() -> str:
    """CPU model, core count, OS and library versions of this machine."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def export_run(
    run_dir: str | Path,
    dest: str | Path,
    *,
    name: str,
    description: str,
    fp16: Collection[str] = (),
    n_pairs: int = 50,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Write the shipped model ``dest`` from training run ``run_dir``; returns the card dict."""
    from sparsecircuits.circuits.means import MEANS_FILE, load_or_compute_means, save_means
    from sparsecircuits.tasks import evaluate_tasks  # tasks sit above model/train

    run_dir, dest = Path(run_dir), Path(dest)
    cfg = read_run_config(run_dir)
    model = load_model(run_dir / "model")
    tok = Tokenizer.load(run_dir / "model")
    sparsity = read_sparsity(run_dir / "model")

    with atomic_dir(dest) as tmp:
        save_model(model, tmp, compact=True, fp16=fp16)
        tok.save(tmp)
        if (run_dir / "model" / SPARSITY_FILE).exists():
            shutil.copyfile(run_dir / "model" / SPARSITY_FILE, tmp / SPARSITY_FILE)
        shutil.copyfile(run_dir / CONFIG_FILE, tmp / CONFIG_FILE)  # train_config.json
        shutil.copyfile(run_dir / METRICS_FILE, tmp / METRICS_FILE)
        shipped = load_model(tmp)

        corpus = load_corpus(cfg.corpus, val_fraction=cfg.val_fraction)
        cache = (cache_dir or default_cache_dir()) / "tokens"
        _, val = build_token_cache(corpus, tok, cache_dir=cache)
        ev = heldout_loss(shipped, val, device=torch.device("cpu"))  # every held-out window
        diff = _max_logit_diff(model, shipped, val)
        tasks = evaluate_tasks(shipped, tok, n_pairs=n_pairs, seed=0)
        # Pretraining means for mean ablation ship with the model, so pruning starts at once.
        h = weights_hash(shipped)
        means = load_or_compute_means(shipped, tok, model_hash=h, corpus=cfg.corpus)
        save_means(means, tmp / MEANS_FILE, model_hash=h)
        records = MetricsLog(run_dir / METRICS_FILE).read()
        last = records[-1] if records else {}
        card = {
            "name": name,
            "description": description,
            "reproduce": [
                f"sparsecircuits train --config src/sparsecircuits/pretrained/{name}/"
                f"train_config.json --out runs/{name}",
                f"sparsecircuits export runs/{name} --name {name}"
                + "".join(f" --fp16 {t}" for t in fp16),
            ],
            "data": {
                "corpus": cfg.corpus,
                "train_files": len(corpus.train),
                "val_files": len(corpus.val),
                "skipped_files": corpus.skipped,
                "val_tokens": ev["val_tokens"],
                "tokenizer": f"byte-level BPE, {tok.vocab_size} tokens",
            },
            "training": {
                "steps": last.get("step"),
                "tokens_seen": last.get("tokens"),
                "wall_clock_s": last.get("elapsed_s"),
                "machine": machine_description(),
            },
            "val_loss": ev["val_loss"],
            "val_loss_unit": "nats/token, every full 257-token window of the held-out files",
            "dead_neurons": ev["dead_neurons"],
            "storage": {
                "format": "indices + values for tensors <= 25% dense, fp32 unless listed",
                "fp16": sorted(fp16),
                "bytes": (tmp / "model.safetensors").stat().st_size,
                "max_abs_logit_diff_vs_fp32_original": diff,
            },
            "sparsity": sparsity,
            "summary": model_summary(shipped, sparsity=sparsity),
            "tasks": tasks,
            "task_loss_unit": "two-token contrast cross-entropy, mean per prompt (paper x 1/2)",
        }
        atomic_write_json(tmp / "card.json", card)
        atomic_write_bytes(tmp / "README.md", render_card(card).encode())
    return card


@torch.no_grad()
def _max_logit_diff(a: GPT, b: GPT, val: TokenStore) -> float:
    """Largest |logit| difference between two models on 8 validation windows."""
    windows = list(val.iter_windows(a.config.block_size + 1, max_windows=8))
    x = torch.from_numpy(np.stack(windows))[:, :-1]
    return float((a(x)[0] - b(x)[0]).abs().max())


def render_card(card: dict[str, Any]) -> str:
    """The model card as Markdown."""
    s = card["summary"]
    cfg = s["config"]
    tr = card["training"]
    lines = [
        f"# {card['name']}",
        "",
        card["description"],
        "",
        "## Reproduce",
        "",
        "```bash",
        *card["reproduce"],
        "```",
        "",
        "## Model",
        "",
        f"- {cfg['n_layer']} layers, d_model {cfg['d_model']}, {cfg['n_head']} heads of "
        f"{cfg['d_head']}, d_mlp {cfg['d_mlp'] or 4 * cfg['d_model']}, context "
        f"{cfg['block_size']}, vocab {cfg['vocab_size']}",
        f"- RMSNorm {cfg['rms_norm']}, attention sink {cfg['sink']}, bigram table "
        f"{cfg['enable_bigram_table']}, AbsTopK {cfg['afrac']} at {cfg['afrac_loctypes']}",
        f"- parameters {s['total_params']:,}; nonzero {s['nonzero_params']:,}; sparse matrices "
        f"{s['sparse_nonzero']:,} / {s['sparse_params']:,} nonzero",
        "",
        "## Data and training",
        "",
        f"- corpus `{card['data']['corpus']}`: {card['data']['train_files']} train files, "
        f"{card['data']['val_files']} validation files (split by a hash of the path), "
        f"{card['data']['tokenizer']}",
        f"- {tr['steps']} steps, {tr['tokens_seen']:,} tokens seen, wall clock "
        f"{(tr['wall_clock_s'] or 0) / 3600:.2f} h on {tr['machine']}",
        f"- **validation loss {card['val_loss']:.4f} nats/token** over "
        f"{card['data']['val_tokens']:,} held-out tokens; dead MLP neurons per layer "
        f"{card['dead_neurons']}",
        f"- storage: {card['storage']['bytes'] / 1e6:.1f} MB ({card['storage']['format']}; fp16: "
        f"{card['storage']['fp16'] or 'none'}); max |logit change| vs the fp32 original "
        f"{card['storage']['max_abs_logit_diff_vs_fp32_original']:.2e}",
        "",
        "## Tasks",
        "",
        f"Loss: {card['task_loss_unit']}. Accuracy: fraction of prompts whose correct token's "
        "logit beats the contrasting one.",
        "",
        "| task | train loss | train acc | test loss | test acc |",
        "|---|---|---|---|---|",
    ]
    for task, r in card["tasks"].items():
        lines.append(
            f"| {task} | {r['train']['loss']:.3f} | {r['train']['acc']:.2f} | "
            f"{r['test']['loss']:.3f} | {r['test']['acc']:.2f} |"
        )
    lines += [
        "",
        "## Nonzeros per matrix",
        "",
        "| parameter | shape | nonzero | budget |",
        "|---|---|---|---|",
    ]
    for r in s["parameters"]:
        if r["sparse"]:
            lines.append(
                f"| {r['name']} | {'x'.join(map(str, r['shape']))} | {r['nonzero']:,} | "
                f"{r['budget'] if r['budget'] is not None else '-'} |"
            )
    lines += ["", "Training log: `metrics.jsonl`; training config: `train_config.json`.", ""]
    return "\n".join(lines)


__all__ = ["export_run", "machine_description", "render_card"]
