"""Peak memory of a 1024-wide weight-sparse model held dense vs stored sparse (CSR).

A parent process writes a random model at L0 1/256 in the compact format (indices + values);
fresh child processes load it (``load_model(storage="dense"|"sparse")``) and run one forward
pass. Each child reports its peak RSS and the peak RSS growth over its own baseline after
importing torch and sparsecircuits (the model's own footprint: torch alone is ~300 MB).

    python benchmarks/memory.py [--layers 2,8] [--width 1024] [--l0 0.00390625]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS (Linux >= 4.0), so
    the import of torch, whose transient peak exceeds a small model, is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(model_dir: str, storage: str) -> None:
    from sparsecircuits._alloc import tune_allocator

    tune_allocator()
    import torch

    from sparsecircuits.model import GPT, GPTConfig, load_model
    from sparsecircuits.model.sparse_storage import nnz_bytes

    # One-time runtime costs (meta-device registrations, thread pools, kernel code and
    # buffers on a first forward) are not the model's: load, warm up with one forward, then
    # measure a second forward. Peak = what loading added + the forward's own peak.
    with torch.device("meta"):
        GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, d_head=16, vocab_size=64))
    _reset_peak()
    base = _status_mb("VmRSS")
    model = load_model(model_dir, storage=storage)
    load_peak = _status_mb("VmHWM") - base
    held = _status_mb("VmRSS") - base
    idx = torch.randint(0, model.config.vocab_size, (1, model.config.block_size))
    with torch.no_grad():
        model(idx)  # warm-up
        _reset_peak()
        before = _status_mb("VmRSS")
        model(idx)
        fwd_peak = _status_mb("VmHWM") - before
    peak = max(load_peak, held + fwd_peak)
    print(
        json.dumps(
            {
                "storage": storage,
                "baseline_mb": base,
                "load_peak_mb": load_peak,
                "held_mb": held,
                "forward_peak_mb": fwd_peak,
                "growth_mb": peak,
                "model_bytes_mb": nnz_bytes(model) / 2**20,
            }
        )
    )


def make_model(directory: str, width: int, layers: int, l0: float) -> None:
    import torch

    from sparsecircuits.model import (
        GPT,
        GPTConfig,
        WeightSparsity,
        save_model,
        sparse_parameter_names,
    )

    cfg = GPTConfig(
        n_layer=layers, d_model=width, n_head=width // 16, d_head=16, block_size=256,
        vocab_size=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    WeightSparsity(model, sparse_parameter_names(model)).project_(l0)
    save_model(model, directory, compact=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--l0", type=float, default=1 / 256)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    results = []
    print(
        f"width {args.width}, L0 {args.l0:.5f}: peak RSS growth of loading + a forward pass "
        "(1 x 256 tokens) over the process baseline, MB"
    )
    heads = ("layers", "storage", "peak", "load", "held", "fwd", "tensors")
    print(" ".join(f"{h:>8s}" for h in heads))
    for layers in (int(x) for x in args.layers.split(",")):
        with tempfile.TemporaryDirectory() as d:
            make_model(d, args.width, layers, args.l0)
            rows = {}
            for storage in ("dense", "sparse"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", d, storage],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                rows[storage] = json.loads(out.stdout.strip().splitlines()[-1])
                r = rows[storage]
                cells = (r[k] for k in ("growth_mb", "load_peak_mb", "held_mb"))
                more = (r["forward_peak_mb"], r["model_bytes_mb"])
                print(
                    f"{layers:8d} {storage:>8s} " + " ".join(f"{v:8.1f}" for v in (*cells, *more))
                )
            ratio = rows["sparse"]["growth_mb"] / rows["dense"]["growth_mb"]
            print(f"{'':8s} sparse / dense peak ratio {ratio:.3f}")
            results.append({"layers": layers, **rows, "growth_ratio": ratio})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
