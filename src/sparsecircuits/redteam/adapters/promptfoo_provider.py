"""promptfoo provider: our model continues each prompt, and the circuit telemetry of prompt +
continuation comes back as the response's metadata.

promptfoo (tested with 0.121.20) runs a ``file://...py`` provider in a Python worker that
calls ``call_api(prompt, options, context)``. The worker must be an interpreter where
``sparsecircuits`` imports: set ``PROMPTFOO_PYTHON`` to it (e.g. ``.venv/bin/python``)::

    providers:
      - id: file:///path/to/src/sparsecircuits/redteam/adapters/promptfoo_provider.py
        config: {model: stdlib-sparse, max_tokens: 16, family: string-literal}

``options["config"]`` (all optional): ``model`` (a directory or shipped name, default
``stdlib-sparse``), ``catalog`` / ``policy`` (paths; default the model's ``monitor/`` and its
``policy.yaml``), ``device`` (default ``cpu``), ``max_tokens`` (tokens generated, default 16),
``temperature`` (0, the default, is greedy), ``seed`` (the sampling seed, default 0) and
``family`` (score one circuit family; default any monitored one). A misspelt or invalid setting
comes back as promptfoo's ``error``, one line naming it.

The returned metadata is :meth:`~sparsecircuits.redteam.telemetry.Verdict.as_metadata`
(``circuit_flagged``, ``circuit_max_z``, ``circuit_rules_fired``, ``circuit_action``) plus
``circuit_max_z_by_family`` (robust z, dimensionless), ``circuit_family`` and what scored it
(``circuit_model``, ``circuit_policy_sha256``). A promptfoo assertion reads it, e.g.
``type: javascript, value: "!context.metadata?.circuit_flagged"`` (hypothetical use).

The loaded model and monitor are cached per (model, catalog, policy, device): promptfoo keeps a
worker alive across calls, so each is loaded once per worker. Nothing is imported from torch or
our package until the first call (promptfoo loads this file by path).
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {"model": "stdlib-sparse", "catalog": None, "policy": None,
                            "device": "cpu", "max_tokens": 16, "temperature": 0.0, "seed": 0,
                            "family": None}  # fmt: skip
# Keys promptfoo itself puts in (or reads from) a Python provider's config: passed through.
PROMPTFOO_KEYS = frozenset({"basePath", "pythonExecutable", "workers", "timeout"})
MAX_TOKENS_LIMIT = 4096  # a guard against a typo generating for minutes on a CPU

_BACKENDS: dict[tuple, Any] = {}  # (model, catalog, policy, device) -> InProcess


class ConfigError(ValueError):
    """A provider setting is invalid (one line naming it)."""


def _number(cfg: dict[str, Any], key: str, kind: type, lo: float, hi: float | None) -> Any:
    value = cfg[key]
    ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type or value < lo or (hi is not None and value > hi):
        what = "a number" if kind is float else "an integer"
        bound = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"config.{key}: must be {what} {bound}, got {value!r}")
    return kind(value)


def parse_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The provider's settings: ``config`` over :data:`DEFAULTS`, checked (ConfigError)."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULTS) - PROMPTFOO_KEYS)
    if unknown:
        known = ", ".join(sorted(DEFAULTS))
        raise ConfigError(f"config.{unknown[0]}: unknown setting (known: {known})")
    cfg = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
    cfg["max_tokens"] = _number(cfg, "max_tokens", int, 1, MAX_TOKENS_LIMIT)
    cfg["temperature"] = _number(cfg, "temperature", float, 0.0, None)
    cfg["seed"] = _number(cfg, "seed", int, 0, None)
    for key in ("model", "device"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            raise ConfigError(f"config.{key}: must be a non-empty string, got {cfg[key]!r}")
    for key in ("catalog", "policy", "family"):
        if cfg[key] is not None and (not isinstance(cfg[key], str) or not cfg[key]):
            raise ConfigError(f"config.{key}: must be a non-empty string, got {cfg[key]!r}")
    return cfg


def backend(cfg: dict[str, Any]) -> Any:
    """The cached in-process telemetry (model, tokenizer, monitor) for ``cfg``."""
    from pathlib import Path

    from sparsecircuits.redteam.telemetry import InProcess

    key = (cfg["model"], cfg["catalog"], cfg["policy"], cfg["device"])
    if key not in _BACKENDS:
        path = {k: Path(cfg[k]) if cfg[k] else None for k in ("catalog", "policy")}
        _BACKENDS[key] = InProcess(cfg["model"], device=cfg["device"], **path)
    return _BACKENDS[key]


def generate(tp: Any, prompt: str, cfg: dict[str, Any]) -> tuple[str, int, int]:
    """Continue ``prompt`` with the model: (text, prompt tokens, generated tokens). Generation
    stops early at end-of-text, which is not part of the text."""
    import torch

    from sparsecircuits.errors import InputError

    ids = tp.tok.encode(prompt)
    if not ids:
        raise InputError("prompt: empty (no tokens to continue)")
    dev = next(tp.model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(cfg["seed"])
    out = tp.model.generate(torch.tensor([ids], device=dev), max_new_tokens=cfg["max_tokens"],
                            temperature=cfg["temperature"], generator=gen)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    if tp.tok.eot_id in new:
        new = new[: new.index(tp.tok.eot_id)]
    return tp.tok.decode(new), len(ids), len(new)


def call_api(prompt: str, options: dict[str, Any] | None = None,
             context: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """promptfoo's entry point: ``{"output", "metadata", "tokenUsage"}``, or ``{"error"}``
    (one line) for an invalid setting or prompt."""
    from sparsecircuits.errors import SparseCircuitsError
    from sparsecircuits.redteam.telemetry import verdict

    try:
        cfg = parse_config((options or {}).get("config"))
        tp = backend(cfg)
        known = tp.describe().get("families") or []
        if cfg["family"] is not None and cfg["family"] not in known:
            raise ConfigError(f"config.family: {cfg['family']!r} is not monitored here "
                              f"(monitored: {', '.join(sorted(known))})")  # fmt: skip
        output, n_prompt, n_new = generate(tp, prompt, cfg)
        record = tp.record(prompt + output)
        v = verdict(record, family=cfg["family"])
    except (ConfigError, SparseCircuitsError) as err:
        return {"error": str(err)}
    desc = tp.describe()
    families = record.get("families") or {}
    metadata = {**v.as_metadata(),
                "circuit_max_z_by_family": {k: f.get("max_z") for k, f in families.items()},
                "circuit_family": cfg["family"], "circuit_model": desc.get("model"),
                "circuit_policy_sha256": desc.get("policy_sha256")}  # fmt: skip
    usage = {"prompt": n_prompt, "completion": n_new, "total": n_prompt + n_new}
    return {"output": output, "metadata": metadata, "tokenUsage": usage}
