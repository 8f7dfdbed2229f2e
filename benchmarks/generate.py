"""Milliseconds per generated token, with and without the KV cache, for a shipped model: ours
(``GPT.generate``) and, when transformers is installed, the ``export-hf`` copy through
``model.generate`` (``use_cache`` on and off), all in one run, interleaved.

Cases (the issue's): 200 new tokens after a 56-token prompt (ending exactly at the 256-token
context) and 64 new tokens after a 192-token prompt. Greedy decoding, batch 1. It also checks
that every variant produced the same tokens, and splits one cached step's time by module
(``--profile``) to show where the fixed per-token overhead goes.

    python benchmarks/generate.py [--model stdlib-sparse] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import interleaved, machine

from sparsecircuits.data import Tokenizer
from sparsecircuits.data.corpus import stdlib_dir
from sparsecircuits.model.io import load_model, resolve_model_dir

CASES = ((56, 200), (192, 64))  # (prompt tokens, new tokens)


def prompt_ids(tokenizer: Tokenizer, n: int) -> torch.Tensor:
    """The first n tokens of a stdlib file (real code, the same for every variant): (1, n)."""
    text = (stdlib_dir() / "textwrap.py").read_text(encoding="utf-8")
    return torch.tensor([tokenizer.encode(text)[:n]])


def hf_model(spec: str) -> Callable | None:
    """The export-hf copy of ``spec`` loaded by transformers (None without transformers)."""
    try:
        from transformers import AutoModelForCausalLM

        from sparsecircuits.interop.export_hf import export_hf
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(tempfile.mkdtemp(prefix="sc-bench-gen-")) / "hf"
    export_hf(spec, out)
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stdlib-sparse")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="split one cached step by module")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    tok = Tokenizer.load(resolve_model_dir(args.model))
    hf = hf_model(args.model)
    print(machine())
    print(f"model {args.model}; greedy, batch 1; ms per generated token (median of {args.rounds})")
    header = f"{'prompt+new':>11} {'ours cache':>11} {'ours none':>10} {'speed-up':>9}"
    if hf is not None:
        header += f" {'hf cache':>9} {'hf none':>8} {'speed-up':>9}"
    print(header)
    for n_prompt, n_new in CASES:
        idx = prompt_ids(tok, n_prompt)
        out: dict[str, torch.Tensor] = {}

        def ours(use: bool, key: str, idx=idx, n_new=n_new, out=out) -> None:
            out[key] = model.generate(idx, max_new_tokens=n_new, temperature=0, use_cache=use)

        fns = {"ours_cache": lambda: ours(True, "ours_cache"),
               "ours_none": lambda: ours(False, "ours_none")}  # fmt: skip
        if hf is not None:
            for use in (True, False):
                key = f"hf_{'cache' if use else 'none'}"

                def run(use=use, key=key, idx=idx, n_new=n_new, out=out) -> None:
                    out[key] = hf.generate(
                        idx, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                        use_cache=use, attention_mask=torch.ones_like(idx), pad_token_id=0,
                    )  # fmt: skip

                fns[key] = run
        with torch.no_grad():
            t = interleaved(fns, rounds=args.rounds)
        same = all(torch.equal(v, out["ours_cache"]) for v in out.values())
        ms = {k: 1000 * v / n_new for k, v in t.items()}
        line = f"{n_prompt:>4}+{n_new:<6} {ms['ours_cache']:>11.2f} {ms['ours_none']:>10.2f}"
        line += f" {ms['ours_none'] / ms['ours_cache']:>8.1f}x"
        if hf is not None:
            line += f" {ms['hf_cache']:>9.2f} {ms['hf_none']:>8.2f}"
            line += f" {ms['hf_none'] / ms['hf_cache']:>8.1f}x"
        print(line + ("" if same else "   TOKENS DIFFER"))
    if args.profile:
        profile_step(model, prompt_ids(tok, 56))


def profile_step(model: torch.nn.Module, idx: torch.Tensor) -> None:
    """Where one cached decoding step's time goes: each top-level module's share."""
    from sparsecircuits.model import KVCache

    times: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []
    named = [("wte", model.transformer.wte), ("ln_f", model.transformer.ln_f),
             ("lm_head", model.lm_head)]  # fmt: skip
    for i, b in enumerate(model.transformer.h):
        named += [(f"h{i}.attn", b.attn), (f"h{i}.mlp", b.mlp), (f"h{i}.ln", b.ln_1)]
        named += [(f"h{i}.ln", b.ln_2)]
    for name, m in named:
        handles.append(m.register_forward_pre_hook(
            lambda mod, a, name=name: starts.__setitem__(name, time.perf_counter())))  # fmt: skip
        handles.append(m.register_forward_hook(
            lambda mod, a, o, name=name: times.__setitem__(
                name, times.get(name, 0.0) + time.perf_counter() - starts[name])))  # fmt: skip
    n = 50
    with torch.no_grad():
        cache = KVCache.for_model(model, batch=1)
        model(idx, cache=cache)
        nxt = idx[:, -1:]
        times.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            logits, _ = model(nxt, cache=cache)
            nxt = logits[:, -1:].argmax(-1)
        total = (time.perf_counter() - t0) / n
    for h in handles:
        h.remove()
    groups: dict[str, float] = {}
    for name, s in times.items():
        key = name.split(".", 1)[-1] if name.startswith("h") else name
        groups[key] = groups.get(key, 0.0) + s / n
    print(f"\none cached step: {1000 * total:.2f} ms; by part (all layers summed):")
    for key, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {key:<8} {1000 * s:6.2f} ms  {100 * s / total:5.1f}%")
    rest = total - sum(groups.values())
    print(
        f"  {'other':<8} {1000 * rest:6.2f} ms  {100 * rest / total:5.1f}%  (python, embed, "
        "logit tables, cache bookkeeping)"
    )


if __name__ == "__main__":
    main()
