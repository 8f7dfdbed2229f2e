"""Kernel benchmarks: CSR products vs dense, AbsTopK vs GELU, top-k projection vs torch.topk.

Every figure is a ratio against a baseline timed in the same run, interleaved (medians).

    python benchmarks/kernels.py [--rounds 7] [--tokens 4096] [--quick]
"""

from __future__ import annotations

import argparse
import json

from sparsecircuits._alloc import tune_allocator

tune_allocator()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _timing import interleaved, machine  # noqa: E402

from sparsecircuits.kernels import abstopk, build_pattern, project_topk_  # noqa: E402
from sparsecircuits.kernels.linear import sddmm, spmm  # noqa: E402

SHAPES = [(768, 256), (256, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]
DENSITIES = [1 / 4, 1 / 16, 1 / 64, 1 / 256]


def matmuls(tokens: int, rounds: int, shapes) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in shapes:
        x = torch.randn(tokens, in_f, generator=g)
        dy = torch.randn(tokens, out_f, generator=g)
        w = torch.randn(out_f, in_f, generator=g)
        fns = {
            "dense fwd": lambda x=x, w=w: F.linear(x, w),
            "dense dx": lambda dy=dy, w=w: dy.mm(w),
            "dense dW": lambda dy=dy, x=x: dy.t().mm(x),
        }
        for d in DENSITIES:
            wd = w * (torch.rand(out_f, in_f, generator=g) < d)
            p = build_pattern(wd)
            val = wd.reshape(-1)[p.flat]
            valt = val[p.perm].contiguous()
            fns[f"{d} fwd"] = lambda p=p, val=val, x=x, o=out_f: spmm(
                p.crow, p.col, val, x, None, o
            )
            fns[f"{d} dx"] = lambda p=p, v=valt, dy=dy, i=in_f: spmm(
                p.crow_t, p.col_t, v, dy, None, i
            )
            fns[f"{d} dW"] = lambda p=p, dy=dy, x=x: sddmm(p, dy, x)
        t = interleaved(fns, rounds=rounds)
        for d in DENSITIES:
            rows.append(
                {
                    "shape": f"{out_f}x{in_f}",
                    "density": f"1/{round(1 / d)}",
                    "dense_ms": {k: t[f"dense {k}"] * 1e3 for k in ("fwd", "dx", "dW")},
                    "sparse_ms": {k: t[f"{d} {k}"] * 1e3 for k in ("fwd", "dx", "dW")},
                    "speedup": {k: t[f"dense {k}"] / t[f"{d} {k}"] for k in ("fwd", "dx", "dW")},
                }
            )
    return rows


def _legacy_abstopk(x: torch.Tensor, k: int) -> torch.Tensor:
    """The pre-kernel implementation (one torch.topk + scatter), the honest baseline."""
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def activations(rounds: int, shapes) -> list[dict]:
    rows = []
    gelu = torch.nn.GELU()
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        xg = x.clone().requires_grad_(True)
        gy = torch.randn(shape)
        k = shape[1] // 4

        def fb(fn, xg=xg, gy=gy):
            xg.grad = None
            fn(xg).backward(gy)

        fns = {
            "gelu fwd": lambda x=x: gelu(x),
            "abstopk fwd": lambda x=x, k=k: abstopk(x, k),
            "topk+scatter fwd": lambda x=x, k=k: _legacy_abstopk(x, k),
            "gelu fwd+bwd": lambda: fb(gelu),
            "abstopk fwd+bwd": lambda k=k: fb(lambda z, k=k: abstopk(z, k)),
            # the training forward: the same selection, keeping the mask for the backward
            "abstopk fwd, mask kept": lambda xg=xg, k=k: abstopk(xg, k),
            "topk+scatter fwd+bwd": lambda k=k: fb(lambda z, k=k: _legacy_abstopk(z, k)),
        }
        graded = ("bwd", "mask kept")  # timed with autograd on
        with torch.no_grad():
            t_fwd = interleaved(
                {k_: v for k_, v in fns.items() if not any(g in k_ for g in graded)}, rounds=rounds
            )
        t_fb = interleaved(
            {k_: v for k_, v in fns.items() if any(g in k_ for g in graded)}, rounds=rounds
        )
        t = {**t_fwd, **t_fb}
        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "ms": {n: v * 1e3 for n, v in t.items()},
                "abstopk_over_gelu_fwd": t["abstopk fwd"] / t["gelu fwd"],
                "abstopk_with_mask_over_gelu_fwd": t["abstopk fwd, mask kept"] / t["gelu fwd"],
                "abstopk_over_gelu_fwd_bwd": t["abstopk fwd+bwd"] / t["gelu fwd+bwd"],
                "speedup_vs_topk_fwd_bwd": t["topk+scatter fwd+bwd"] / t["abstopk fwd+bwd"],
            }
        )
    return rows


def _legacy_projection(w: torch.Tensor, k: int, floor: int) -> None:
    score = w.abs()
    if floor:
        score.scatter_(1, score.topk(floor, dim=1, sorted=False).indices, torch.inf)
    keep = score.view(-1).topk(k, sorted=False).indices
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[keep] = True
    w.mul_(mask.view_as(w))


def projection(rounds: int, shapes) -> list[dict]:
    rows = []
    for shape in shapes:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        k = w.numel() // 64
        fns = {
            "ours": lambda w=w, k=k: project_topk_(w.clone(), k, floor=4),
            "torch.topk": lambda w=w, k=k: _legacy_projection(w.clone(), k, 4),
            "clone only": lambda w=w: w.clone(),
        }
        t = interleaved(fns, rounds=rounds)
        ours, legacy = t["ours"] - t["clone only"], t["torch.topk"] - t["clone only"]
        rows.append(
            {
                "shape": f"{shape[0]}x{shape[1]}",
                "ms": {"ours": ours * 1e3, "torch.topk": legacy * 1e3},
                "speedup": legacy / max(ours, 1e-9),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="two shapes each (a smoke run)")
    args = ap.parse_args()
    shapes = SHAPES[:2] if args.quick else SHAPES
    act_shapes = [(4096, 256), (4096, 1024)] + ([] if args.quick else [(4096, 4096)])
    print(machine())
    res = {
        "machine": machine(),
        "matmul": matmuls(args.tokens, args.rounds, shapes),
        "abstopk": activations(args.rounds, act_shapes),
        "projection": projection(args.rounds, [(1024, 256), (4096, 1024)]),
    }
    print(f"\nCSR products vs dense, {args.tokens} tokens (speed-up = dense ms / ours ms)")
    print(f"{'shape':>10s} {'density':>8s} {'fwd':>7s} {'dx':>7s} {'dW (support)':>13s}")
    for r in res["matmul"]:
        s = r["speedup"]
        cells = f"{s['fwd']:6.1f}x {s['dx']:6.1f}x {s['dW']:12.1f}x"
        print(f"{r['shape']:>10s} {r['density']:>8s} {cells}")
    print("\nAbsTopK (k = width/4) vs GELU and vs torch.topk + scatter, ms (fwd: no gradients)")
    for r in res["abstopk"]:
        m = r["ms"]
        print(
            f"{r['shape']:>10s}  fwd: ours {m['abstopk fwd']:.2f} gelu {m['gelu fwd']:.2f} "
            f"topk {m['topk+scatter fwd']:.2f} -> {r['abstopk_over_gelu_fwd']:.2f}x gelu "
            f"({r['abstopk_with_mask_over_gelu_fwd']:.2f}x keeping the mask) | "
            f"fwd+bwd: ours {m['abstopk fwd+bwd']:.2f} gelu {m['gelu fwd+bwd']:.2f} "
            f"topk {m['topk+scatter fwd+bwd']:.2f} -> {r['abstopk_over_gelu_fwd_bwd']:.2f}x gelu"
        )
    print("\nTop-k projection to 1/64 with a 4-per-row floor, ms (clone excluded)")
    for r in res["projection"]:
        m = r["ms"]
        print(
            f"{r['shape']:>10s} ours {m['ours']:.2f}  torch.topk {m['torch.topk']:.2f}  "
            f"-> {r['speedup']:.1f}x"
        )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
