"""Loading the Hub model ``openai/circuit-sparsity`` (csp_yolo2) from a local snapshot: wall time,
peak RSS and a 256-token forward pass.

The parent process writes a synthetic snapshot of the Hub architecture (docs/PAPER.md §11):
8 layers, d_model 2048, 128 heads x d_head 16, d_mlp 8192, vocab 2048, block_size 1024,
concatenated position channels d_pos_emb 32, bigram table, attention sink, biases, RMSNorm,
AbsTopK 1/4 at the 8 node locations. Weights are random with the paper's sparsest density
(about 1 in 1000 nonzero, ``--density``) in every weight matrix and the (un)embedding; biases,
norms, sinks, positions and the bigram table are dense. They are stored as the Hub stores them:
dense float32 in ``model.safetensors`` under ``circuit_model.`` names, with ``config.json``
(``model_type: circuitgpt``). A fresh child process (``--child``) then measures:

- ``load_model`` wall time (s) and its peak RSS: the process's VmHWM, and its growth over the
  baseline after importing torch and sparsecircuits (the load's own cost). Float32 weights are
  mapped from the file (safetensors) and paged in on first use, so the growth right after
  loading is small; the script then reads every weight once and reports what the process holds
  then, and that over the file size (1.0 = the weights held once, nothing more);
- a forward pass over ``--tokens`` tokens (1 sequence; median of ``--rounds`` after a warm-up).

``--scale`` multiplies d_model, d_mlp and the head count (0.125: d_model 256, 16 heads, d_mlp
1024, a 40 MB file, for a smoke run); the full size is a 1.7 GB file and needs about twice that
in free memory. ``--keep DIR`` writes the snapshot to DIR and keeps it (reused when DIR already
holds one of the same scale), instead of a temporary directory.

    python benchmarks/hub_load.py [--scale 1.0] [--density 0.001] [--tokens 256] [--rounds 3]
                                  [--shards 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HUB_PREFIX = "circuit_model."
MARKER = "bench.json"  # what a kept snapshot was written with (to reuse it)
NODE_LOCS = "attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_q,attn_k,attn_v"


def hub_config(scale: float) -> dict[str, Any]:
    """The Hub ``config.json``: official GPTConfig fields plus Hugging Face ones."""
    n_head = max(1, round(128 * scale))
    return {
        "model_type": "circuitgpt",
        "architectures": ["CircuitGPTForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_circuitgpt.CircuitGPTForCausalLM"},
        "torch_dtype": "float32",
        "block_size": 1024,
        "vocab_size": 2048,
        "n_layer": 8,
        "n_head": n_head,
        "d_head": 16,
        "d_model": 16 * n_head,
        "d_mlp": 64 * n_head,
        "dropout": 0.0,
        "bias": True,
        "ln_bias": True,
        "rms_norm": True,
        "residual_activation_type": "identity",
        "activation_type": "gelu",
        "afrac": 0.25,
        "afrac_loctypes": NODE_LOCS,
        "tied_unembed": False,
        "tokenizer_name": "tinypython_2k",
        "enable_bigram_table": True,
        "learnable_bigram_table": False,
        "bigram_table_rank": None,
        "d_pos_emb": 32,
        "dropout_cat_pos_emb": False,
        "sinusoidal_cat_pos_emb": False,
        "flash": True,
        "sink": True,
        "eos_token_id": 2047,
    }


def write_snapshot(directory: Path, *, scale: float, density: float, shards: int) -> int:
    """Write the synthetic snapshot into ``directory``; returns the weights' size in bytes."""
    import torch
    from safetensors.torch import save_file

    from sparsecircuits.model import GPT
    from sparsecircuits.model.snapshot import snapshot_config

    config = hub_config(scale)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    gpt_config, _ = snapshot_config(directory / "config.json")  # our reader's translation
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(gpt_config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) == 2 and name not in ("bigram_table", "transformer.wpe.weight"):
            t = torch.zeros(n)  # a weight matrix or the (un)embedding: L0 = density
            nnz = max(1, round(density * n))
            t[torch.randint(0, n, (nnz,), generator=g)] = torch.randn(nnz, generator=g)
            t = t.view(shape)
        elif name.endswith(
            ("ln_1.weight", "ln_2.weight", "ln_p1.weight", "ln_p2.weight", "ln_f.weight")
        ):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)  # norm gains
        else:  # biases, sink logits, positions, bigram table, final logits bias
            t = 0.1 * torch.randn(shape, generator=g)
        state[HUB_PREFIX + name] = t
    names = sorted(state)
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), {"format": "pt"})
        files = ["model.safetensors"]
    else:
        weight_map, files = {}, []
        for i in range(shards):
            part = {k: state[k] for k in names[i::shards]}
            files.append(f"model-{i + 1:05d}-of-{shards:05d}.safetensors")
            save_file(part, str(directory / files[-1]), {"format": "pt"})
            weight_map |= dict.fromkeys(part, files[-1])
        index = {"metadata": {}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "modeling_circuitgpt.py").write_text('raise RuntimeError("never imported")\n')
    size = sum((directory / f).stat().st_size for f in files)
    marker = {"scale": scale, "density": density, "shards": shards, "bytes": size}
    (directory / MARKER).write_text(json.dumps(marker))
    return size


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS (Linux >= 4.0), so
    the import of torch, whose transient peak can exceed a small model, is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(directory: str, tokens: int, rounds: int) -> None:
    """Load the snapshot and time a forward; prints one JSON line (seconds, MB)."""
    from sparsecircuits._alloc import tune_allocator

    tune_allocator()  # as the CLI does
    import torch
    from _timing import interleaved, machine

    from sparsecircuits.model import GPT, GPTConfig, load_model

    with torch.device("meta"):  # one-time registrations are not the load's cost
        GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, d_head=16, vocab_size=64))
    _reset_peak()
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    model = load_model(directory)
    load_s = time.perf_counter() - t0
    load_hwm = _status_mb("VmHWM")
    held = _status_mb("VmRSS") - base
    # safetensors tensors are mapped from the file and paged in on first use: read every
    # weight once, so that what the model holds is resident and counted.
    with torch.no_grad():
        for t in model.state_dict().values():
            t.sum()
    touched = _status_mb("VmRSS") - base
    touched_hwm = _status_mb("VmHWM")
    idx = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator())
    with torch.no_grad():
        fwd_s = interleaved({"forward": lambda: model(idx)}, rounds=rounds)["forward"]
    row = {
        "machine": machine(),
        "load_s": load_s,
        "baseline_mb": base,
        "load_peak_rss_mb": load_hwm,
        "load_growth_mb": load_hwm - base,
        "held_mb": held,
        "touched_mb": touched,
        "touched_peak_rss_mb": touched_hwm,
        "forward_s": fwd_s,
        "forward_peak_rss_mb": _status_mb("VmHWM"),
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="width multiplier (1.0: the Hub's)")
    ap.add_argument("--density", type=float, default=1e-3, help="nonzero share of matrices")
    ap.add_argument("--tokens", type=int, default=256, help="tokens of the timed forward")
    ap.add_argument("--rounds", type=int, default=3, help="timed forwards (median)")
    ap.add_argument("--shards", type=int, default=1, help="safetensors files (1: as the Hub)")
    ap.add_argument("--keep", type=Path, help="write (or reuse) the snapshot here and keep it")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp) / "hub"
        marker = directory / MARKER
        kept = json.loads(marker.read_text()) if marker.exists() else {}
        same = {"scale": args.scale, "density": args.density, "shards": args.shards}
        if kept and all(kept.get(k) == v for k, v in same.items()):
            size = kept["bytes"]
            print(f"reusing {directory}")
        else:
            t0 = time.perf_counter()
            size = write_snapshot(
                directory, scale=args.scale, density=args.density, shards=args.shards
            )
            print(f"wrote {directory} in {time.perf_counter() - t0:.1f} s")
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(directory), str(args.tokens),
             str(args.rounds)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            sys.exit(f"child failed:\n{out.stderr}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
    file_mb = size / 2**20
    print(r["machine"])
    print(
        f"scale {args.scale}: {r['params'] / 1e6:.1f}M params, density {args.density:g}, "
        f"{args.shards} file(s)"
    )
    print(f"file size            {file_mb:10.1f} MB")
    print(f"load_model           {r['load_s']:10.2f} s")
    print(
        f"peak RSS (process)   {r['load_peak_rss_mb']:10.1f} MB  (baseline {r['baseline_mb']:.0f})"
    )
    print(f"load growth          {r['load_growth_mb']:10.1f} MB  (weights not yet paged in)")
    peak = r["touched_peak_rss_mb"]
    print(f"held, weights read   {r['touched_mb']:10.1f} MB  (peak RSS {peak:.0f})")
    print(f"held / file size     {r['touched_mb'] / file_mb:10.2f}")
    print(f"forward, {args.tokens} tokens {r['forward_s']:10.3f} s  (median of {args.rounds})")
    print(f"peak RSS after fwd   {r['forward_peak_rss_mb']:10.1f} MB")
    print(json.dumps({**r, "file_mb": file_mb, "scale": args.scale, "density": args.density}))


if __name__ == "__main__":
    main()
