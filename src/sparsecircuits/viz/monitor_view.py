"""The Monitor page's pure parts (no Streamlit, no torch): read one request's telemetry (the
server's ``GET /v1/telemetry/{id}`` record or a bare ``RequestMonitor.telemetry()``), check it
with one-line errors naming the field, label its tokens, list its flags, find each family's
circuits in the catalogue, and draw the family-by-token engagement heatmap.

Telemetry carries no text (the server never stores the prompt or completion), so token labels
come from text the operator supplies, tokenized by the dashboard; without it, or when the
count does not match the telemetry, tokens are labelled by index (``p3``: prompt token 3,
``g0``: generated token 0).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from sparsecircuits.errors import InputError

ACTIONS = ("allow", "log", "review", "dampen", "block")
PROMPT = -1  # at_token of anything fired during the prompt's pass
ENGAGEMENT_SCALE = "YlOrRd"  # 0 (pale) .. high (dark red): sequential, engagement is >= 0
Z_SCALE = "RdBu_r"  # robust z: red above the benign median, blue below
FLAG_COLOUR = "#000000"


@dataclass(frozen=True)
class FamilyTrace:
    """One family's per-token scores in a request (prompt tokens first)."""

    name: str
    engagement: list[float]
    z: list[float]
    max_z: float | None
    flags: dict[str, list[int]]  # rule -> at_token values (-1: the prompt's pass)
    dampened: bool


@dataclass(frozen=True)
class TelemetryView:
    """What the Monitor page shows of one request."""

    request_id: str
    decision: dict[str, Any]
    families: list[FamilyTrace]
    n_prompt: int
    n_generated: int  # generated tokens the monitor observed (a blocked one included)
    model: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None  # tokens sent to the client

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_generated


def _fail(field: str, what: str) -> InputError:
    return InputError(f"telemetry field {field!r}: {what}")


def _get(obj: Mapping[str, Any], key: str, field: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise _fail(field, "missing")
    value = obj[key]
    # bool is an int in Python; a count or a score given as true/false is still wrong
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise _fail(field, f"expected {_name(kind)}, got {type(value).__name__}")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer",
             float: "a number", bool: "true or false", type(None): "null"}  # fmt: skip
    return " or ".join(names.get(k, k.__name__) for k in _kinds(kind))


def _numbers(value: Any, field: str, n: int) -> list[float]:
    if not isinstance(value, list):
        raise _fail(field, f"expected a list of {n} numbers, got {type(value).__name__}")
    if len(value) != n:
        raise _fail(field, f"expected {n} values (one per token), got {len(value)}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise _fail(f"{field}[{i}]", f"expected a finite number, got {v!r}")
    return [float(v) for v in value]


def _decision(d: Any, field: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _fail(field, f"expected an object, got {type(d).__name__}")
    action = _get(d, "action", f"{field}.action", str)
    if action not in ACTIONS:
        raise _fail(f"{field}.action", f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    _get(d, "policy_sha256", f"{field}.policy_sha256", str)
    for key in ("family", "rule", "reason"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise _fail(f"{field}.{key}", f"expected a string or null, got {d[key]!r}")
    at = d.get("at_token")
    if at is not None and (isinstance(at, bool) or not isinstance(at, int) or at < PROMPT):
        raise _fail(f"{field}.at_token", f"expected an integer >= -1 or null, got {at!r}")
    return dict(d)


def parse_telemetry(obj: Any) -> TelemetryView:
    """Check a telemetry record (the server's, with ``telemetry`` inside, or the monitor's
    own) and return its view; :class:`InputError` names the first bad field."""
    if not isinstance(obj, dict):
        raise InputError(f"telemetry: expected a JSON object, got {type(obj).__name__}")
    outer: dict[str, Any] = {}
    if "telemetry" in obj:  # the server's record wraps the monitor's
        outer, obj = obj, _get(obj, "telemetry", "telemetry", dict)
    rid = _get(obj, "request_id", "request_id", str)
    fams = _get(obj, "families", "families", dict)
    if not fams:  # the no-catalogue monitor: nothing watched, no token counts
        n_prompt = int(outer.get("prompt_tokens") or 0)
        n_gen = int(outer.get("completion_tokens") or 0)
    else:
        n_prompt = _get(obj, "n_prompt_tokens", "n_prompt_tokens", int)
        n_gen = _get(obj, "n_generated_tokens", "n_generated_tokens", int)
        for key, count in (("n_prompt_tokens", n_prompt), ("n_generated_tokens", n_gen)):
            if count < 0:
                raise _fail(key, f"expected a count >= 0, got {count}")
    n = n_prompt + n_gen
    families = []
    for name, f in fams.items():
        field = f"families.{name}"
        if not isinstance(f, dict):
            raise _fail(field, f"expected an object, got {type(f).__name__}")
        flags = _get(f, "flags", f"{field}.flags", dict)
        for rule, ats in flags.items():
            ok = isinstance(ats, list) and all(
                isinstance(a, int) and not isinstance(a, bool) and PROMPT <= a < n_gen for a in ats
            )
            if not ok:
                want = f"expected token indices in -1 .. {n_gen - 1}, got {ats!r}"
                raise _fail(f"{field}.flags.{rule}", want)
        max_z = f.get("max_z")
        if max_z is not None and (isinstance(max_z, bool) or not isinstance(max_z, int | float)):
            raise _fail(f"{field}.max_z", f"expected a number or null, got {max_z!r}")
        families.append(
            FamilyTrace(
                name=name,
                engagement=_numbers(f.get("engagement"), f"{field}.engagement", n),
                z=_numbers(f.get("z"), f"{field}.z", n),
                max_z=None if max_z is None else float(max_z),
                flags={r: list(a) for r, a in flags.items()},
                dampened=bool(_get(f, "dampened", f"{field}.dampened", bool)),
            )
        )
    decision = _decision(outer.get("decision", obj.get("decision")), "decision")
    return TelemetryView(
        request_id=rid, decision=decision, families=families, n_prompt=n_prompt,
        n_generated=n_gen, model=outer.get("model"), finish_reason=outer.get("finish_reason"),
        completion_tokens=outer.get("completion_tokens"),
    )  # fmt: skip


def parse_telemetry_text(text: str | bytes) -> TelemetryView:
    """:func:`parse_telemetry` of a JSON document (a file's or a pasted one)."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"telemetry: not JSON ({err})") from None
    return parse_telemetry(obj)


def _get_json(url: str, *, timeout: float) -> Any:
    """GET ``url`` (the operator's own server) as JSON; one-line errors."""
    try:  # our own server, given by --server (127.0.0.1 unless the operator chose otherwise)
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:  # the server's errors are OpenAI-shaped JSON with a one-line message
            message = json.loads(err.read())["error"]["message"]
        except Exception:
            message = err.reason
        raise InputError(f"{url}: HTTP {err.code}: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise InputError(f"{url}: no answer ({reason})") from None


def server_base(url: str) -> str:
    """The server's base URL, checked: http(s) only (no file:, no ftp:)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"--server {url!r}: expected http://HOST:PORT")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def fetch_telemetry(server: str, request_id: str, *, timeout: float = 5.0) -> TelemetryView:
    """One request's record from ``GET {server}/v1/telemetry/{id}``."""
    rid = request_id.strip()
    if not rid:
        raise InputError("request id: empty (the completion response's `id`, cmpl-...)")
    quoted = urllib.parse.quote(rid, safe="")  # an id is one path segment, never a path
    return parse_telemetry(_get_json(f"{server_base(server)}/v1/telemetry/{quoted}",
                                     timeout=timeout))  # fmt: skip


def fetch_catalog_dir(server: str, *, timeout: float = 5.0) -> str | None:
    """The catalogue the server loaded (``/healthz``'s monitor names its file), or None."""
    health = _get_json(f"{server_base(server)}/healthz", timeout=timeout)
    monitor = health.get("monitor") if isinstance(health, dict) else None
    path = monitor.get("catalog") if isinstance(monitor, dict) else None
    return path if isinstance(path, str) else None


@dataclass(frozen=True)
class CircuitLink:
    """One circuit of a family in the catalogue."""

    task: str
    path: str
    admitted: bool


def family_circuits(catalog: str | Path) -> dict[str, list[CircuitLink]]:
    """Per family its circuits (admitted first), read from ``catalog.json`` (the file or its
    directory: ``/healthz`` names the file) as plain JSON (the catalogue's loader needs torch;
    the page only needs names and paths)."""
    path = Path(catalog)
    path = path if path.suffix == ".json" else path / "catalog.json"
    try:
        doc = json.loads(path.read_text())
        circuits, families = doc["circuits"], doc["families"]
        out = {}
        for name, fam in families.items():
            admitted = list(fam["admitted"])
            tasks = admitted + [t for t in fam["tasks"] if t not in admitted]
            out[name] = [
                # relative paths are the catalogue directory's (a shipped catalogue moves)
                CircuitLink(t, str(path.parent / circuits[t]["path"]), t in admitted)
                for t in tasks
                if t in circuits
            ]
        return out
    except OSError as err:
        raise InputError(f"{path}: cannot read ({err.strerror})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a monitor catalogue ({type(err).__name__}: {err})") from None


def token_labels(
    view: TelemetryView,
    prompt_pieces: Sequence[str] | None = None,
    completion_pieces: Sequence[str] | None = None,
) -> tuple[list[str], str | None]:
    """One label per telemetry token, and a note when supplied text could not be used.

    Pieces label a part (prompt, generated) only when their count is that part's token count;
    a blocked request's generated part has one more token than was sent (the one that tripped
    the policy, never shown to the client), labelled ``[blocked]``."""
    notes = []
    labels = [f"p{i}" for i in range(view.n_prompt)]
    if prompt_pieces is not None:
        if len(prompt_pieces) == view.n_prompt:
            labels = list(prompt_pieces)
        else:
            notes.append(f"the prompt is {len(prompt_pieces)} tokens here, {view.n_prompt} "
                         "in the telemetry")  # fmt: skip
    gen = [f"g{i}" for i in range(view.n_generated)]
    if completion_pieces is not None:
        pieces = list(completion_pieces)
        blocked = view.decision.get("action") == "block" and view.n_generated > 0
        if blocked and len(pieces) == view.n_generated - 1:
            pieces.append("[blocked]")
        if len(pieces) == view.n_generated:
            gen = pieces
        else:
            notes.append(f"the completion is {len(completion_pieces)} tokens here, "
                         f"{view.n_generated} in the telemetry")  # fmt: skip
    note = "; ".join(notes) + " (labelled by index instead)" if notes else None
    return labels + gen, note


def position(view: TelemetryView, at_token: int) -> int:
    """The column of ``at_token``: a generated token's own, the prompt's last for -1 (the
    prompt's pass ends there)."""
    return view.n_prompt - 1 if at_token == PROMPT else view.n_prompt + at_token


def _where(view: TelemetryView, at: int, labels: Sequence[str]) -> str:
    if at == PROMPT:
        return "prompt"
    label = labels[position(view, at)]
    return f"g{at}" if label == f"g{at}" else f"g{at} {label!r}"


def flag_rows(view: TelemetryView, labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (family, rule) that fired: where, by token label."""
    rows = []
    for fam in view.families:
        for rule, ats in fam.flags.items():
            if not ats:
                continue
            where = [_where(view, a, labels) for a in ats]
            rows.append({"family": fam.name, "rule": rule, "fired at": ", ".join(where),
                         "times": len(ats)})  # fmt: skip
    return rows


def _ticks(labels: Sequence[str]) -> list[str]:
    return [f"{t!r}"[1:-1] or "·" for t in labels]


def engagement_figure(
    view: TelemetryView, labels: Sequence[str], *, colour: str = "engagement"
) -> go.Figure:
    """Families (rows) by tokens (columns), coloured by engagement or robust z; a cross marks
    each token where a rule fired, a dashed line ends the prompt."""
    use_z = colour == "z"
    rows = [f.z if use_z else f.engagement for f in view.families]
    names = [f.name + (" (dampened)" if f.dampened else "") for f in view.families]
    ticks = _ticks(labels)
    top = max([abs(v) for r in rows for v in r] + [1e-9])
    heat = go.Heatmap(
        z=rows, x=list(range(len(ticks))), y=list(range(len(names))),
        colorscale=Z_SCALE if use_z else ENGAGEMENT_SCALE,
        zmin=-top if use_z else 0.0, zmax=top, zmid=0 if use_z else None,
        colorbar=dict(title=dict(text="robust z" if use_z else "engagement<br>(1 = benign)"),
                      thickness=12),
        customdata=[[[n, t, f"{e:.3g}", f"{z:.3g}"] for t, e, z in
                     zip(ticks, f.engagement, f.z, strict=True)]
                    for n, f in zip(names, view.families, strict=True)],
        hovertemplate="%{customdata[0]} at %{customdata[1]}: engagement %{customdata[2]}, "
        "z %{customdata[3]}<extra></extra>",
    )  # fmt: skip
    fig = go.Figure(heat)
    xs, ys, text = [], [], []
    for row, fam in enumerate(view.families):
        for rule, ats in fam.flags.items():
            for a in ats:
                xs.append(position(view, a))
                ys.append(row)
                text.append(f"{rule} fired" + (" (prompt's pass)" if a == PROMPT else ""))
    if xs:
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", name="rule fired", text=text,
            marker=dict(symbol="x", size=12, color=FLAG_COLOUR, line=dict(width=1)),
            hovertemplate="%{text}<extra></extra>",
        ))  # fmt: skip
    if 0 < view.n_prompt < view.n_tokens:
        fig.add_vline(x=view.n_prompt - 0.5, line=dict(dash="dash", color="#555555"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(ticks))), ticktext=ticks,
                     tickangle=-60, tickfont=dict(size=10), automargin=True,
                     title="token (prompt | generated)")  # fmt: skip
    # automargin: long family names and token labels widen the margins instead of clipping
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(names))), ticktext=names,
                     autorange="reversed", automargin=True)  # fmt: skip
    fig.update_layout(
        height=max(260, 40 * len(names) + 180), margin=dict(l=20, r=20, t=60, b=20),
        title=dict(text=f"family {'robust z' if use_z else 'engagement'} per token",
                   x=0.01, xanchor="left"),
        legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"),
        plot_bgcolor="white",
    )  # fmt: skip
    return fig
