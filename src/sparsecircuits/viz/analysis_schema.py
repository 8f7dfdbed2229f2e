"""``analysis.json``: everything costly the dashboard shows, computed once beside ``circuit.json``.

Schema ``sparsecircuits.analysis`` version 1 (written by ``sparsecircuits analyze``; see
``viz/analysis.py``). Extend only by adding fields. Floats are rounded to 4 significant digits.
``load_analysis`` refuses a file whose ``circuit_weights_hash`` differs from the circuit's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparsecircuits.errors import CheckpointError
from sparsecircuits.model.config import format_validation_error

SCHEMA = "sparsecircuits.analysis"
VERSION = 1
ANALYSIS_FILE = "analysis.json"
QUANTILES = (0.001, 0.01, 0.1, 0.5)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Snippet(_Doc):
    """A pretraining-text excerpt around one token (``focus`` indexes ``tokens``/``acts``)."""

    q: float  # the quantile this snippet stands for (top: 1-q of the activations, bottom: q)
    value: float  # the node's activation at the focus token
    tokens: list[str]  # ~24 tokens of context before the focus token, the focus, 4 after
    acts: list[float]  # this node's activation per token (len == len(tokens))
    focus: int  # index of the focus token in ``tokens``


class PromptActs(_Doc):
    """One task prompt and the node's activation at each of its tokens."""

    tokens: list[str]
    acts: list[float]


class NodeStats(_Doc):
    """Statistics of a node's activation over all pretraining-window tokens."""

    mean: float
    std: float
    frac_nonzero: float  # fraction of tokens with activation != 0 (AbsTopK zeros most)
    min: float
    max: float


class Samples(_Doc):
    top: list[Snippet]  # one per quantile q: activation at the (1-q) quantile (q=0.001 ~ max)
    bottom: list[Snippet]  # one per quantile q: activation at the q quantile (q=0.001 ~ min)


class TaskActs(_Doc):
    """The node on the task's first pairs (train split): prompt A / prompt B per pair."""

    a: list[PromptActs]
    b: list[PromptActs]
    mean_a: float  # mean activation at the final position over the pairs' A prompts
    mean_b: float


class NodeAnalysis(_Doc):
    site: str  # hook site, e.g. "0.attn.q"
    channel: int  # channel index at the site (== the node's index)
    stats: NodeStats
    samples: Samples
    task: TaskActs


class HeadAttention(_Doc):
    """One attention head on task prompt A[0] (T tokens)."""

    prompt: list[str]  # the T token strings
    pattern: list[list[float]]  # (T, T+1): softmax attention, column 0 is the attention sink
    channels: dict[str, list[list[float | None]]]  # channel C within the head (kept at q or k)
    # -> (T, T) its share of the attention logit q_C * k_C / sqrt(d_head); null above the
    # diagonal (causal mask)


class Histogram(_Doc):
    edges: list[float]  # bins + 1 edges
    counts: list[int]


class EmbedChannel(_Doc):
    """Token-embedding column ``wte[:, C]`` of a residual channel C the circuit reads/writes."""

    top: list[tuple[str, float]]  # 10 tokens with the largest weight: [token, weight]
    bottom: list[tuple[str, float]]  # 10 tokens with the smallest weight
    hist: Histogram  # histogram of the column over the vocabulary (30 bins)


class Embeddings(_Doc):
    channels: dict[str, EmbedChannel]  # residual channel index (as str) -> its wte column
    wpe: list[list[float]] | None  # (block_size, d_model) positional embedding, 4 d.p.


class Targets(_Doc):
    """The two answer tokens of the task's first pair and the circuit's direct path to them."""

    tokens: list[str]  # [prompt A's answer, prompt B's answer] of pair 0
    ids: list[int]
    direct: dict[str, list[float]]  # residual write node id -> [weight to tokens[0], to [1]]:
    # ln_f.weight[C] * lm_head[token, C], the node's direct effect per unit (ignores the norm's
    # 1/rms scale)


class MetricRow(_Doc):
    """One training-log record (``metrics.jsonl`` of the model's run)."""

    step: int
    train_loss: float | None = None  # nats/token, mean over the logging window
    val_loss: float | None = None  # only on evaluation steps
    l0_frac: float | None = None  # fraction of weights kept by the sparsity schedule
    dead_neurons: int | None = None  # summed over layers, evaluation steps only


class AnalysisDoc(_Doc):
    schema_: Literal["sparsecircuits.analysis"] = Field(SCHEMA, alias="schema")
    version: int = VERSION
    circuit_weights_hash: str  # == circuit.json model.weights_hash
    task: str
    corpus: str  # "stdlib": the pretraining windows statistics and snippets come from
    n_windows: int
    window: int  # tokens per window (the model's block size)
    quantiles: list[float]
    nodes: dict[str, NodeAnalysis]  # every circuit node, keyed by its circuit.json id
    attention: dict[str, HeadAttention]  # "L.H" for heads with any kept q/k/v node
    embeddings: Embeddings
    metrics: list[MetricRow] | None  # the training log, if the model's run has metrics.jsonl
    targets: Targets | None = None  # the two target logits (graph's last column)
    seconds: float = 0.0  # time the analysis took


def dump_analysis(doc: AnalysisDoc) -> dict:
    """The JSON object to write (key ``schema`` first)."""
    return doc.model_dump(mode="json", by_alias=True)


def load_analysis(path: str | Path, *, weights_hash: str | None = None) -> AnalysisDoc:
    """Read and validate ``analysis.json`` (or a circuit directory holding it).

    With ``weights_hash`` (``None``: read the one in the directory's ``circuit.json``), refuse
    (CheckpointError) a file computed for other weights.
    """
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if path.is_dir():
        path = path / ANALYSIS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: no analysis file; run `sparsecircuits analyze {directory}`"
        ) from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON analysis file ({err})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise CheckpointError(f'{path}: not an analysis file (expected "schema": "{SCHEMA}")')
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: analysis schema version {data.get('version')!r}; this sparsecircuits "
            f"reads version {VERSION}; rerun `sparsecircuits analyze --force`"
        )
    try:
        doc = AnalysisDoc.model_validate(data)
    except ValidationError as err:
        raise CheckpointError(format_validation_error(err, source=str(path))) from None
    if weights_hash is None:
        weights_hash = _circuit_hash(directory)
    if weights_hash is not None and doc.circuit_weights_hash != weights_hash:
        raise CheckpointError(
            f"{path}: computed for weights sha256 {doc.circuit_weights_hash[:12]}..., but the "
            f"circuit's model hashes to {weights_hash[:12]}...; rerun "
            f"`sparsecircuits analyze {directory} --force`"
        )
    return doc


def _circuit_hash(directory: Path) -> str | None:
    """The model weights hash recorded in ``directory/circuit.json`` (None if unreadable)."""
    try:
        data = json.loads((directory / "circuit.json").read_text())
        return str(data["model"]["weights_hash"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
