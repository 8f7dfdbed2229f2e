"""Resumable, checked HTTP downloads (``pull``'s transport).

A file streams into ``<file>.part`` and is renamed onto ``<file>`` (one ``os.replace``) only
once it is complete and its size and SHA-256 check out, so the final path never holds a partial
download. An interrupted transfer resumes with ``Range: bytes=N-``; the server's ETag (or
Last-Modified) of the first response is kept beside the ``.part`` and sent as ``If-Range``, so a
file replaced on the server in between is fetched whole instead of spliced.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsecircuits.errors import DownloadError
from sparsecircuits.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0  # seconds to connect, and between two reads of one response
RETRIES = 3  # resumed attempts after an interrupted transfer, per file
CHUNK = 1 << 20  # bytes per read

# (file label, bytes so far, total bytes or None when the server does not say)
Progress = Callable[[str, int, int | None], None]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class _Interrupted(Exception):
    """The transfer stopped early; the ``.part`` file holds what arrived."""


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    size: int | None = None,
    sha256: str | None = None,
    timeout: float = TIMEOUT_S,
    retries: int = RETRIES,
    progress: Progress | None = None,
) -> tuple[int, str]:
    """Fetch ``url`` into ``dest`` through ``dest.part`` (resumed when present); returns (size
    in bytes, SHA-256). A size or hash other than the expected one removes the ``.part`` and
    raises :class:`DownloadError`; ``dest`` only ever appears complete and checked."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    session = _requests().Session()
    total = None
    try:
        for attempt in range(retries + 1):
            try:
                total = _fetch(session, url, part, timeout=timeout, progress=progress)
                break
            except _Interrupted:
                have = part.stat().st_size if part.exists() else 0
                if attempt == retries:
                    raise DownloadError(
                        f"{url}: transfer interrupted ({retries + 1} attempt(s); {have} bytes "
                        f"kept in {part}: run pull again to resume)"
                    ) from None
                log.warning("%s: interrupted at %d bytes; resuming", url, have)
    except DownloadError:
        if not part.exists():
            _discard(part)  # leave no empty folder behind a failed first attempt
        raise
    finally:
        session.close()
    got = part.stat().st_size
    for want, what in ((size, "pinned size"), (total, "size the server announced")):
        if want is not None and got != want:
            _discard(part)
            raise DownloadError(
                f"{dest.name}: expected {want} bytes ({what}), got {got} from {url}; removed"
            )
    digest = file_sha256(part)
    if sha256 is not None and digest != sha256.lower():
        _discard(part)
        raise DownloadError(
            f"{dest.name}: expected sha256 {sha256.lower()}, got {digest} from {url}; removed"
        )
    os.replace(part, dest)
    _validator_file(part).unlink(missing_ok=True)
    return got, digest


def _validator_file(part: Path) -> Path:
    """Where the server's ETag / Last-Modified of a ``.part``'s first response is kept."""
    return part.with_name(part.name + ".etag")


def _discard(part: Path) -> None:
    """Remove a rejected download, and its folder if that leaves it empty."""
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: other files of the artefact are there
        part.parent.rmdir()


def _fetch(session: Any, url: str, part: Path, *, timeout: float, progress: Progress | None):
    """One request: append to ``part`` on 206, rewrite it on 200. Returns the file's total size
    (None if unknown); raises _Interrupted when the body stops short."""
    requests = _requests()
    have = part.stat().st_size if part.exists() else 0
    # identity: a compressed body would make Content-Length and Range count other bytes
    headers = {"Accept-Encoding": "identity"}
    validator = _validator_file(part)
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator.exists():  # the file changed since the .part began: the whole new one
            headers["If-Range"] = validator.read_text(encoding="utf-8")
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.Timeout:
        raise DownloadError(f"{url}: no answer within {timeout:g} s") from None
    except requests.RequestException as err:
        raise DownloadError(f"cannot reach {url}: {reason(err)}") from None
    with resp:
        status = resp.status_code
        if status == 416 and have:  # .part is as long as the file or longer: start afresh
            part.unlink()
            raise _Interrupted
        if status == 404:
            raise DownloadError(f"no such artefact at {url} (HTTP 404)")
        if status >= 400:
            raise DownloadError(f"{url}: HTTP {status} {resp.reason}")
        total = None
        if status == 206 and have:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != have:  # cannot append to what we have
                part.unlink()
                raise _Interrupted
            mode = "ab"
        else:  # 200: the whole file (no Range support, or If-Range: it changed)
            have, mode = 0, "wb"
            tag = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            if tag:
                atomic_write_bytes(validator, tag.encode())
            else:
                validator.unlink(missing_ok=True)
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as f:
            while chunk := _read(resp.raw):
                f.write(chunk)
                have += len(chunk)
                if progress is not None:
                    progress(part.name.removesuffix(".part"), have, total)
    if total is not None and have < total:
        raise _Interrupted
    return total


def _read(raw: Any) -> bytes:
    """The next bytes of a body as they arrive (``read1``: what a dropped connection had already
    delivered reaches the ``.part`` file instead of dying in a read buffer)."""
    import urllib3

    try:
        return raw.read1(CHUNK)
    except (urllib3.exceptions.HTTPError, _requests().RequestException):  # dropped, timed out
        raise _Interrupted from None


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range: bytes A-B/TOTAL`` header."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value)
    if not m:
        return None, None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def reason(err: Exception) -> str:
    """The innermost useful words of a requests/urllib3 error, on one line."""
    text = str(err)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _requests() -> Any:
    try:
        import requests
    except ImportError:
        raise DownloadError("pull needs the 'requests' package: pip install requests") from None
    return requests
