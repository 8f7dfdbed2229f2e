"""The Bridges page's pure parts (no Streamlit): read a bridges directory (``bridges.json``,
``fidelity.json``, ``steering/*.json``) with one-line errors, turn them into table rows, and
draw the two figures (KL per site; flip share per scale).

Torch-free at import: ``bridges.json`` is validated by :func:`sparsecircuits.bridges.fit.
load_meta`, whose module imports torch, so it is imported only when a directory is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import plotly.graph_objects as go
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import sparsecircuits
from sparsecircuits.errors import ConfigError, InputError, SparseCircuitsError

if TYPE_CHECKING:
    from sparsecircuits.bridges.fit import BridgeMeta

# Where the shipped bridges live (beside the shipped models); the page's default directory.
PRETRAINED = Path(sparsecircuits.__file__).resolve().parent / "pretrained"
DEFAULT_BRIDGES_DIR = PRETRAINED / "stdlib-bridges"
FIDELITY_FILE = "fidelity.json"  # = bridges.evaluate.FIDELITY_FILE (that module imports torch)
WEIGHTS_FILE = "bridges.safetensors"
STEERING_DIR = "steering"
SHORT = 8  # hex digits of a hash shown (as the Monitor page shows the policy hash)
ARMS = {  # steering arm -> (legend name, colour)
    "bridged": ("bridged (sparse node → dense)", "#d62728"),
    "random": ("random direction, mean over seeds", "#7f7f7f"),
    "dense_class_mean": ("dense class-mean difference", "#1f77b4"),
    "sparse": ("sparse model steered itself", "#2ca02c"),
}


class _Doc(BaseModel):
    # Extra fields are ignored: the writers may add fields and older pages should still read.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class SiteRow(_Doc):
    """One site of ``fidelity.json`` (``bridges.evaluate.fidelity``)."""

    site: str
    enc_nmse: float
    dec_nmse: float
    kl_d2s: float
    kl_s2d: float
    agree_d2s: float
    agree_s2d: float


class SparseAlone(_Doc):
    kl: float
    agree: float


class FidelityDoc(_Doc):
    windows: int
    seq_len: int
    sites: list[SiteRow] = Field(min_length=1)
    sparse_alone: SparseAlone
    weights_sha256: str  # which bridges were measured (``bridge eval`` adds it)


class Flip(_Doc):
    """``bridges.steer.flips``: n prompts chose the from-answer before; flip is NaN if none."""

    n: int
    flip: float
    dlogit: float


class RandomArm(_Doc):
    per_seed: list[Flip]
    flip_mean: float
    flip_max: float


class BeforeAfter(_Doc):
    before: float
    after: float


class SideEffects(_Doc):
    tasks: dict[str, BeforeAfter]
    heldout_loss: BeforeAfter | None = None

    @property
    def mean_acc_change(self) -> float | None:
        if not self.tasks:
            return None
        return sum(a.after - a.before for a in self.tasks.values()) / len(self.tasks)


class SteerRow(_Doc):
    scale: float
    node_move: float
    delta_norm: float
    bridged: Flip
    random: RandomArm
    dense_class_mean: Flip
    dense_class_mean_norm: float
    sparse: Flip
    side_effects: SideEffects


class SteeringDoc(_Doc):
    """``bridge steer --json`` (``bridges.steer_run.run_steering`` + what the command adds)."""

    task: str
    node: str
    src: str = Field(alias="from")
    dst: str = Field(alias="to")
    site: str
    positions: str
    n_pairs: int
    side_pairs: int | None = None  # test pairs per other task (newer results record it)
    heldout_windows: int | None = None
    seeds: list[int]
    value_from: float
    value_to: float
    n_test_prompts: int
    rows: list[SteerRow] = Field(min_length=1)
    bridges_sha256: str | None = None
    site_fidelity: SiteRow | None = None


_M = TypeVar("_M", bound=BaseModel)


def _read(path: Path, model: type[_M]) -> _M:
    """``path`` validated as ``model``; every failure is one line naming the file."""
    from sparsecircuits.fileio import read_json_object
    from sparsecircuits.model.config import format_validation_error

    try:
        data = read_json_object(path, missing=InputError)
    except OSError as err:  # a directory, no permission: read_json_object lets these through
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=str(path))) from None


@dataclass(frozen=True)
class BridgesDir:
    """A bridges directory as the page shows it. ``fidelity`` is None when it is missing,
    malformed (``fidelity_error``) or measured other bridges (``fidelity_other``)."""

    path: Path
    meta: BridgeMeta
    weights_bytes: int | None
    fidelity: FidelityDoc | None
    fidelity_error: str | None
    fidelity_other: str | None  # the weights sha256 fidelity.json measured, if not these

    @property
    def steps(self) -> int | None:
        extra = self.meta.model_extra or {}
        return extra.get("steps") if isinstance(extra.get("steps"), int) else None

    @property
    def n_params(self) -> int:
        """Encoder (d_dense -> d_sparse) and decoder (back), each with a bias, at every site."""
        m = self.meta
        return len(m.sites) * (2 * m.d_dense * m.d_sparse + m.d_dense + m.d_sparse)


def load_dir(directory: str | Path) -> BridgesDir:
    """The directory's metadata (InputError/ConfigError in one line if unusable) and its
    fidelity (never raises for fidelity: the page still shows the header without it)."""
    from sparsecircuits.bridges.fit import load_meta  # imports torch: only when a page reads

    path = Path(directory).expanduser()
    if not path.is_dir() and len(path.parts) == 1 and (PRETRAINED / path).is_dir():
        path = PRETRAINED / path  # a shipped name, as the bridge commands take it
    if not path.is_dir():
        raise InputError(f"{path}: no such directory (a directory written by `sparsecircuits "
                         "bridge fit` or `bridge train`)")  # fmt: skip
    meta = load_meta(path)
    try:
        size: int | None = (path / WEIGHTS_FILE).stat().st_size
    except OSError:
        size = None
    fid, err, other = None, None, None
    if (path / FIDELITY_FILE).exists():
        try:
            fid = _read(path / FIDELITY_FILE, FidelityDoc)
        except SparseCircuitsError as e:
            err = str(e)
        if fid is not None and fid.weights_sha256 != meta.weights_sha256:
            fid, other = None, fid.weights_sha256
    return BridgesDir(path, meta, size, fid, err, other)


@dataclass(frozen=True)
class SteeringFile:
    path: Path
    doc: SteeringDoc | None
    error: str | None  # one line, when doc is None


def load_steering(directory: str | Path) -> list[SteeringFile]:
    """Every ``steering/*.json`` by name, each read or with its one-line error."""
    out = []
    for p in sorted((Path(directory) / STEERING_DIR).glob("*.json")):
        try:
            out.append(SteeringFile(p, _read(p, SteeringDoc), None))
        except SparseCircuitsError as e:
            out.append(SteeringFile(p, None, str(e)))
    return out


def short(sha: str | None) -> str:
    return "—" if not sha else sha[:SHORT]


def _num(x: float) -> float | None:
    """NaN (a flip share over no prompts) shows as an empty cell, not as 'nan'."""
    return None if math.isnan(x) else x


def fidelity_rows(doc: FidelityDoc) -> list[dict[str, Any]]:
    """One row per site, then the sparse model alone: its KL and agreement to the dense model
    in both directions' columns (one number, the reference for either hybrid)."""
    rows: list[dict[str, Any]] = [
        {"site": r.site, "enc NMSE": r.enc_nmse, "dec NMSE": r.dec_nmse, "KL d→s": r.kl_d2s,
         "KL s→d": r.kl_s2d, "agree d→s": r.agree_d2s, "agree s→d": r.agree_s2d}
        for r in doc.sites
    ]  # fmt: skip
    a = doc.sparse_alone
    rows.append({"site": "sparse model alone", "enc NMSE": None, "dec NMSE": None,
                 "KL d→s": a.kl, "KL s→d": a.kl, "agree d→s": a.agree,
                 "agree s→d": a.agree})  # fmt: skip
    return rows


def steering_rows(doc: SteeringDoc) -> list[dict[str, Any]]:
    """One row per scale: the four arms' flip shares, the bridged logit change and |Δh|, the
    side effects."""
    rows = []
    for r in doc.rows:
        se, ho = r.side_effects, r.side_effects.heldout_loss
        rows.append({
            "scale": r.scale,
            "bridged flip": _num(r.bridged.flip),
            "random flip (mean)": _num(r.random.flip_mean),
            "random flip (max)": _num(r.random.flip_max),
            "dense class-mean flip": _num(r.dense_class_mean.flip),
            "sparse steered flip": _num(r.sparse.flip),
            "Δ logit (bridged)": r.bridged.dlogit,
            "|Δh| bridged": r.delta_norm,
            "Δ accuracy, other tasks": se.mean_acc_change,
            "held-out loss": "—" if ho is None else f"{ho.before:.3f} → {ho.after:.3f}",
            "|Δh| class mean": r.dense_class_mean_norm,
            "node move": r.node_move,
        })  # fmt: skip
    return rows


def side_task_rows(doc: SteeringDoc) -> list[dict[str, Any]]:
    """Per scale and other task: the dense model's accuracy before and after the steering."""
    return [{"scale": r.scale, "task": t, "before": a.before, "after": a.after,
             "change": a.after - a.before}
            for r in doc.rows for t, a in r.side_effects.tasks.items()]  # fmt: skip


def kl_figure(doc: FidelityDoc) -> go.Figure:
    """KL to the dense model per site (in forward order), both directions, with the sparse
    model alone as a dashed line."""
    sites = [r.site for r in doc.sites]
    fig = go.Figure()
    for key, name, colour in (("kl_d2s", "KL d→s hybrid", "#1f77b4"),
                              ("kl_s2d", "KL s→d hybrid", "#d62728")):  # fmt: skip
        ys = [getattr(r, key) for r in doc.sites]
        fig.add_scatter(x=sites, y=ys, mode="lines+markers", name=name, line={"color": colour})
    alone = doc.sparse_alone.kl
    fig.add_scatter(x=sites, y=[alone] * len(sites), mode="lines", name="sparse model alone",
                    line={"color": "#555555", "dash": "dash"})  # fmt: skip
    fig.update_layout(height=320, margin={"l": 50, "r": 10, "t": 30, "b": 40},
                      xaxis_title="site (forward order)", yaxis_title="KL (nats/token)",
                      legend={"orientation": "h", "y": 1.12}, template="plotly_white")  # fmt: skip
    return fig


def flip_figure(doc: SteeringDoc) -> go.Figure:
    """Flip share against scale for the four arms (random: mean, and max over seeds dotted)."""
    xs = [r.scale for r in doc.rows]
    fig = go.Figure()
    for arm, (name, colour) in ARMS.items():
        if arm == "random":
            ys = [_num(r.random.flip_mean) for r in doc.rows]
        else:
            ys = [_num(getattr(r, arm).flip) for r in doc.rows]
        fig.add_scatter(x=xs, y=ys, mode="lines+markers", name=name, line={"color": colour})
    fig.add_scatter(x=xs, y=[_num(r.random.flip_max) for r in doc.rows], mode="lines+markers",
                    name="random direction, max over seeds",
                    line={"color": ARMS["random"][1], "dash": "dot"})  # fmt: skip
    positive = all(x > 0 for x in xs)
    log = positive and max(xs) / min(xs) >= 20  # scales often span 1 .. 100s
    fig.update_layout(height=340, margin={"l": 50, "r": 10, "t": 30, "b": 40},
                      xaxis={"title": "scale", "type": "log" if log else "linear",
                             "tickvals": xs, "ticktext": [f"{x:g}" for x in xs]},
                      yaxis={"title": "flip share", "range": [-0.03, 1.03], "tickformat": ".0%"},
                      legend={"orientation": "h", "y": 1.15}, template="plotly_white")  # fmt: skip
    return fig


def steer_command(directory: Path) -> str:
    """The command that writes a steering result where the page looks for it."""
    return (f"sparsecircuits bridge nodes --prompts TASK   # candidate nodes\n"
            f"sparsecircuits bridge steer {directory} --node LAYER.LOCATION.INDEX "
            f"--prompts TASK --scale 1 --scale 4 --scale 16 \\\n"
            f"    --json {directory / STEERING_DIR}/TASK.json")  # fmt: skip
