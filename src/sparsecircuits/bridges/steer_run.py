"""One steering experiment with its controls and side effects (``bridge steer``); the pieces
are in :mod:`sparsecircuits.bridges.steer`.

Class means come from the task's train prompts; flips are measured on its test prompts (the
held-out templates). Each scale multiplies the node's move; the random direction is matched in
norm to the bridged change prompt by prompt, and the dense class-mean difference is multiplied
by the same scale.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsecircuits.bridges.bridge import Bridges
from sparsecircuits.bridges.steer import (
    Positions,
    Prompts,
    Side,
    Steering,
    _add_at,
    check_sides,
    dense_delta,
    derive,
    final_logits_with,
    flips,
    node_id,
    random_like,
    side_tensors,
)
from sparsecircuits.circuits.nodes import Node
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks
from sparsecircuits.tasks import registry
from sparsecircuits.tasks.batch import TaskBatch
from sparsecircuits.tasks.metrics import logit_diffs


def _diffs(logits: torch.Tensor, batch: TaskBatch, side: Side) -> torch.Tensor:
    _, target, other = side_tensors(batch, side)
    return logit_diffs(logits.cpu(), target, other)


@torch.no_grad()
def _sparse_steered(sparse: GPT, steer: Steering, p: Prompts, scale: float) -> torch.Tensor:
    """Sparse logits (N, vocab) at the last positions with the node moved in place."""
    fn = _add_at(p.mask, steer.amount(scale), steer.node.index)
    logits, _ = sparse(p.idx, hooks=Hooks(interventions={steer.node.site: fn}))
    return p.final(logits)


@torch.no_grad()
def _side_effects(sparse: GPT, dense: GPT, bridges: Bridges, steer: Steering, scale: float,
                  *, tasks: list[TaskBatch], windows: torch.Tensor | None) -> dict:  # fmt: skip
    """The dense model's accuracy on other tasks (both sides steered, at the steering's
    positions) and its held-out loss (every position steered: each is a prediction)."""
    dev = next(dense.parameters()).device
    out: dict[str, Any] = {"tasks": {}}
    for b in tasks:
        acc = {"before": [], "after": []}
        for side in ("a", "b"):
            p = Prompts.of(side_tensors(b, side)[0], steer.positions, dev)
            delta = dense_delta(steer, sparse, bridges, p, scale)
            acc["before"].append(_diffs(final_logits_with(dense, p), b, side) > 0)
            acc["after"].append(_diffs(final_logits_with(dense, p, steer.site, delta), b, side) > 0)
        out["tasks"][b.task] = {k: float(torch.cat(v).float().mean()) for k, v in acc.items()}
    if windows is not None:
        idx = windows.to(dev)
        p = Prompts(idx=idx[:, :-1], mask=torch.ones_like(idx[:, :-1], dtype=torch.bool),
                    last=torch.full((len(idx),), idx.shape[1] - 2, device=dev))  # fmt: skip
        delta = dense_delta(steer, sparse, bridges, p, scale)
        _, before = dense(p.idx, idx[:, 1:])
        hooks = Hooks(interventions={steer.site: _add_at(p.mask, delta)})
        _, after = dense(p.idx, idx[:, 1:], hooks=hooks)
        out["heldout_loss"] = {"before": float(before), "after": float(after)}
    return out


def run_steering(sparse: GPT, dense: GPT, bridges: Bridges, tokenizer, *, task: str, node: Node,
                 src: Side, dst: Side, scales: list[float], seeds: list[int], n_pairs: int = 100,
                 positions: Positions = "last", side_pairs: int = 50,
                 side_tasks: list[str] | None = None, windows: torch.Tensor | None = None,
                 seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """The whole experiment as a JSON-ready dict: per scale, the bridged steering, the random
    controls (every seed), the dense class-mean difference, the sparse model steered, and the
    side effects (``side_tasks``, default every other task, at ``side_pairs`` test pairs each,
    none when 0; held-out ``windows``)."""
    check_sides(src, dst)
    dev = next(dense.parameters()).device
    max_len = min(sparse.config.block_size, dense.config.block_size)
    t = registry.get(task)
    train = t.build(tokenizer, split="train", n=n_pairs, seed=seed, max_len=max_len)
    test = t.build(tokenizer, split="test", n=n_pairs, seed=seed, max_len=max_len)
    steer = derive(sparse, dense, node, train, src=src, dst=dst, positions=positions)
    p = Prompts.of(side_tensors(test, src)[0], positions, dev)
    dense_before = _diffs(final_logits_with(dense, p), test, src)
    sparse_before = _diffs(final_logits_with(sparse, p), test, src)
    if side_tasks is None:
        side_tasks = [n for n in registry.names(include_controls=False) if n != task]
    others = [registry.get(n).build(tokenizer, split="test", n=side_pairs, seed=seed,
                                    max_len=max_len)
              for n in (side_tasks if side_pairs else [])]  # fmt: skip

    def dense_flips(delta: torch.Tensor) -> dict[str, float | int]:
        after = final_logits_with(dense, p, steer.site, delta)
        return flips(dense_before, _diffs(after, test, src))

    def norm(delta: torch.Tensor) -> float:  # mean over the steered positions
        return float(delta[p.mask].norm(dim=-1).mean())

    rows = []
    for scale in scales:
        delta = dense_delta(steer, sparse, bridges, p, scale)  # (N, T, d_dense)
        rand = [dense_flips(random_like(delta, seed=s)) for s in seeds]
        mean_diff = (scale * (steer.dense_to - steer.dense_from)).expand_as(delta)
        sparse_after = _diffs(_sparse_steered(sparse, steer, p, scale), test, src)
        rows.append({
            "scale": scale, "node_move": steer.amount(scale), "delta_norm": norm(delta),
            "bridged": dense_flips(delta),
            "random": {"per_seed": rand,
                       "flip_mean": sum(r["flip"] for r in rand) / len(rand),
                       "flip_max": max(r["flip"] for r in rand)},
            "dense_class_mean": dense_flips(mean_diff),
            "dense_class_mean_norm": norm(mean_diff),
            "sparse": flips(sparse_before, sparse_after),
            "side_effects": _side_effects(sparse, dense, bridges, steer, scale, tasks=others,
                                          windows=windows),
        })  # fmt: skip
    return {"task": task, "node": node_id(node), "from": src,
            "to": dst, "site": steer.site, "positions": positions, "n_pairs": n_pairs,
            "side_pairs": side_pairs, "heldout_windows": 0 if windows is None else len(windows),
            "seeds": seeds, "value_from": steer.value_from, "value_to": steer.value_to,
            "n_test_prompts": len(dense_before), "rows": rows}  # fmt: skip


def format_steering(doc: dict[str, Any]) -> str:
    """The experiment as a table: one row per scale."""
    head = (f"node {doc['node']} ({doc['value_from']:+.3f} -> {doc['value_to']:+.3f}), "
            f"task {doc['task']} {doc['from']}->{doc['to']}, site {doc['site']}, positions "
            f"{doc['positions']}, {doc['n_test_prompts']} held-out prompts")  # fmt: skip
    cols = (f"{'scale':>6}{'|dh|':>8}{'bridged':>9}{'random':>13}{'dense mean':>11}"
            f"{'sparse':>8}{'dlogit br':>10}{'other tasks':>13}{'held-out':>16}")  # fmt: skip
    lines = [head, cols]
    for r in doc["rows"]:
        se = r["side_effects"]
        accs = list(se["tasks"].values())
        d_acc = sum(a["after"] - a["before"] for a in accs) / len(accs) if accs else None
        ho = se.get("heldout_loss")
        ho_s = f"{ho['before']:.3f}->{ho['after']:.3f}" if ho else "-"
        rnd = f"{r['random']['flip_mean']:.0%}/{r['random']['flip_max']:.0%}"
        lines.append(f"{r['scale']:>6g}{r['delta_norm']:>8.2f}{r['bridged']['flip']:>9.0%}"
                     f"{rnd:>13}{r['dense_class_mean']['flip']:>11.0%}"
                     f"{r['sparse']['flip']:>8.0%}{r['bridged']['dlogit']:>+10.2f}"
                     f"{'-' if d_acc is None else f'{d_acc:+.1%}':>13}{ho_s:>16}")  # fmt: skip
    lines.append("flip: share of held-out prompts choosing the from-answer that switch; random: "
                 "mean/max over seeds; other tasks: mean accuracy change")  # fmt: skip
    return "\n".join(lines)
