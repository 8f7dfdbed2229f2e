"""Where an audit trail's files live (one place for every file name).

TRAIL/                      the --audit-dir: one subdirectory per writing process
  w0/                       a log (its id is the directory's name)
    LOCK                    held (flock) by the process writing this log
    seg-000000000000.jsonl  records from seq 0, one canonical JSON line each
    seg-000000100000.jsonl  the next segment, from seq 100000
    checkpoints/cp-000000001000.json   signed tree head over the first 1000 records
    retention.json          signed: records below N were deleted by the retention setting
    quarantine/             torn tails moved aside on start, never deleted
"""

from __future__ import annotations

import re
from pathlib import Path

SEGMENT_RE = re.compile(r"^seg-(\d{12})\.jsonl$")
CHECKPOINT_RE = re.compile(r"^cp-(\d{12})\.json$")
LOG_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "quarantine"
RETENTION_FILE = "retention.json"
LOCK_FILE = "LOCK"


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:012d}.jsonl"


def checkpoint_name(size: int) -> str:
    return f"cp-{size:012d}.json"


def segments(log_dir: Path) -> list[tuple[int, Path]]:
    """The log's segment files by first seq."""
    found = []
    for p in log_dir.iterdir() if log_dir.is_dir() else []:
        m = SEGMENT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoints(log_dir: Path) -> list[tuple[int, Path]]:
    """The log's checkpoint files by tree size."""
    cdir = log_dir / CHECKPOINT_DIR
    found = []
    for p in cdir.iterdir() if cdir.is_dir() else []:
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def logs(trail: Path) -> list[Path]:
    """The log directories of a trail: ``trail`` itself if it holds segments or checkpoints,
    and each subdirectory that does (both: a stray file at the top must not hide the logs
    below it)."""
    if not trail.is_dir():
        return []
    top = [trail] if segments(trail) or checkpoints(trail) else []
    return top + sorted(
        p for p in trail.iterdir() if p.is_dir() and (segments(p) or checkpoints(p))
    )


def read_records(trail: Path) -> dict[str, list[dict]]:
    """Every record of every log of ``trail`` that parses, by log name, in file order (for
    counting and reports: this checks nothing; ``audit verify`` does)."""
    from sparsecircuits.audit.records import parse_line

    out: dict[str, list[dict]] = {}
    for log_dir in logs(trail):
        docs = []
        for _, seg in segments(log_dir):
            for line in seg.read_bytes().split(b"\n"):
                doc = parse_line(line) if line else None
                if doc is not None:
                    docs.append(doc)
        out[log_dir.name] = docs
    return out
