"""The dense-shaped parts of a sparse model's step, ours vs torch, in one run.

Weight sparsity leaves attention, the norms, the loss and the activation nonlinearities at
their dense cost; at 1/64 they are most of a step. Each row times our kernel against the
torch code it replaces, interleaved (medians), forward and forward + backward:

- attention with the sink, d_head 16, context 256 (our narrow-head kernel vs torch's CPU
  flash kernel with the sink's log-sum-exp correction);
- RMSNorm over (4096, width) (fused vs ``F.rms_norm``);
- next-token cross-entropy over (4096, 2048) logits (two passes vs ``F.cross_entropy``);
- AbsTopK(GELU(x)) over (4096, 4 * width) (fused backward vs GELU then AbsTopK).

    python benchmarks/dense_parts.py [--rounds 7] [--widths 256,1024]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from sparsecircuits._alloc import tune_allocator

tune_allocator()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _timing import interleaved, machine  # noqa: E402

from sparsecircuits.kernels import (  # noqa: E402
    abstopk,
    causal_attention,
    cross_entropy,
    gelu_abstopk,
    rms_norm,
)
from sparsecircuits.kernels.attention import torch_causal_attention  # noqa: E402

TOKENS = 4096


def _pair(fwd: Callable[[list[torch.Tensor]], torch.Tensor], inputs: list[torch.Tensor], gy):
    """(forward-only fn, forward+backward fn) on fresh leaves of ``inputs``."""

    def f() -> None:
        with torch.no_grad():
            fwd(inputs)

    def fb() -> None:
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        fwd(leaves).backward(gy)

    return f, fb


def _row(name: str, ours, theirs, rounds: int) -> dict:
    (of, ofb), (tf, tfb) = ours, theirs
    t = interleaved({"of": of, "ofb": ofb, "tf": tf, "tfb": tfb}, rounds=rounds)
    return {
        "part": name,
        "ms": {k: v * 1e3 for k, v in t.items()},
        "fwd": t["tf"] / t["of"],
        "fwd_bwd": t["tfb"] / t["ofb"],
    }


def parts(width: int, rounds: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    B, T, D = TOKENS // 256, 256, 16
    H = width // D
    qkv = [torch.randn(B, T, H, D, generator=g).transpose(1, 2) for _ in range(3)]
    sink = torch.randn(H, generator=g)
    gy_attn = torch.randn(B, H, T, D, generator=g)
    x = torch.randn(TOKENS, width, generator=g)
    w = torch.randn(width, generator=g)
    logits = torch.randn(TOKENS, 2048, generator=g) * 3
    targets = torch.randint(0, 2048, (TOKENS,), generator=g)
    pre = torch.randn(TOKENS, 4 * width, generator=g)
    k = width  # a quarter of the MLP width
    gy_x, gy_pre = torch.randn_like(x), torch.randn_like(pre)
    one = torch.tensor(1.0)
    rows = [
        _row(
            f"attention {H}x{D} heads",
            _pair(lambda t: causal_attention(t[0], t[1], t[2], t[3]), [*qkv, sink], gy_attn),
            _pair(lambda t: torch_causal_attention(t[0], t[1], t[2], t[3]), [*qkv, sink], gy_attn),
            rounds,
        ),
        _row(
            f"RMSNorm {TOKENS}x{width}",
            _pair(lambda t: rms_norm(t[0], t[1], None), [x, w], gy_x),
            _pair(lambda t: F.rms_norm(t[0], (width,), t[1]), [x, w], gy_x),
            rounds,
        ),
        _row(
            f"AbsTopK(GELU) {TOKENS}x{4 * width}",
            _pair(lambda t: gelu_abstopk(t[0], k), [pre], gy_pre),
            _pair(lambda t: abstopk(F.gelu(t[0]), k), [pre], gy_pre),
            rounds,
        ),
    ]
    if width == 256:  # the loss does not depend on the width
        rows.append(
            _row(
                f"cross-entropy {TOKENS}x2048",
                _pair(lambda t: cross_entropy(t[0], targets), [logits], one),
                _pair(lambda t: F.cross_entropy(t[0], targets), [logits], one),
                rounds,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--widths", default="256,1024")
    args = ap.parse_args()
    print(machine())
    res = {"machine": machine(), "parts": []}
    print(f"\n{'part':>28s} {'ours ms':>16s} {'torch ms':>16s} {'speed-up':>18s}")
    print(f"{'':>28s} {'fwd / fwd+bwd':>16s} {'fwd / fwd+bwd':>16s} {'fwd / fwd+bwd':>18s}")
    for width in (int(w) for w in args.widths.split(",")):
        for r in parts(width, args.rounds):
            res["parts"].append({"width": width, **r})
            m = r["ms"]
            ours, theirs = f"{m['of']:7.2f} / {m['ofb']:6.2f}", f"{m['tf']:7.2f} / {m['tfb']:6.2f}"
            print(f"{r['part']:>28s} {ours} {theirs} {r['fwd']:8.2f}x / {r['fwd_bwd']:5.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
