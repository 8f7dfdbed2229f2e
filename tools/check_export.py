"""Acceptance check of ``sparsecircuits export-hf``: export the shipped models and tiny
concatenated-position models, load each with transformers offline (HF_HUB_OFFLINE=1), and print
how the transformers model compares to ours.

    .venv/bin/python tools/check_export.py                 # every stdlib validation window
    .venv/bin/python tools/check_export.py --limit 16      # a smoke run

Per model: max |logit diff| and the number of logits differing by more than 1e-5 on the stdlib
validation windows (the windows ``sparsecircuits eval-loss`` scores), greedy 64-token generation
with the cache vs ``GPT.generate(temperature=0)``, the number of hidden states, a left-padded
batch vs its rows alone, AutoTokenizer ids vs ours on every validation file, ``pipeline``, and
an nnsight hook read.

Logits, generation and padding are reported twice. ``free``: each model on its own; where
AbsTopK's k-th and (k+1)-th largest |x| are closer than float32 rounding, the two
implementations keep different entries and those positions move by O(0.1). ``forced``: the
export keeping our AbsTopK selections (``sparsecircuits/interop/hf_parity.py``), with how far
from the threshold every differing decision of its own was. A model fails on a forced
difference, on a decision that differs farther than rounding from the threshold, or on any
other check; free differences are reported, not failed. Exits with status 1 if any model fails.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparsecircuits.data import Tokenizer, build_token_cache, load_corpus
from sparsecircuits.interop.export_hf import TIE_RTOL, export_hf
from sparsecircuits.interop.hf_parity import (
    ATOL,
    RTOL,
    Diff,
    TieStats,
    compare_generate,
    compare_logits,
    compare_padded,
)
from sparsecircuits.model import GPT, GPTConfig
from sparsecircuits.model.io import load_model, resolve_model_dir
from sparsecircuits.train.metrics import HELDOUT_BATCH
from sparsecircuits.train.trainer import default_cache_dir

SHIPPED = ("stdlib-sparse", "stdlib-dense")
TINY = dict(block_size=128, n_layer=2, n_head=4, d_head=8, d_model=48, d_mlp=96)


@torch.no_grad()
def tiny_catpos(vocab: int, *, sinusoidal: bool, seed: int = 0) -> GPT:
    """A tiny model with concatenated position channels and every tensor random (the GPT-2
    init leaves biases, sinks and the bigram table zero, which would hide errors there)."""
    torch.manual_seed(seed)
    config = GPTConfig(
        **TINY, vocab_size=vocab, learned_pos_emb=False, d_pos_emb=16,
        sinusoidal_cat_pos_emb=sinusoidal,
    )  # fmt: skip
    model = GPT(config)
    gen = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name == "transformer.wpe.weight" and sinusoidal:
            continue  # the fixed sinusoids
        noise = torch.randn(t.shape, generator=gen)
        if t.dim() == 2 and name != "bigram_table":
            t.copy_(noise / t.shape[-1] ** 0.5)  # unit-scale activations
        elif name.endswith("weight"):  # norm gains
            t.copy_(1.0 + 0.1 * noise)
        else:
            t.copy_(0.3 * noise)
    return model.eval()


def windows(tok: Tokenizer, *, length: int, limit: int | None) -> torch.Tensor:
    """The first ``limit`` (default all) stdlib validation windows, cut to ``length`` tokens:
    the windows ``eval-loss`` scores (block_size + 1 tokens each). (N, length) int64."""
    corpus = load_corpus("stdlib", val_fraction=0.02)
    _, val = build_token_cache(corpus, tok, cache_dir=default_cache_dir() / "tokens")
    rows = list(val.iter_windows(length + 1, max_windows=limit))
    return torch.from_numpy(np.stack(rows))[:, :length]


@torch.no_grad()
def logit_stats(
    model: GPT, hf: torch.nn.Module, ids: torch.Tensor, stats: TieStats
) -> dict[str, Diff]:
    """``free`` and ``forced`` logit differences over ``ids`` (N, T), in batches of the
    held-out evaluation's size."""
    total = {"free": Diff(), "forced": Diff()}
    for start in range(0, ids.shape[0], HELDOUT_BATCH):
        r = compare_logits(model, hf, ids[start : start + HELDOUT_BATCH], stats)
        for key, diff in r.items():
            total[key].merge(diff)
    return total


def describe(d: Diff) -> str:
    return (
        f"max |diff| {d.max_abs:.3g}, {d.n_over:,} of {d.n:,} differ by > {ATOL:g}, "
        f"{d.n_beyond:,} by > {ATOL:g} + {RTOL:g} max|logit|"
    )


def check_one(name: str, model: GPT, tok: Tokenizer, out: Path, args) -> bool:
    from nnsight import LanguageModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    t0 = time.time()
    export_hf(model, out, tokenizer=tok, overwrite=True)
    print(f"\n== {name}: exported to {out} in {time.time() - t0:.1f} s")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    T, ok = model.config.block_size, True

    ids = windows(tok, length=T, limit=args.limit)
    stats = TieStats()
    r = logit_stats(model, hf, ids, stats)
    ok &= r["forced"].n_beyond == 0 and stats.worst_gap <= TIE_RTOL and not stats.wrong_values
    print(f"logits, {ids.shape[0]} windows x {T} tokens:")
    print(f"  free:   {describe(r['free'])}")
    print(f"  forced: {describe(r['forced'])}")
    print(f"  AbsTopK: the export's own choice differs from ours in {stats.flips:,} of "
          f"{stats.rows:,} (token, site) decisions, each within {stats.worst_gap:.2g} "
          f"(relative) of the threshold (limit {TIE_RTOL:g})")  # fmt: skip

    prompts = ids[: args.prompts, :16]
    n_new = min(64, T - prompts.shape[1])
    gen_stats = TieStats()
    g = compare_generate(model, hf, prompts, max_new_tokens=n_new, stats=gen_stats)
    ok &= all(g["forced"]) and gen_stats.worst_gap <= TIE_RTOL
    print(f"greedy generate ({n_new} tokens, cache): free {sum(g['free'])}/{len(g['free'])} "
          f"prompts equal, forced {sum(g['forced'])}/{len(g['forced'])}")  # fmt: skip

    n_hidden = len(hf(input_ids=ids[:1, :8], output_hidden_states=True).hidden_states)
    ok &= n_hidden == model.config.n_layer + 1
    print(f"hidden_states: {n_hidden} (n_layer + 1 = {model.config.n_layer + 1})")

    rows = [ids[i, : T - 17 * i].tolist() for i in range(min(4, ids.shape[0]))]
    pad_stats = TieStats()
    pad = compare_padded(model, hf, rows, pad_id=tok.eot_id, stats=pad_stats)
    ok &= pad["forced"].n_beyond == 0 and pad_stats.worst_gap <= TIE_RTOL
    print(f"left-padded batch vs rows alone: free {describe(pad['free'])}")
    print(f"  forced (vs ours): {describe(pad['forced'])}")

    texts = list(load_corpus("stdlib", val_fraction=0.02).iter_texts("val"))
    bad = sum(hf_tok.encode(t, verbose=False) != tok.encode(t) for t in texts)
    ok &= bad == 0
    print(f"AutoTokenizer: {bad} of {len(texts)} validation files encode differently")

    pipe = pipeline("text-generation", model=hf, tokenizer=hf_tok)
    text = pipe("def main(", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    print(f"pipeline: ok ({text!r})")

    lm = LanguageModel(hf, tokenizer=hf_tok)
    prompt = "import os\n"
    with lm.trace(prompt):
        read = lm.transformer.h[0].mlp.output.save()
    _, cache = model.run_with_cache(torch.tensor([tok.encode(prompt)]), names=["0.mlp.resid_delta"])
    hook = Diff().add(cache["0.mlp.resid_delta"], read.detach())
    ok &= hook.n_beyond == 0
    print(f"nnsight: transformer.h[0].mlp.output {tuple(read.shape)}, vs our "
          f"0.mlp.resid_delta max |diff| {hook.max_abs:.3g}")  # fmt: skip
    print(f"{name}: {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="validation windows (all)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts for generate")
    parser.add_argument("--out", type=Path, default=None, help="keep the exports here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for name in SHIPPED:
            mdir = resolve_model_dir(name)
            results[name] = check_one(
                name, load_model(mdir), Tokenizer.load(mdir), root / name, args
            )
        tok = Tokenizer.load(resolve_model_dir(SHIPPED[0]))
        for sinusoidal in (False, True):
            name = "tiny-catpos" + ("-sinusoidal" if sinusoidal else "")
            model = tiny_catpos(tok.vocab_size, sinusoidal=sinusoidal)
            results[name] = check_one(name, model, tok, root / name, args)
    print("\n" + "\n".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
