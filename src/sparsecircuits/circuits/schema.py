"""``circuit.json``: the versioned file a pruning run writes (schema ``sparsecircuits.circuit``
version 1; documented field by field in ``docs/circuits.md``).

Scripts may rely on the top-level keys ``n_nodes``, ``n_edges`` and
``loss: {"full", "circuit", "circuit_test"}``. Loading checks the model's weights hash and refuses
a different model with a one-line error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sparsecircuits.circuits.nodes import Location, Node, NodeSpace
from sparsecircuits.errors import CheckpointError
from sparsecircuits.fileio import atomic_write_json
from sparsecircuits.model.config import format_validation_error, read_width

if TYPE_CHECKING:  # torch-free at import: the dashboard reads circuit files without torch
    from sparsecircuits.circuits.edges import Edge
    from sparsecircuits.model.gpt import GPT

SCHEMA = "sparsecircuits.circuit"
VERSION = 1
CIRCUIT_FILE = "circuit.json"
EDGES_FILE = "edges.safetensors"  # src, dst (flat node indices), kind (index into KINDS), weight


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Doc):
    id: str  # what the user passed (shipped name or path)
    weights_hash: str  # sha256 of config + tensors (model/io.py weights_hash)
    n_layer: int
    d_model: int
    n_head: int
    d_head: int
    d_mlp: int
    d_pos_emb: int | None = None  # concatenated position channels (reads are wider)


class NodeRec(_Doc):
    id: str  # "L.loc.index" ("embed.T" for token nodes)
    layer: int  # -1 for the token embedding
    loc: Location
    index: int
    head: int | None = None  # q/k/v nodes: head and channel within the head
    channel: int | None = None
    tau: float  # the learned mask logit (nodes are ranked by it)
    delta: float | None = None  # task-loss change when this node alone is ablated


class EdgeRec(_Doc):
    src: str
    dst: str
    kind: str
    weight: float


class Losses(_Doc):
    full: float  # unpruned model, train split (per-prompt mean, nats)
    circuit: float  # circuit, train split
    circuit_test: float  # circuit, held-out test templates
    full_test: float


class CalibrationRec(_Doc):
    """A logit calibration ``scale * d + shift * s`` (``tasks.metrics.Calibration``). The
    scale is positive: a calibration that inverts the logits would turn a circuit that does the
    opposite of the task into one that "reaches" the target."""

    scale: float = Field(gt=0, allow_inf_nan=False)
    shift: float = Field(allow_inf_nan=False)


class LayerDelta(_Doc):
    layer: int
    block: Literal["attn", "mlp"]
    n_nodes: int
    delta: float  # task-loss change when this block's circuit nodes are all ablated


class ImportRec(_Doc):
    """Where an imported circuit came from (``sparsecircuits import-viz``). Circuits found by
    ``prune`` have none, and their files leave the key out."""

    format: str  # "openai.viz_data": a viz_data.pt published by OpenAI
    file: str  # the imported file, as given
    sha256: str  # of that file
    loss_scale: float  # factor taking the file's task losses to ours (0.5: per-pair sums)
    placeholders: list[str]  # fields of this document the file does not record (stand-ins)
    official: dict[str, Any]  # the file's own bookkeeping (JSON-converted)


class CircuitDoc(_Doc):
    schema_: Literal["sparsecircuits.circuit"] = SCHEMA
    version: int = VERSION
    created: str
    model: ModelRef
    task: str
    split: str
    n_pairs: int
    n_test_pairs: int
    seed: int
    ablation: Literal["mean", "zero", "task_mean"]
    mask_embed: bool
    frozen_norms: bool
    target_loss: float
    reached: bool
    calibration: CalibrationRec | None
    prune_config: dict[str, Any]
    total_nodes: int
    n_nodes: int
    n_edges: int
    n_weight_edges: int
    n_nodes_by_location: dict[str, int]
    n_edges_by_kind: dict[str, int]
    loss: Losses
    accuracy: dict[str, float]
    delta_method: Literal["exact", "linear"]
    nodes: list[NodeRec]
    edges: list[EdgeRec]  # empty when edges_file is set (more than 50,000 edges)
    edges_file: str | None = None  # edges.safetensors beside circuit.json (flat node ids)
    layer_deltas: list[LayerDelta]
    pruning_curve: list[dict[str, float]]
    k_curve: list[dict[str, float]]
    seconds: float
    imported_from: ImportRec | None = None  # only for imported circuits (docs/interop.md)

    @model_validator(mode="after")
    def _nodes_fit_the_model(self) -> CircuitDoc:
        """``n_nodes`` counts the node list, and every node exists in the recorded model (a
        circuit that names a channel the model lacks would silently index another one)."""
        if self.n_nodes != len(self.nodes):
            raise ValueError(
                f"n_nodes is {self.n_nodes} but the file lists {len(self.nodes)} nodes"
            )
        m = self.model
        sizes = {
            Location.ATTN_Q: m.n_head * m.d_head,
            Location.ATTN_K: m.n_head * m.d_head,
            Location.ATTN_V: m.n_head * m.d_head,
            Location.MLP_NEURON: m.d_mlp,
            Location.ATTN_IN: read_width(m.d_model, m.d_pos_emb),
            Location.MLP_IN: read_width(m.d_model, m.d_pos_emb),
        }
        seen: set[tuple[int, str, int]] = set()
        for n in self.nodes:
            if n.loc is Location.EMBED:
                ok_layer, size = n.layer == -1, None
            else:
                ok_layer, size = 0 <= n.layer < m.n_layer, sizes.get(n.loc, m.d_model)
            if not ok_layer:
                want = "-1" if n.loc is Location.EMBED else f"0..{m.n_layer - 1}"
                raise ValueError(f"node {n.id}: layer {n.layer} outside {want}")
            if n.index < 0 or (size is not None and n.index >= size):
                bound = "" if size is None else f", {size}"
                raise ValueError(
                    f"node {n.id}: index {n.index} outside [0{bound}) at {n.loc.value}"
                )
            key = (n.layer, n.loc.value, n.index)
            if key in seen:
                raise ValueError(f"node {n.id} is listed twice")
            seen.add(key)
        return self

    def kept_nodes(self) -> list[Node]:
        """The circuit's nodes."""
        return [Node(n.layer, n.loc, n.index) for n in self.nodes]

    def kept_flat(self, space: NodeSpace) -> list[int]:
        """Flat indices of the circuit's nodes in ``space`` (the model's numbering)."""
        return sorted(space.flat_index(n) for n in self.kept_nodes())


def model_label(spec: str) -> str:
    """A short directory-safe name for a model spec (shipped name, or the directory's name):
    the ``<model>`` of the default output layout ``runs/<model>/<task>/<timestamp>/``."""
    p = Path(spec)
    name = p.parent.name if p.name == "model" else p.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def node_record(node: Node, *, d_head: int, tau: float, delta: float | None) -> NodeRec:
    hc = node.head_channel(d_head)
    return NodeRec(
        id=node_id(node),
        layer=node.layer,
        loc=node.loc,
        index=node.index,
        head=hc[0] if hc else None,
        channel=hc[1] if hc else None,
        tau=tau,
        delta=delta,
    )


def node_id(node: Node) -> str:
    """``L.loc.index`` (``embed.T`` for token nodes): the id edges refer to."""
    if node.loc is Location.EMBED:
        return f"embed.{node.index}"
    return f"{node.layer}.{node.loc.value}.{node.index}"


def edge_record(edge: Edge) -> EdgeRec:
    return EdgeRec(src=node_id(edge.src), dst=node_id(edge.dst), kind=edge.kind, weight=edge.weight)


def circuit_dict(doc: CircuitDoc) -> dict[str, Any]:
    """circuit.json's object: key ``schema`` first; ``imported_from`` only when set, so pruned
    circuits' files stay as they always were."""
    data = doc.model_dump(mode="json", by_alias=False)
    data = {"schema": data.pop("schema_"), **data}
    if data.get("imported_from") is None:
        data.pop("imported_from", None)
    return data


def save_circuit(doc: CircuitDoc, directory: str | Path) -> Path:
    """Write ``directory/circuit.json`` atomically; returns its path."""
    path = Path(directory) / CIRCUIT_FILE
    atomic_write_json(path, circuit_dict(doc))
    return path


def load_circuit(path: str | Path, *, model: GPT | None = None) -> CircuitDoc:
    """Read and validate a circuit file (or a directory holding ``circuit.json``).

    With ``model``, refuse (CheckpointError) unless its weights hash matches the file's.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CIRCUIT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such circuit file") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON circuit file ({err})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise CheckpointError(f'{path}: not a circuit file (expected "schema": "{SCHEMA}")')
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: circuit schema version {data.get('version')!r}; this sparsecircuits "
            f"reads version {VERSION}"
        )
    data = {"schema_": data.pop("schema"), **data}
    try:
        doc = CircuitDoc.model_validate(data)
    except ValidationError as err:
        raise CheckpointError(format_validation_error(err, source=str(path))) from None
    if model is not None:
        check_model(doc, model, source=str(path))
    return doc


def check_model(doc: CircuitDoc, model: GPT, *, source: str = "circuit") -> None:
    """Raise CheckpointError unless ``model`` has the weights the circuit was found in."""
    from sparsecircuits.model.io import weights_hash

    have = weights_hash(model)
    if have != doc.model.weights_hash:
        raise CheckpointError(
            f"{source}: found in model {doc.model.id} (weights sha256 "
            f"{doc.model.weights_hash[:12]}...), but the given model's weights hash to "
            f"{have[:12]}...; load the model the circuit was pruned from"
        )
