"""Interchange intervention: does the circuit carry the task's information?

Ablation asks whether a circuit is enough to keep the answer; interchange asks whether it carries
the answer. For each held-out pair (A, B) the receiving prompt A is run through the full model
with the circuit's node values replaced by those the same nodes take on the source prompt B (and
likewise B <- A). If the circuit is where the model keeps the distinguishing information, A's
output follows B's answer. Positions are aligned from the end (the last position of A receives
B's last position, and so on back over the shorter prompt), which is exact when the two prompts
have equal length, as most pairs of a template do; the report counts the pairs that do not.
Token-embedding nodes are not patched (they are token identities, not activations).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from sparsecircuits.circuits.nodes import SITE, Location, NodeSpace
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Hooks
from sparsecircuits.tasks.batch import TaskBatch
from sparsecircuits.tasks.metrics import logit_diffs, pad_prompts


@dataclass(frozen=True)
class Interchange:
    """Per patched prompt (2n: every A receiving from its B, then every B from its A):
    ``diffs`` = z[source's answer] - z[receiver's answer] at the receiver's last position
    (positive: the output follows the source). ``equal_length`` pairs were patched at every
    position; ``n_patched_nodes`` excludes token-embedding nodes."""

    diffs: torch.Tensor  # (2n,)
    equal_length: int
    n_pairs: int
    n_patched_nodes: int


def _sites(space: NodeSpace, kept: torch.Tensor) -> dict[str, list[int]]:
    """Hook site -> channels of the circuit's nodes there (embedding nodes left out)."""
    out: dict[str, list[int]] = defaultdict(list)
    for node in space.nodes(kept.tolist()):
        if node.loc is not Location.EMBED:
            out[f"{node.layer}.{SITE[node.loc]}"].append(node.index)
    return dict(out)


def _patched_last_logits(
    model: GPT,
    sites: dict[str, torch.Tensor],
    receivers: list[list[int]],
    sources: list[list[int]],
) -> torch.Tensor:
    """Last-position logits (n, V) of ``receivers`` with the ``sites`` channels taken from the
    same-row ``sources`` (aligned from the end)."""
    dev = next(model.parameters()).device
    idx_r, len_r = (t.to(dev) for t in pad_prompts(receivers))
    idx_s, len_s = (t.to(dev) for t in pad_prompts(sources))
    cache = Hooks(cache_names=sites)
    model(idx_s, hooks=cache)
    # Receiver position p takes source position p - len_r + len_s, over the last m positions.
    pos = torch.arange(idx_r.shape[1], device=dev)[None, :]
    m = torch.minimum(len_r, len_s)[:, None]
    mask = ((pos >= len_r[:, None] - m) & (pos < len_r[:, None]))[..., None]  # (n, T_r, 1)
    src_pos = (pos - len_r[:, None] + len_s[:, None]).clamp(0, idx_s.shape[1] - 1)
    rows = torch.arange(len(idx_r), device=dev)[:, None]

    def patch(x: torch.Tensor, site: str) -> torch.Tensor:
        ch = sites[site]
        src = cache.cache[site][rows, src_pos][..., ch]  # (n, T_r, c)
        x = x.clone()
        x[..., ch] = torch.where(mask, src, x[..., ch])
        return x

    hooks = Hooks(interventions={s: (lambda x, s=s: patch(x, s)) for s in sites})
    logits = model(idx_r, hooks=hooks)[0]  # (n, T_r, V)
    return logits[torch.arange(len(idx_r), device=dev), len_r - 1].float().cpu()


@torch.no_grad()
def interchange(
    model: GPT, space: NodeSpace, kept: torch.Tensor, batch: TaskBatch, *, chunk: int = 32
) -> Interchange:
    """Patch the nodes ``kept`` (flat indices) from source to receiver for every pair of
    ``batch`` in both directions and score the receiver against the source's answer."""
    dev = next(model.parameters()).device
    receivers = [*batch.prompts_a, *batch.prompts_b]
    sources = [*batch.prompts_b, *batch.prompts_a]
    recv_ans = torch.cat([batch.target_a, batch.target_b])
    src_ans = torch.cat([batch.target_b, batch.target_a])
    sites = {s: torch.tensor(c, device=dev) for s, c in _sites(space, kept).items()}
    out = []
    for start in range(0, len(receivers), chunk):
        sl = slice(start, start + chunk)
        last = _patched_last_logits(model, sites, receivers[sl], sources[sl])  # (n, V)
        out.append(logit_diffs(last, src_ans[sl], recv_ans[sl]))
    equal = sum(len(a) == len(b) for a, b in zip(batch.prompts_a, batch.prompts_b, strict=True))
    n_nodes = sum(len(c) for c in sites.values())
    return Interchange(torch.cat(out), equal, batch.n, n_nodes)
