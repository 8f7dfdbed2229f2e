"""A planted-circuit model: a tiny GPT built by hand whose task is computed by a known node set.

Circuit checks are only worth something if they can fail. A trained model's true circuit is
unknown, so a check that passes on it proves little; here the answer is planted. The model does
the ``planted_quote`` task (close a string with the quote that opened it, the paper's
``single_double_quote`` in miniature) through exactly the nodes of :data:`PLANTED`, among
*distractor* nodes that carry the same signal but do not reach the answer:

- Residual channels: ``QTYPE`` (+1 for ``'``, -1 for ``"``, and +0.3 for every letter so that
  attention which does not find the quote gets the wrong answer), ``QFLAG`` (+1 on both quotes),
  ``CONST`` (+1 everywhere), and noise on the remaining channels.
- Layer 0 head 0 (planted): a constant query (a bias) and a key that reads ``QFLAG``, so the last
  position attends to the quote; its value reads ``QTYPE`` and ``attn_out`` writes it to channel
  ``COPY``. Head 1 is a distractor doing the same into channel ``COPY2``, which nothing reads.
- Layer 1 MLP neuron 0 (planted) reads ``COPY`` and writes channel ``ANSWER``, the only channel the
  two quote logits read with opposite signs. Neuron 1 (distractor) reads ``COPY`` and writes
  ``COMMON``, which raises both quote logits alike; layer 1's attention and layer 0's MLP are
  distractors too.
- Every weight matrix also gets small dense noise, so the sparsity pattern alone does not give the
  circuit away (a random re-initialisation on the same pattern must not recover it).

The query is a bias, so its activity is constant and mean ablation leaves it intact: it is not
part of the circuit under mean ablation (zero ablation would need it). Everything is seeded and
deterministic. Used by the test suite and documented in ``docs/circuits.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparsecircuits import tasks
from sparsecircuits.circuits.means import MEANS_FILE, activation_means, pretrain_windows, save_means
from sparsecircuits.circuits.nodes import Location, Node, NodeSpace
from sparsecircuits.circuits.pipeline import LoadedModel, ablation_values, describe, task_data
from sparsecircuits.circuits.prune import CircuitEvaluator, PruneConfig, PruneResult, gates_for
from sparsecircuits.circuits.schema import CircuitDoc
from sparsecircuits.data.tokenizer import Tokenizer, train_tokenizer
from sparsecircuits.model.config import GPTConfig
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.io import save_model, weights_hash
from sparsecircuits.tasks.base import Task, Template
from sparsecircuits.tasks.metrics import Calibration, calibrated, diff_loss

TASK = "planted_quote"
QTYPE, QFLAG, CONST, COPY, COPY2, ANSWER, COMMON = 0, 1, 2, 3, 4, 5, 6
D_MODEL, N_HEAD, D_HEAD, D_MLP = 16, 2, 4, 8
D_ATTN = N_HEAD * D_HEAD

# The planted circuit (mean ablation): layer 0 head 0's key and value with the residual reads
# they use and its write, then layer 1's neuron 0 with its read and write.
PLANTED: tuple[Node, ...] = (
    Node(0, Location.ATTN_IN, QTYPE),
    Node(0, Location.ATTN_IN, QFLAG),
    Node(0, Location.ATTN_K, 0),  # head 0, channel 0
    Node(0, Location.ATTN_V, 1),  # head 0, channel 1
    Node(0, Location.ATTN_OUT, COPY),
    Node(1, Location.MLP_IN, COPY),
    Node(1, Location.MLP_NEURON, 0),
    Node(1, Location.MLP_OUT, ANSWER),
)
# Nodes that carry the task's signal (or a copy of it) without reaching the answer.
DISTRACTORS: tuple[Node, ...] = (
    Node(0, Location.ATTN_K, D_HEAD),  # head 1 attends to the quote too
    Node(0, Location.ATTN_V, D_HEAD + 1),
    Node(0, Location.ATTN_OUT, COPY2),
    Node(0, Location.MLP_IN, COPY),
    Node(0, Location.MLP_NEURON, 0),
    Node(1, Location.ATTN_IN, COPY),
    Node(1, Location.ATTN_V, 1),
    Node(1, Location.MLP_NEURON, 1),
    Node(1, Location.MLP_OUT, COMMON),
)

# The planted circuit with every node swapped for a node of the same group that carries the same
# signal (head 1, neuron 1, their reads and writes) or none (the constant and a noise channel):
# a corrupted circuit that no check may pass.
DECOYS: tuple[Node, ...] = (
    Node(0, Location.ATTN_IN, CONST),
    Node(0, Location.ATTN_IN, 9),
    Node(0, Location.ATTN_K, D_HEAD),
    Node(0, Location.ATTN_V, D_HEAD + 1),
    Node(0, Location.ATTN_OUT, COPY2),
    Node(1, Location.MLP_IN, COPY2),
    Node(1, Location.MLP_NEURON, 1),
    Node(1, Location.MLP_OUT, COMMON),
)

_TRAIN = (
    Template("x = '{text}", "'", 'x = "{text}', '"', "\n", "\n", ("module",)),
    Template("{var} = ['{text}", "'", '{var} = ["{text}', '"', "]\n", "]\n", ("module",)),
    Template("f('{text}", "'", 'f("{text}', '"', ")\n", ")\n", ("module",)),
)
_TEST = (
    Template("print('{text}", "'", 'print("{text}', '"', ")\n", ")\n", ("module",)),
    Template("y = {{'{text}", "'", 'y = {{"{text}', '"', "}}\n", "}}\n", ("module",)),
)


def planted_task() -> Task:
    """The ``planted_quote`` task: module-level snippets (no docstrings, so the prompt holds one
    quote) that end inside a string; the answer is the quote that opened it."""
    return Task(name=TASK, description="planted-circuit test task: close the open quote",
                train=_TRAIN, test=_TEST)  # fmt: skip


def register_planted_task() -> None:
    """Register ``planted_quote`` and its three negative controls (idempotent). The controls use
    ``(`` and ``)``: single bytes whose logits no node of the model moves."""
    if TASK in tasks.names():
        return
    base = tasks.register(planted_task())
    tasks.register(tasks.constant_target(base, token_a="(", token_b=")"))
    tasks.register(tasks.arbitrary_mapping(base, a="(", b=")"))
    tasks.register(tasks.inverted(base))


def unregister_planted_task() -> None:
    """Remove what :func:`register_planted_task` added (so it never leaks into task tables)."""
    for name in (TASK, *(f"{TASK}__{k}" for k in ("constant", "arbitrary", "inverted"))):
        tasks.unregister(name)


def planted_tokenizer() -> Tokenizer:
    """A byte-level tokenizer (256 bytes, one merge of ``zq``, end-of-text): every character
    of the task's prompts is one token."""
    return train_tokenizer(["zq " * 64], vocab_size=258)


def planted_config(vocab_size: int) -> GPTConfig:
    """2 layers, d_model 16, 2 heads of 4, 8 neurons; RMSNorm, biases; no activation sparsity,
    bigram table, attention sink or position embedding (nothing outside the node space)."""
    return GPTConfig(
        block_size=128, vocab_size=vocab_size, n_layer=2, n_head=N_HEAD, d_head=D_HEAD,
        d_model=D_MODEL, d_mlp=D_MLP, afrac=None, enable_bigram_table=False, sink=False,
        learned_pos_emb=False,
    )  # fmt: skip


@torch.no_grad()
def planted_model(
    tokenizer: Tokenizer,
    *,
    gain: float = 2.0,
    noise: float = 0.02,
    leak_control: bool = False,
    seed: int = 0,
) -> GPT:
    """The hand-built model (eval mode, requires_grad off). ``gain``: weight of ``ANSWER`` in
    the two quote logits (2.0 gives a full-model loss of about 0.01 nats, the margin of a
    trained model; a larger gain saturates the loss and starves pruning of gradient). ``noise``:
    std of the dense noise
    added to every weight matrix. ``leak_control``: also wire ``ANSWER`` into the logits of
    ``(``/``)``, so the arbitrary-mapping control becomes doable with the same circuit (a model
    on which the negative-control check must fail)."""
    model = GPT(planted_config(tokenizer.vocab_size))
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 2:  # noise on weights; biases and norm gains stay exact
            p.copy_(noise * torch.randn(p.shape, generator=gen))
        elif not name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.zero_()
    tok = {c: tokenizer.encode(c)[0] for c in "'\"()"}
    wte = model.transformer.wte.weight
    wte[:, CONST] = 1.0
    for c in "abcdefghijklmnopqrstuvwxyz":
        wte[tokenizer.encode(c)[0], QTYPE] = 0.3
    wte[tok["'"], QTYPE], wte[tok['"'], QTYPE] = 1.0, -1.0
    wte[tok["'"], QFLAG] = wte[tok['"'], QFLAG] = 1.0
    b0, b1 = model.transformer.h
    # Layer 0 attention: both heads attend to quotes (constant query, key on QFLAG).
    qkv, proj = b0.attn.c_attn, b0.attn.c_proj
    for head, out in ((0, COPY), (1, COPY2)):
        h = head * D_HEAD
        qkv.bias[h] = 4.0  # query channel 0 of the head: a constant
        qkv.weight[D_ATTN + h, :] = 0.0
        qkv.weight[D_ATTN + h, QFLAG] = 1.5  # key channel 0 reads the quote flag
        qkv.weight[2 * D_ATTN + h + 1, QTYPE] = 2.0  # value channel 1 reads the quote type
        proj.weight[out, h + 1] = 1.0
    qkv.weight[:D_ATTN, :] = 0.0  # queries are biases only: constant activity

    # Every neuron runs in GELU's near-linear range (bias 4, small input weight, the offset
    # removed by the write's bias), so A and B prompts see mirror-image activity and no
    # distractor helps one side through a norm's scale.
    def linear_neuron(mlp, neuron: int, read: int, write: int, scale: float) -> None:
        mlp.c_fc.weight[neuron, read], mlp.c_fc.bias[neuron] = 0.5, 4.0
        mlp.c_proj.weight[write, neuron] = scale
        mlp.c_proj.bias[write] = -4.0 * scale

    # Layer 0 MLP (distractor): a neuron reading COPY, writing a channel nothing reads.
    linear_neuron(b0.mlp, 0, COPY, 9, 1.0)
    # Layer 1 attention (distractor): value reads COPY, written to a channel nothing reads.
    b1.attn.c_attn.weight[2 * D_ATTN + 1, COPY] = 2.0
    b1.attn.c_proj.weight[10, 1] = 1.0
    # Layer 1 MLP: neuron 0 (planted) reads COPY -> ANSWER; neuron 1 (distractor) reads COPY
    # -> COMMON, which moves both quote logits alike.
    linear_neuron(b1.mlp, 0, COPY, ANSWER, 2.0)
    linear_neuron(b1.mlp, 1, COPY, COMMON, 0.5)
    head = model.lm_head.weight
    head[tok["'"], ANSWER], head[tok['"'], ANSWER] = gain, -gain
    head[tok["'"], COMMON] = head[tok['"'], COMMON] = 2.0
    if leak_control:
        head[tok["("], ANSWER], head[tok[")"], ANSWER] = gain, -gain
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def planted_flat(space: NodeSpace, nodes: tuple[Node, ...] = PLANTED) -> torch.Tensor:
    """Flat indices (ascending) of ``nodes`` in ``space``."""
    return torch.tensor(sorted(space.flat_index(n) for n in nodes), dtype=torch.long)


def circuit_for_nodes(
    lm: LoadedModel,
    task: str,
    flat: torch.Tensor,
    cfg: PruneConfig,
    *,
    calibration: Calibration | None = None,
) -> CircuitDoc:
    """A circuit document for a given node set (flat indices), measured and described exactly
    as pruning describes its result: the planted circuit, or a corrupted copy of it."""
    space = NodeSpace(lm.model.config, mask_embed=cfg.mask_embed)
    data = task_data(lm, task, cfg)
    ablation = ablation_values(lm, space, cfg.ablation, data.train_batch)
    ev = CircuitEvaluator(lm.model, space=space, ablation=ablation, frozen_norms=cfg.frozen_norms)
    inside = torch.zeros(space.total, dtype=torch.bool)
    inside[flat] = True
    tau = torch.where(inside, 1.0, -1.0)
    order = torch.sort(-tau, stable=True).indices
    gates = gates_for(space, flat)
    d = ev.diffs(data.judge, gates)
    loss = diff_loss(calibrated(d, data.judge.signs.cpu(), calibration))
    result = PruneResult(
        config=cfg, space=space, tau=tau, order=order, k=len(flat),
        reached=loss <= cfg.target_loss, loss_full=ev.loss(data.judge, torch.ones(space.total))[0],
        loss_circuit=loss, calibration=calibration,
    )  # fmt: skip
    return describe(lm, task, cfg, ev, data, result)


def save_planted_model(directory: str | Path, **options) -> Path:
    """Write the planted model as a model directory (config, weights, tokenizer, and its
    pretraining means over the stdlib corpus's held-out files) that every command accepts.
    ``options`` go to :func:`planted_model`. Returns the directory."""
    directory = Path(directory)
    tokenizer = planted_tokenizer()
    model = planted_model(tokenizer, **options)
    save_model(model, directory)
    tokenizer.save(directory)
    windows = pretrain_windows(tokenizer, n_windows=32, length=model.config.block_size)
    means = activation_means(model, windows, space=NodeSpace(model.config))
    save_means(means, directory / MEANS_FILE, model_hash=weights_hash(model))
    return directory
