"""The dashboard's playground, without Streamlit: run a Python snippet through the model, read
the next-token distribution and every circuit node's activation per token, and ablate or patch
chosen nodes live (ablation through ``circuits.masking``'s interventions).

Everything here is one or two forward passes of a short prompt, cheap enough to run on a click.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sparsecircuits import tasks
from sparsecircuits.circuits.masking import Ablation, mask_interventions
from sparsecircuits.circuits.nodes import Location, Node, NodeSpace
from sparsecircuits.circuits.pipeline import LoadedModel, ablation_values
from sparsecircuits.circuits.schema import CircuitDoc
from sparsecircuits.data.tokenizer import Tokenizer
from sparsecircuits.errors import InputError
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.hooks import Intervention

Mode = Literal["ablate", "patch"]


@dataclass(frozen=True)
class TokenProb:
    """One candidate next token: its id, readable text, probability and logit."""

    id: int
    token: str
    prob: float
    logit: float


@dataclass(frozen=True)
class TargetLogit:
    """A task answer token's logit at the last position, clean and with the intervention."""

    id: int
    token: str
    clean: float
    changed: float

    @property
    def delta(self) -> float:
        return self.changed - self.clean


@dataclass(frozen=True)
class TaskExample:
    """The task's first pair: both prompts and both answer tokens (A's answer first)."""

    prompt_a: str
    prompt_b: str
    target_ids: tuple[int, int]
    target_tokens: tuple[str, str]


@dataclass(frozen=True)
class PlaygroundResult:
    """What the playground shows for one prompt.

    ``acts``/``acts_changed``: (n_nodes, T) activation of each node in ``node_ids`` per token,
    clean and under the intervention (equal when no node is chosen). ``top``/``top_changed``:
    the most likely next tokens. ``targets``: the two task tokens' logits.
    """

    tokens: list[str]
    node_ids: list[str]
    acts: torch.Tensor
    acts_changed: torch.Tensor
    top: list[TokenProb]
    top_changed: list[TokenProb]
    targets: list[TargetLogit]
    changed_nodes: list[str]
    mode: Mode
    continuation: str | None = None  # greedy continuation of the prompt, clean
    continuation_changed: str | None = None  # ... with the nodes ablated (ablate mode only)

    @property
    def logit_diff(self) -> tuple[float, float] | None:
        """(clean, changed) logit of target A minus target B, or None without two targets."""
        if len(self.targets) != 2:
            return None
        a, b = self.targets
        return a.clean - b.clean, a.changed - b.changed


def parse_node_id(node_id: str) -> Node:
    """A :class:`Node` from its circuit.json id (``L.loc.index`` or ``embed.T``)."""
    parts = node_id.split(".")
    try:
        if len(parts) == 2 and parts[0] == "embed":
            return Node(-1, Location.EMBED, int(parts[1]))
        if len(parts) == 3:
            return Node(int(parts[0]), Location(parts[1]), int(parts[2]))
    except ValueError:
        pass
    raise InputError(f"{node_id!r} is not a node id (expected L.loc.index or embed.T)")


def encode_prompt(tokenizer: Tokenizer, text: str, *, block_size: int) -> list[int]:
    """Token ids of ``text``, left-truncated to the model's context."""
    ids = tokenizer.encode(text)
    if not ids:
        raise InputError("the prompt is empty; type some Python")
    return ids[-block_size:]


def task_example(doc: CircuitDoc, tokenizer: Tokenizer, *, block_size: int) -> TaskExample:
    """The first pair of the circuit's task (its split and seed), as text and answer tokens."""
    batch = tasks.get(doc.task).build(
        tokenizer, split=doc.split, n=1, seed=doc.seed, max_len=block_size
    )
    raw = batch.raw[0]
    ids = (int(batch.target_a[0]), int(batch.target_b[0]))
    return TaskExample(raw.prompt_a, raw.prompt_b, ids, (batch.tokens_a[0], batch.tokens_b[0]))


def top_tokens(logits: torch.Tensor, tokenizer: Tokenizer, *, k: int = 10) -> list[TokenProb]:
    """The ``k`` most likely next tokens of one position's logits (V,)."""
    probs = torch.softmax(logits.float(), dim=-1)
    p, i = probs.topk(min(k, probs.numel()))
    return [
        TokenProb(int(t), tokenizer.id_to_token(int(t)), float(pv), float(logits[int(t)]))
        for pv, t in zip(p, i, strict=True)
    ]


def ablation_interventions(
    model: GPT,
    space: NodeSpace,
    ablation: Ablation,
    nodes: Sequence[Node],
    idx: torch.Tensor,
) -> dict[str, Intervention]:
    """Interventions replacing ``nodes`` by their ablation values (every other node kept)."""
    gates = torch.ones(space.total)
    for n in nodes:
        gates[space.flat_index(n)] = 0.0
    dev = next(model.parameters()).device
    ablation = ablation.to(dev)
    return mask_interventions(model, space, gates.to(dev), ablation, idx=idx, skip_full=True)


def patch_interventions(
    model: GPT, nodes: Sequence[Node], source_idx: torch.Tensor
) -> dict[str, Intervention]:
    """Interventions setting ``nodes`` to their activations on the source prompt (1, S).

    Positions are aligned at the end (the last token takes the source's last token's value);
    positions before the source's start keep their own activations.
    """
    if any(n.loc is Location.EMBED for n in nodes):
        raise InputError("token nodes cannot be patched; ablate them instead")
    by_site: dict[str, list[int]] = {}
    for n in nodes:
        by_site.setdefault(n.site, []).append(n.index)
    if not by_site:
        return {}
    _, cache = model.run_with_cache(source_idx, names=sorted(by_site))

    def make(src: torch.Tensor, chans: list[int]) -> Intervention:
        ch = torch.tensor(chans, device=src.device)

        def fn(x: torch.Tensor) -> torch.Tensor:
            n = min(x.shape[1], src.shape[1])
            out = x.clone()
            out[:, -n:, ch] = src[:, -n:, ch].to(x.dtype)
            return out

        return fn

    return {site: make(cache[site], chans) for site, chans in by_site.items()}


@torch.no_grad()
def node_activations(
    model: GPT,
    idx: torch.Tensor,
    nodes: Sequence[Node],
    *,
    interventions: Mapping[str, Intervention] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (T, V) and each node's activation per token (n_nodes, T) for one prompt (1, T).

    A token node's "activation" is 1 where the token is its own, else 0.
    """
    sites = sorted({n.site for n in nodes if n.loc is not Location.EMBED})
    logits, cache = model.run_with_cache(idx, names=sites, interventions=interventions)
    t = idx.shape[1]
    acts = torch.zeros(len(nodes), t)
    for row, n in enumerate(nodes):
        if n.loc is Location.EMBED:
            acts[row] = (idx[0] == n.index).float().cpu()
        else:
            acts[row] = cache[n.site][0, :, n.index].float().cpu()
    return logits[0].float().cpu(), acts


@torch.no_grad()
def run_playground(
    model: GPT,
    tokenizer: Tokenizer,
    text: str,
    *,
    doc: CircuitDoc,
    ablation: Ablation | None = None,
    change: Sequence[str] = (),
    mode: Mode = "ablate",
    source_text: str | None = None,
    target_ids: Sequence[int] = (),
    k: int = 10,
    continue_tokens: int = 0,
) -> PlaygroundResult:
    """Run ``text`` clean and with the nodes ``change`` (circuit.json ids) ablated (``mode``
    "ablate", with ``ablation``'s values) or patched from ``source_text`` ("patch").

    ``target_ids``: the task tokens whose last-position logits are compared (usually two).
    ``continue_tokens``: also continue the prompt greedily by that many tokens (KV-cached),
    clean and, when ablating, with the nodes ablated at every position.
    """
    block = model.config.block_size
    dev = next(model.parameters()).device
    ids = encode_prompt(tokenizer, text, block_size=block)
    idx = torch.tensor([ids], device=dev)
    nodes = [parse_node_id(n.id) for n in doc.nodes]
    node_ids = [n.id for n in doc.nodes]
    chosen = [parse_node_id(c) for c in change]
    logits, acts = node_activations(model, idx, nodes)
    interventions = _interventions(
        model, tokenizer, doc, chosen, idx, mode=mode, ablation=ablation, source_text=source_text
    )
    if interventions:
        logits2, acts2 = node_activations(model, idx, nodes, interventions=interventions)
    else:
        logits2, acts2 = logits, acts
    last, last2 = logits[-1], logits2[-1]
    targets = [
        TargetLogit(int(t), tokenizer.id_to_token(int(t)), float(last[t]), float(last2[t]))
        for t in target_ids
    ]
    cont = cont_changed = None
    if continue_tokens > 0:
        cont = continue_greedily(model, tokenizer, idx, n_new=continue_tokens)
        if interventions and mode == "ablate":
            if any(n.loc is Location.EMBED for n in chosen):
                raise InputError("continuing with token nodes ablated is not supported")
            cont_changed = continue_greedily(
                model, tokenizer, idx, n_new=continue_tokens, interventions=interventions
            )
    return PlaygroundResult(
        continuation=cont,
        continuation_changed=cont_changed,
        tokens=[tokenizer.id_to_token(i) for i in ids],
        node_ids=node_ids,
        acts=acts,
        acts_changed=acts2,
        top=top_tokens(last, tokenizer, k=k),
        top_changed=top_tokens(last2, tokenizer, k=k),
        targets=targets,
        changed_nodes=list(change),
        mode=mode,
    )


def continue_greedily(
    model: GPT,
    tokenizer: Tokenizer,
    idx: torch.Tensor,
    *,
    n_new: int,
    interventions: Mapping[str, Intervention] | None = None,
) -> str:
    """The text of ``n_new`` greedy tokens after the prompt idx (1, T) (KV-cached; stops early
    at ``<|endoftext|>``). ``interventions`` must act on each position alike."""
    out = model.generate(idx, max_new_tokens=n_new, temperature=0, interventions=interventions)
    new = out[0, idx.shape[1] :].tolist()
    eot = tokenizer.eot_id
    if eot in new:
        new = new[: new.index(eot)]
    return tokenizer.decode(new)


def _interventions(
    model: GPT,
    tokenizer: Tokenizer,
    doc: CircuitDoc,
    chosen: list[Node],
    idx: torch.Tensor,
    *,
    mode: Mode,
    ablation: Ablation | None,
    source_text: str | None,
) -> dict[str, Intervention]:
    if not chosen:
        return {}
    if mode == "ablate":
        if ablation is None:
            raise InputError("ablating nodes needs ablation values")
        space = NodeSpace(model.config, mask_embed=doc.mask_embed)
        return ablation_interventions(model, space, ablation, chosen, idx)
    if mode == "patch":
        if not source_text:
            raise InputError("patching needs a source prompt")
        src = encode_prompt(tokenizer, source_text, block_size=model.config.block_size)
        return patch_interventions(model, chosen, torch.tensor([src], device=idx.device))
    raise InputError(f"unknown playground mode {mode!r}; expected ablate or patch")


def circuit_ablation(lm: LoadedModel, doc: CircuitDoc, *, kind: str | None = None) -> Ablation:
    """Ablation values of ``kind`` (default: the circuit's own) for the circuit's node space:
    pretraining means (cached on disk after the first time), zeros, or task means."""
    kind = kind or doc.ablation
    space = NodeSpace(lm.model.config, mask_embed=doc.mask_embed)
    train = None
    if kind == "task_mean":
        train = tasks.get(doc.task).build(
            lm.tokenizer,
            split=doc.split,
            n=doc.n_pairs,
            seed=doc.seed,
            max_len=lm.model.config.block_size,
        )
    return ablation_values(lm, space, kind, train)
