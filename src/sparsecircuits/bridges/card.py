"""The card of a bridges directory (``README.md``), written from its own files so it cannot
drift from them: the metadata (``bridges.json``), the fidelity table (``fidelity.json``) and the
steering experiments (``steering/*.json``), each with the command that reproduces it."""

from __future__ import annotations

import json
from pathlib import Path

from sparsecircuits.bridges.evaluate import FIDELITY_FILE, format_table
from sparsecircuits.bridges.fit import WEIGHTS_FILE, load_meta
from sparsecircuits.bridges.steer_run import format_steering
from sparsecircuits.errors import InputError

CARD_FILE = "README.md"
STEERING_DIR = "steering"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable JSON file ({err})") from None


def card_text(directory: Path, *, name: str, sparse: str, dense: str) -> str:
    """The card of the bridges in ``directory`` between the models named ``sparse`` and
    ``dense`` (as the commands take them), published as ``name``."""
    meta = load_meta(directory)
    fid = _read(directory / FIDELITY_FILE)
    if fid.get("weights_sha256") != meta.weights_sha256:
        raise InputError(f"{directory / FIDELITY_FILE}: measured other bridges; run bridge eval")
    cfg = meta.model_extra.get("config", {}) if meta.model_extra else {}
    size = (directory / WEIGHTS_FILE).stat().st_size
    lines = [
        f"# {name}: post-hoc bridges between {sparse} and {dense}",
        "",
        f"Encoders and decoders at the {len(meta.sites)} residual sites of the two models "
        f"(d_dense {meta.d_dense}, d_sparse {meta.d_sparse}), fitted with both models frozen "
        "(docs/bridges.md). Bound to the models' weights hashes:",
        "",
        f"- sparse `{meta.hashes.get('sparse', '?')}`",
        f"- dense `{meta.hashes.get('dense', '?')}`",
        f"- weights `{WEIGHTS_FILE}` ({size / 2**20:.1f} MiB), sha256 `{meta.weights_sha256}`",
        "",
        "Reproduce:",
        "",
        "```bash",
        f"sparsecircuits bridge fit --out DIR --sparse {sparse} --dense {dense} "
        f"--steps {cfg.get('steps', '?')} --batch {cfg.get('batch', '?')} "
        f"--seq-len {cfg.get('seq_len', '?')} --lr {cfg.get('lr', '?')} "
        f"--seed {cfg.get('seed', '?')} --init {cfg.get('init', 'random')} "
        f"--init-tokens {cfg.get('init_tokens', 65536)}",
        f"sparsecircuits bridge eval DIR --sparse {sparse} --dense {dense} "
        f"--windows {fid['windows']} --seq-len {fid['seq_len']}",
        "```",
        "",
        f"## Fidelity ({fid['windows']} held-out windows of {fid['seq_len']} tokens)",
        "",
        "NMSE: fraction of variance unexplained; KL: nats per token from the dense model's "
        "next-token distribution to the hybrid's; agree: share of positions where the hybrid and "
        "the dense model rank the same token first. The sparse model alone is a reference, not "
        "a bound.",
        "",
        "```",
        format_table(fid),
        "```",
    ]
    runs = sorted((directory / STEERING_DIR).glob("*.json"))
    if runs:
        lines += ["", "## Steering", ""]
    for path in runs:
        doc = _read(path)
        if doc.get("bridges_sha256") != meta.weights_sha256:
            raise InputError(f"{path}: made with other bridges; run bridge steer again")
        scales = " ".join(f"--scale {r['scale']:g}" for r in doc["rows"])
        lines += [
            "```bash",
            f"sparsecircuits bridge steer {name} --sparse {sparse} --dense {dense} "
            f"--node {doc['node']} --prompts {doc['task']} "
            f"--from {doc['from']} --to {doc['to']} {scales} --seeds {len(doc['seeds'])} "
            f"--pairs {doc['n_pairs']} --side-pairs {doc['side_pairs']} --heldout-windows "
            f"{doc['heldout_windows']} --positions {doc['positions']}",
            "```",
            "",
            "```",
            format_steering(doc),
            "```",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"
