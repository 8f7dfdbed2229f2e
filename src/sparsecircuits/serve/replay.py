"""``audit replay``: re-run a recorded request and compare scores and decision bit for bit.

The request's ``start`` record gives the prompt (stored with ``--store-inputs``) and the
sampling options with the seed actually used; the ``open`` record before it gives the server's
model, catalogue, policy and baseline; the ``complete`` record gives what to reproduce and the
conditions exactness needs (torch version, thread count, kernel backend and build, no
batching). Replay runs on the CPU with the recorded thread count and lists every difference:
in the conditions, in the files' hashes, and in the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsecircuits.audit import layout
from sparsecircuits.audit.proofs import find_records
from sparsecircuits.audit.records import canonical, parse_line
from sparsecircuits.errors import InputError

COMPARED = ("finish_reason", "prompt_tokens", "completion_tokens", "output_sha256",
            "decision", "scores", "mitigation")  # fmt: skip


@dataclass(frozen=True)
class Difference:
    field: str
    recorded: Any
    replayed: Any

    def __str__(self) -> str:
        return f"{self.field}: recorded {self.recorded!r}, replayed {self.replayed!r}"


def _open_record(log_dir: Path, before: int) -> dict[str, Any]:
    """The last ``open`` record of the log before seq ``before``."""
    found = None
    for _, seg in layout.segments(log_dir):
        for line in seg.read_bytes().split(b"\n"):
            if b'"kind":"open"' in line:
                doc = parse_line(line)
                if doc is not None and doc["seq"] < before:
                    found = doc
    if found is None:
        raise InputError(f"log {log_dir.name}: no server 'open' record before record {before}")
    return found


_MISSING = object()  # a field one side has and the other lacks (not the same as null)


def _differences(path: str, a: Any, b: Any) -> list[Difference]:
    """Every place where two JSON values differ (``path``: where they sit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [
            d
            for k in keys
            for d in _differences(f"{path}.{k}", a.get(k, _MISSING), b.get(k, _MISSING))
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _differences(f"{path}[{i}]", x, y)]  # fmt: skip
    if a is _MISSING or b is _MISSING:
        show = {id(_MISSING): "(missing)"}
        return [Difference(path, show.get(id(a), a), show.get(id(b), b))]
    return [] if canonical(a) == canonical(b) else [Difference(path, a, b)]


def replay(
    trail: Path,
    request_id: str,
    *,
    model: str | None = None,
    catalog: str | None = None,
    policy: str | None = None,
    baseline: str | None = None,
) -> list[Difference]:
    """Re-run ``request_id`` and return the differences (empty: reproduced exactly). The
    model and monitor files default to the ones the server's ``open`` record names."""
    from sparsecircuits.data import Tokenizer
    from sparsecircuits.model.io import load_model, weights_hash
    from sparsecircuits.serve.auditing import replay_conditions, sha256_text
    from sparsecircuits.serve.engine import SamplingOptions, generate
    from sparsecircuits.serve.launch import monitor_factory

    records = find_records(trail, request_id)
    start = next((d for _, d, _ in records if d.get("kind") == "start"), None)
    done = next((d for _, d, _ in records if d.get("kind") == "complete"), None)
    if start is None or done is None:
        raise InputError(f"{trail}: request {request_id!r} lacks a start or completion record")
    if "input" not in start:
        raise InputError(f"request {request_id!r} was recorded without its input "
                         "(the server ran without --store-inputs)")  # fmt: skip
    if done.get("outcome") != "completed":
        raise InputError(f"request {request_id!r} did not complete ({done.get('outcome')})")
    log_dir = next(p for p, d, _ in records if d is done)
    cfg = _open_record(log_dir, done["seq"])["server"]["config"]
    diffs: list[Difference] = []
    want = done["replay"]
    torch.set_num_threads(int(want["threads"]))
    have = replay_conditions("cpu")
    for k in ("device", "torch", "threads", "kernel_backend", "kernel_build", "batching"):
        if have.get(k) != want.get(k):
            diffs.append(Difference(f"conditions.{k}", want.get(k), have.get(k)))
    mdir = Path(model or cfg["model_dir"])
    m = load_model(mdir, device="cpu").eval()
    info: dict[str, Any] = {"weights_hash": weights_hash(m)}
    factory = None
    cat, pol = catalog or cfg.get("catalog"), policy or cfg.get("policy")
    if cat is not None and pol is not None:
        base = baseline or cfg.get("baseline")
        # a server that monitored through bridges is replayed through the same bridges
        bridge, comp = cfg.get("bridge"), cfg.get("companion_dir")
        bridge = None if bridge is None else Path(bridge)
        factory = monitor_factory(m, catalog=Path(cat), policy=Path(pol),
                                  baseline=None if base is None else Path(base), bridge=bridge,
                                  dense_dir=mdir,
                                  companion_dir=None if comp is None else Path(comp))  # fmt: skip
        from sparsecircuits.interop.download import file_sha256
        from sparsecircuits.serve.launch import baseline_file

        bfile = baseline_file(Path(cat), None if base is None else Path(base), bridge)
        info.update(catalog_sha256=file_sha256(factory.catalog_path),
                    policy_sha256=factory.policy.sha256,
                    baseline_sha256=file_sha256(bfile))  # fmt: skip
    for k, v in info.items():
        if k in done and done[k] != v:  # a hash the record has (older records lack some)
            diffs.append(Difference(k, done[k], v))
    tok = Tokenizer.load(mdir)
    p = start["params"]
    options = SamplingOptions(max_tokens=p["max_tokens"], temperature=p["temperature"],
                              top_p=p["top_p"], seed=p["seed"])  # fmt: skip
    if factory is None:
        from sparsecircuits.monitor.runtime import NullMonitorFactory

        factory = NullMonitorFactory()
    monitor = factory.start(request_id)
    ids = tok.encode(start["input"])
    text, last = [], None
    for chunk in generate(m, tok, ids, monitor, options=options):
        text.append(chunk.text)
        last = chunk
    tel = monitor.telemetry()
    out = "".join(text)
    got = {
        "finish_reason": last.finish_reason,
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "output_sha256": sha256_text(out),
        "decision": last.decision.to_json(),
        "scores": {"families": tel.get("families") or {}, "causal_share": tel.get("causal_share")},
        "mitigation": {
            "dampened_families": sorted(
                n for n, f in (tel.get("families") or {}).items() if f.get("dampened")
            ),
            "stopped": last.finish_reason == "content_filter",
        },
    }
    got = json.loads(canonical(got))  # the same JSON round trip the record went through
    for k in COMPARED:
        diffs.extend(_differences(k, done.get(k, _MISSING), got[k]))
    return diffs
