"""``sparsecircuits pull``: fetch OpenAI's published circuit-sparsity artefacts into the cache.

Nothing else in the package needs the network; this module is only for users who want the
released models and circuits. Files go to ``<cache>/pull/`` (``fileio.cache_root()``, or a
directory given by the caller):

- a registry name (``csp_yolo1``): ``<cache>/pull/csp_yolo1/`` holding ``beeg_config.json``,
  ``final_model.pt`` and the tinypython_2k tokenizer (``encoder.json``, ``vocab.bpe``), i.e. a
  directory that ``load_model`` and our task commands open;
- ``blob:models/NAME``: the same files for any released model, in ``blob/models/NAME/``;
- ``blob:PATH/TO/FILE`` (e.g. ``blob:viz/csp_yolo1/.../viz_data.pt``): that one file, in
  ``blob/PATH/TO/FILE``;
- ``hub:openai/circuit-sparsity``: a Hugging Face Hub snapshot, in ``hub/<owner>--<name>/``.

Downloads stream into ``<file>.part``, resume from it with an HTTP ``Range`` request, and are
renamed into place (``os.replace``) only after their size and SHA-256 check out, so a final
path never holds a half-written or unverified-against-its-pin file. Files without a pinned
hash are accepted with a warning; their computed SHA-256 is recorded in
``pull-manifest.json`` beside them.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsecircuits.errors import ConfigError, DownloadError, InputError
from sparsecircuits.fileio import (
    atomic_write_json,
    cache_root,
    read_json_object,
)
from sparsecircuits.interop.download import (
    RETRIES,
    TIMEOUT_S,
    Progress,
    download,
    file_sha256,
    reason,
)

log = logging.getLogger(__name__)

BLOB_URL = "https://openaipublic.blob.core.windows.net/circuit-sparsity"  # the official store
BLOB_URL_ENV = "SPARSECIRCUITS_BLOB_URL"  # overrides BLOB_URL (mirrors, tests)
HUB_REPO = "openai/circuit-sparsity"
MANIFEST_FILE = "pull-manifest.json"


@dataclass(frozen=True)
class Artefact:
    """One file of the blob store: ``path`` below the base URL, ``name`` in the local
    directory, and its pinned size (bytes) and SHA-256 (hex); None means "not pinned"."""

    path: str
    name: str
    size: int | None = None
    sha256: str | None = None


TOKENIZER: tuple[Artefact, ...] = (
    Artefact("tinypython/encoder.json", "encoder.json"),
    Artefact("tinypython/vocab.bpe", "vocab.bpe"),
)


def model_artefacts(name: str) -> tuple[Artefact, ...]:
    """A released model directory plus the tinypython_2k tokenizer files (the official viewer
    reads them from ``tinypython/``), so task prompts can be tokenised for the model."""
    return (
        Artefact(f"models/{name}/beeg_config.json", "beeg_config.json"),
        Artefact(f"models/{name}/final_model.pt", "final_model.pt"),
        *TOKENIZER,
    )


# Known artefacts. Sizes and hashes are not pinned yet (they were not available offline when
# this table was written): such files are fetched unverified, with a warning, and their
# computed SHA-256 lands in the manifest, from where it can be copied here.
REGISTRY: dict[str, tuple[Artefact, ...]] = {
    "csp_yolo1": model_artefacts("csp_yolo1"),  # the paper's single_double_quote model (118M)
    "csp_yolo2": model_artefacts("csp_yolo2"),  # bracket_counting, set_or_string_fixedvarname
    "tinypython": TOKENIZER,  # the tokenizer alone
}

_SAFE_PATH = re.compile(r"[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*")
_MODEL_PATH = re.compile(r"models/([A-Za-z0-9._\-]+)/?")


@dataclass(frozen=True)
class Target:
    """What ``pull NAME`` fetches: files below ``directory`` (relative to the pull cache), or a
    Hub snapshot (``hub_repo``). ``single``: the caller wants the one file, not the folder."""

    directory: Path
    artefacts: tuple[Artefact, ...] = ()
    single: bool = False
    hub_repo: str | None = None


def resolve_target(name: str) -> Target:
    """Parse ``NAME``: a registry name, ``blob:PATH`` or ``hub:OWNER/REPO``."""
    if name.startswith("hub:"):
        repo = name.removeprefix("hub:") or HUB_REPO
        if not re.fullmatch(r"[A-Za-z0-9._\-]+/[A-Za-z0-9._\-]+", repo):
            raise InputError(f"'{name}': expected hub:OWNER/REPO, e.g. hub:{HUB_REPO}")
        return Target(Path("hub") / repo.replace("/", "--"), hub_repo=repo)
    if name.startswith("blob:"):
        path = name.removeprefix("blob:").strip("/")
        parts = path.split("/")
        if not _SAFE_PATH.fullmatch(path) or any(p in (".", "..") for p in parts):
            raise InputError(
                f"'{name}': expected blob:models/NAME or blob:PATH/TO/FILE (letters, digits, "
                "'.', '_', '-' between slashes; no '..')"
            )
        m = _MODEL_PATH.fullmatch(path)
        if m:
            return Target(Path("blob", "models", m.group(1)), model_artefacts(m.group(1)))
        if "." not in parts[-1]:  # plain HTTP cannot list a folder of the store
            raise InputError(
                f"'{name}': not a file (no extension) and not models/NAME; name a file such as "
                "blob:viz/MODEL/TASK/SWEEP/K/viz_data.pt"
            )
        return Target(Path("blob", *parts[:-1]), (Artefact(path, parts[-1]),), single=True)
    if name in REGISTRY:
        return Target(Path(name), REGISTRY[name])
    raise InputError(
        f"unknown artefact '{name}'; known: {', '.join(REGISTRY)}; or blob:models/NAME, "
        f"blob:PATH/TO/FILE, hub:{HUB_REPO}"
    )


def base_url(url: str | None = None) -> str:
    """The blob store's base URL: ``url``, else ``$SPARSECIRCUITS_BLOB_URL``, else the official
    store; must be http(s)."""
    url = (url or os.environ.get(BLOB_URL_ENV) or BLOB_URL).rstrip("/")
    if not re.match(r"https?://[^/]+", url):
        raise InputError(f"base URL '{url}': expected http://HOST[/PATH] or https://...")
    return url


def pull(
    name: str,
    *,
    cache: str | os.PathLike | None = None,
    url: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    timeout: float = TIMEOUT_S,
    retries: int = RETRIES,
    progress: Progress | None = None,
) -> Path:
    """Fetch artefact ``name`` (see :func:`resolve_target`) and return its local directory (the
    file itself for a single-file ``blob:`` path).

    ``cache``: the pull cache (default ``cache_root()/"pull"``); ``url``: the blob store's base
    URL (see :func:`base_url`); ``sha256``: the expected hash of a single-file blob path;
    ``force``: download again even if present; ``timeout``: seconds per connect/read;
    ``retries``: resumed attempts after an interrupted transfer. Files already present and
    matching their pin (or, unpinned, their manifest entry) are not fetched again.
    """
    target = resolve_target(name)
    root = Path(cache) if cache is not None else cache_root() / "pull"
    directory = root / target.directory
    if sha256 is not None:
        if not target.single:
            raise InputError("--sha256 applies to a single-file blob:PATH only")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise InputError(f"--sha256 '{sha256}': expected 64 hex digits")
        target = Target(target.directory, (_with_sha(target.artefacts[0], sha256),), True)
    if target.hub_repo is not None:
        return _pull_hub(target.hub_repo, directory, force=force)
    base = base_url(url)
    manifest_path = directory / MANIFEST_FILE
    manifest = _read_manifest(manifest_path)
    for art in target.artefacts:
        dest = directory / art.name
        if not force and _is_current(dest, art, manifest.get(art.name)):
            log.info("%s: already in the cache", dest)
            continue
        src = f"{base}/{art.path}"
        size, digest = download(
            src, dest, size=art.size, sha256=art.sha256, timeout=timeout, retries=retries,
            progress=progress,
        )  # fmt: skip
        if art.sha256 is None:
            log.warning(
                "%s: no pinned SHA-256, so the file is unverified; its SHA-256 %s is recorded in "
                "%s", dest, digest, manifest_path,
            )  # fmt: skip
        manifest[art.name] = {
            "url": src, "size": size, "sha256": digest, "pinned": art.sha256 is not None,
        }  # fmt: skip
        atomic_write_json(manifest_path, manifest)
    return directory / target.artefacts[0].name if target.single else directory


def _with_sha(art: Artefact, sha256: str) -> Artefact:
    return Artefact(art.path, art.name, art.size, sha256.lower())


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return read_json_object(path)
    except ConfigError as err:  # a damaged manifest only costs a re-download
        log.warning("ignoring %s (%s)", path, err)
        return {}


def _is_current(dest: Path, art: Artefact, entry: Any) -> bool:
    """Whether ``dest`` already holds ``art``: its pinned size/hash, else the size and hash the
    manifest recorded when it was fetched."""
    if not dest.is_file():
        return False
    size = dest.stat().st_size
    if art.size is not None and size != art.size:
        return False
    if art.sha256 is not None:
        return file_sha256(dest) == art.sha256
    return isinstance(entry, dict) and entry.get("size") == size and "sha256" in entry


def _pull_hub(repo: str, directory: Path, *, force: bool) -> Path:
    """A Hub snapshot of ``repo`` into ``directory`` (``huggingface_hub.snapshot_download``)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DownloadError(
            f"hub:{repo} needs the 'huggingface_hub' package: pip install huggingface_hub"
        ) from None
    try:
        path = snapshot_download(repo_id=repo, local_dir=directory, force_download=force)
    except Exception as err:  # the Hub raises many types (offline, 404, auth); report one line
        raise DownloadError(f"hub:{repo}: {type(err).__name__}: {reason(err)}") from None
    return Path(path)
