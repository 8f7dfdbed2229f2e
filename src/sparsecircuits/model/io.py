"""Save and load models: our format (``model.safetensors`` + ``config.json``); read only:
OpenAI's official directories (``beeg_config.json`` + ``final_model.pt``, ``model/official.py``),
Hugging Face-style snapshots (``config.json`` with a ``model_type``, ``model/snapshot.py``) and
jacobcd52's format (``config.json`` with ``model_config``, ``model/jacob.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sparsecircuits.errors import CheckpointError, ConfigError
from sparsecircuits.fileio import atomic_write, atomic_write_json, read_json_object
from sparsecircuits.model.compact import (
    META_KEY,
    check_flat_indices,
    compact_state,
    expand_state,
)
from sparsecircuits.model.config import GPTConfig
from sparsecircuits.model.gpt import GPT
from sparsecircuits.model.jacob import is_jacob_config, read_jacob
from sparsecircuits.model.official import official_config, read_official_state
from sparsecircuits.model.snapshot import is_snapshot_config, read_snapshot
from sparsecircuits.model.sparse_storage import (
    CSRLinear,
    csr_from_flat,
    csr_module_names,
    install_csr_,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SPARSITY_FILE = "sparsity.json"  # the weight-sparsity settings a model was trained with
OFFICIAL_CONFIG_FILE = "beeg_config.json"
OFFICIAL_WEIGHTS_FILE = "final_model.pt"
FORMAT = "sparsecircuits.gpt"
PRETRAINED_ROOT = Path(__file__).resolve().parents[1] / "pretrained"  # package data
FORMAT_VERSION = 1
# Config fields added after models were first hashed, with the default that leaves them out.
_LATER_FIELDS = {"d_pos_emb": None, "sinusoidal_cat_pos_emb": False}


def save_model(
    model: GPT, directory: str | Path, *, compact: bool = False, fp16: Collection[str] = ()
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (each atomically).

    ``compact`` stores mostly-zero tensors as indices + values (for shipping weight-sparse
    models); ``fp16`` names tensors to store in half precision (only with ``compact``).
    """
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tied_unembed:
        state.pop("lm_head.weight", None)  # stored once, as transformer.wte.weight
    meta = {"format": FORMAT}
    if compact:
        state, extra = compact_state(state, fp16=fp16)
        meta.update(extra)
    elif fp16:
        raise ValueError("fp16 storage is only available with compact=True")
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, meta))
    atomic_write_json(
        directory / CONFIG_FILE,
        {"format": FORMAT, "format_version": FORMAT_VERSION, **model.config.to_json_dict()},
    )


def weights_hash(model: GPT) -> str:
    """sha256 of the config and every tensor (name, dtype, shape, bytes), in name order.

    Computed from the model in memory, so a compact (indices + values) and a dense copy of the
    same weights hash alike. Circuits store it and refuse to load against different weights.
    Signed zeros are hashed as +0.0: masking weights by multiplication leaves -0.0 entries, which
    the compact format (nonzeros only) restores as +0.0.
    """
    config = model.config.to_json_dict()
    for key, default in _LATER_FIELDS.items():  # so hashes of older models stay what they were
        if config.get(key) == default:
            config.pop(key)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        if t.is_floating_point():
            t = t + 0.0  # -0.0 + 0.0 == +0.0; every other value (NaN aside) is unchanged
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_sparsity(directory: str | Path) -> dict[str, Any] | None:
    """The ``sparsity.json`` next to a model (None when the model has none)."""
    path = Path(directory) / SPARSITY_FILE
    if not path.exists():
        return None
    data = read_json_object(path)
    if not isinstance(data.get("target_l0"), int | float):
        raise ConfigError(f"{path}: expected an object with a numeric 'target_l0'")
    return data


def read_config(directory: str | Path) -> GPTConfig:
    """Validate ``config.json`` of a sparsecircuits model directory."""
    path = Path(directory) / CONFIG_FILE
    data = read_json_object(path, missing=CheckpointError)
    fmt, version = data.pop("format", None), data.pop("format_version", None)
    if fmt != FORMAT or version != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: expected format '{FORMAT}' version {FORMAT_VERSION}, "
            f"got {fmt!r} version {version!r}"
        )
    return GPTConfig.from_dict(data, source=str(path))


def pretrained_names() -> list[str]:
    """Names of the models shipped with the package (``sparsecircuits/pretrained/NAME``)."""
    if not PRETRAINED_ROOT.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_ROOT.iterdir() if (p / CONFIG_FILE).exists())


def resolve_model_dir(spec: str | Path) -> Path:
    """A model directory from a path (model dir, a file in it, or a training run directory,
    whose final ``model/`` is used) or the name of a shipped model such as ``stdlib-sparse``."""
    path = Path(spec)
    if path.is_file():
        path = path.parent
    if path.is_dir():
        if not (path / CONFIG_FILE).exists() and (path / "model" / CONFIG_FILE).exists():
            return path / "model"  # a training run
        return path
    if isinstance(spec, str) and spec in pretrained_names():
        return PRETRAINED_ROOT / spec
    known = ", ".join(pretrained_names()) or "none installed"
    raise CheckpointError(f"{spec}: no such model directory or shipped model (shipped: {known})")


def model_format(directory: Path) -> str | None:
    """Which reader ``directory`` needs: "sparsecircuits", "snapshot" (a ``config.json`` with a
    ``model_type``), "jacobcd52" (one with ``model_config``), "official" or None."""
    if (directory / CONFIG_FILE).exists():
        data = read_json_object(directory / CONFIG_FILE)
        if is_snapshot_config(data):
            return "snapshot"
        return "jacobcd52" if is_jacob_config(data) else "sparsecircuits"
    return "official" if (directory / OFFICIAL_CONFIG_FILE).exists() else None


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    storage: Literal["dense", "sparse"] = "dense",
) -> GPT:
    """Load a model in any format we read (see :func:`model_format`); returns it in eval mode.

    ``path``: anything :func:`resolve_model_dir` accepts (a directory, a run, a shipped model's
    name). Official directories need ``beeg_config.json`` and ``final_model.pt`` (legacy keys such
    as ``n_mlp`` are understood); the result gives the logits of the official inference code.
    Snapshots and jacobcd52's models are read without running any code they ship.
    ``storage="sparse"`` (CPU inference, our format only) keeps weights stored as indices +
    values as CSR nonzeros only, never allocating their dense matrices
    (``model/sparse_storage.py``).
    """
    path = resolve_model_dir(path)
    if storage == "sparse" and torch.device(device).type != "cpu":
        raise ConfigError(f"storage='sparse' runs on the CPU; got device {device!r}")
    kind = model_format(path)
    if storage == "sparse" and kind in ("snapshot", "jacobcd52"):
        raise ConfigError(
            f"{path}: storage='sparse' reads only the sparsecircuits format, not a {kind} "
            "directory; load it with storage='dense'"
        )
    if storage == "sparse" and kind == "sparsecircuits":
        return _load_sparse(path).eval()
    source = str(path)
    if kind == "sparsecircuits":
        config = read_config(path)
        state = _read_safetensors(path / WEIGHTS_FILE)
    elif kind == "snapshot":
        config, state, source = read_snapshot(path)
    elif kind == "jacobcd52":
        config, state, source = read_jacob(path)
    elif kind == "official":
        config = official_config(path / OFFICIAL_CONFIG_FILE)
        state = read_official_state(path / OFFICIAL_WEIGHTS_FILE, config)
    else:
        raise CheckpointError(
            f"{path}: expected {CONFIG_FILE} + {WEIGHTS_FILE} (sparsecircuits), "
            f"{OFFICIAL_CONFIG_FILE} + {OFFICIAL_WEIGHTS_FILE} (official circuit-sparsity), "
            f"a Hugging Face snapshot ({CONFIG_FILE} with model_type + *.safetensors) or "
            f"jacobcd52's format ({CONFIG_FILE} with model_config + pytorch_model.bin)"
        )
    with torch.device("meta"):  # no throw-away random init: the state's tensors are used
        model = GPT(config)
    load_state(model, state, source=source, assign=True)
    return model.to(device).eval()


def check_state(model: GPT, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Any missing, unexpected or misshapen key of ``state`` for ``model`` is an error, and a
    tied unembedding must equal the embedding."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else "")
            )
        raise CheckpointError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{source}: '{k}' has shape {tuple(v.shape)}, the config "
                f"implies {tuple(expected[k].shape)}"
            )
    # Both keys load into one shared tensor, so two different matrices would silently lose one.
    if model.config.tied_unembed and not torch.equal(
        state["lm_head.weight"], state["transformer.wte.weight"]
    ):
        raise CheckpointError(
            f"{source}: the config ties the unembedding to the embedding (tied_unembed), but "
            "'lm_head.weight' differs from 'transformer.wte.weight'"
        )


def _with_tied(model: GPT, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tied = model.config.tied_unembed
    if tied and "lm_head.weight" not in state and "transformer.wte.weight" in state:
        return {**state, "lm_head.weight": state["transformer.wte.weight"]}
    return state


def load_state(
    model: GPT, state: dict[str, torch.Tensor], *, source: str, assign: bool = False
) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or misshapen key is an error.
    ``assign`` adopts the state's tensors instead of copying (for a model built on "meta";
    floating tensors are made float32 first, as copying into the parameters would)."""
    state = _with_tied(model, state)
    check_state(model, state, source=source)
    if assign:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
    if model.config.tied_unembed:  # assignment gives the two names separate Parameters
        model.lm_head.weight = model.transformer.wte.weight


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return expand_state(*_read_raw(path), source=str(path))


def _read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from None
    return tensors, metadata


def _load_sparse(path: Path) -> GPT:
    """Our format with sparse storage: compact weights become CSR modules directly."""
    config = read_config(path)
    source = str(path / WEIGHTS_FILE)
    tensors, metadata = _read_raw(path / WEIGHTS_FILE)
    try:
        index = json.loads(metadata.get(META_KEY, "{}"))
    except ValueError as err:
        raise CheckpointError(f"{source}: bad compact metadata ({err})") from None
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    csr: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in csr_module_names(model):
        key = f"{name}.weight"
        spec = index.get(key, {})
        if spec.get("encoding") != "sparse":
            continue
        shape = tuple(expected[key].shape)
        if tuple(spec.get("shape", ())) != shape:
            raise CheckpointError(
                f"{source}: '{key}' has shape {tuple(spec.get('shape', ()))}, the config "
                f"implies {shape}"
            )
        flat, values = tensors.pop(key + "::idx", None), tensors.pop(key + "::val", None)
        n = shape[0] * shape[1]
        if flat is None or values is None or flat.numel() != values.numel():
            raise CheckpointError(f"{source}: compact weight '{key}' lacks indices or values")
        check_flat_indices(flat, n, name=key, source=source)
        csr[name] = (flat, values)
        index.pop(key)
    rest = _with_tied(model, expand_state(tensors, {META_KEY: json.dumps(index)}, source=source))
    # The dense load's checks, the CSR weights standing in with their (meta) shapes.
    check_state(
        model, {**rest, **{f"{n}.weight": expected[f"{n}.weight"] for n in csr}}, source=source
    )
    for name, (flat, values) in csr.items():
        shape = tuple(expected[f"{name}.weight"].shape)
        crow, col = csr_from_flat(*shape, flat)
        install_csr_(
            model, name, CSRLinear(shape, crow, col, values, rest.pop(f"{name}.bias", None))
        )
    rest = {k: v.float() if v.is_floating_point() else v for k, v in rest.items()}
    model.load_state_dict(rest, strict=False, assign=True)  # adopt, never copy
    if config.tied_unembed:  # assignment gives the two names separate Parameters: re-tie
        model.lm_head.weight = model.transformer.wte.weight
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # every tensor must come from the file
        raise CheckpointError(f"{source}: no weights for {', '.join(left[:4])}")
    return model
