"""Build the server from a :class:`ServeConfig`: in this process, or in each of several
uvicorn worker processes (``processes > 1``), which read the config from the environment.

Every process loads the same model, catalogue, policy and keys files, and writes its own audit
log in the shared trail directory (the first free slot ``w0``, ``w1``, ...), so replicas on
one machine need nothing else in common. Replicas on several machines behind a load balancer
get the same files copied (the records name their hashes) and either separate trail
directories, gathered for ``audit verify``, or one shared directory with distinct
``audit_log_id`` values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from sparsecircuits.errors import ConfigError

CONFIG_ENV = "SPARSECIRCUITS_SERVE_CONFIG"  # how uvicorn's worker processes get the config


class ServeConfig(BaseModel):
    """Everything a server process needs to build its app (paths are resolved already)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str
    model_name: str
    device: str = "cpu"
    catalog: str | None = None
    policy: str | None = None
    baseline: str | None = None
    bridge: str | None = None  # bridges directory: monitor the model through its companion
    companion_dir: str | None = None  # the bridged sparse companion (the catalogue's model)
    workers: int = Field(default=1, ge=1)
    queue: int = Field(default=16, ge=0)
    timeout_s: float = Field(default=120.0, gt=0)
    operator_key_sha256: str | None = None
    keys_file: str | None = None
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int = Field(default=1024, ge=1, le=1024)
    audit_dir: str | None = None
    audit_key: str | None = None
    audit_log_id: str | None = None
    store_inputs: bool = False
    checkpoint_records: int = Field(default=1000, ge=1)
    checkpoint_seconds: float = Field(default=5.0, gt=0)
    segment_records: int = Field(default=100_000, ge=1)
    retain_segments: int | None = Field(default=None, ge=1)
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_endpoint: str | None = None
    otel_capture_content: bool = False


def baseline_file(catalog: Path, baseline: Path | None, bridge: Path | None = None) -> Path:
    """The baseline a catalogue is served with: the one given, else the one beside the bridges
    (monitoring through them: ``monitor calibrate --bridge`` writes it there), else the one
    beside the catalogue."""
    from sparsecircuits.monitor.calibrate import BASELINE_FILE
    from sparsecircuits.monitor.catalog import catalog_path

    if baseline is not None:
        return baseline
    return (bridge if bridge is not None else catalog_path(catalog).parent) / BASELINE_FILE


def monitor_factory(
    model,
    *,
    catalog: Path,
    policy: Path,
    baseline: Path | None,
    bridge: Path | None = None,
    dense_dir: Path | None = None,
    companion_dir: Path | None = None,
):
    """The per-request circuit telemetry of a catalogue, its baseline and a policy; each file
    is checked against the others (the model's weights hash, the catalogue's hash, the
    catalogue's families). With ``bridge`` (and the served model's ``dense_dir``), ``model``
    is monitored through the bridges and the sparse companion in ``companion_dir``."""
    from sparsecircuits.interop.download import file_sha256
    from sparsecircuits.monitor.calibrate import load_baseline
    from sparsecircuits.monitor.catalog import catalog_path, load_catalog
    from sparsecircuits.monitor.live import CircuitMonitorFactory
    from sparsecircuits.monitor.policy import load_policy

    if bridge is not None:
        if dense_dir is None or companion_dir is None:
            raise ConfigError("monitoring through bridges needs the model's and the companion's "
                              "directories")  # fmt: skip
        return bridged_factory(model, dense_dir=dense_dir, companion_dir=companion_dir,
                               bridge=bridge, catalog=catalog, policy=policy,
                               baseline=baseline)  # fmt: skip
    path = catalog_path(catalog)
    doc = load_catalog(path, model)  # refuses a catalogue built for another model
    base = load_baseline(baseline_file(catalog, baseline), catalog_sha256=file_sha256(path))
    pol = load_policy(policy, families=doc.monitored())
    return CircuitMonitorFactory(model, doc, base, pol, catalog_path=path)


def bridged_factory(dense, *, dense_dir: Path, companion_dir: Path, bridge: Path, catalog: Path,
                    policy: Path, baseline: Path | None):  # fmt: skip
    """``monitor/bridged.py``'s factory from files, each checked against the others: the
    bridges against both models' weights, ``fidelity.json`` against the bridges, the catalogue
    against the companion, the baseline against the catalogue, the bridges and the sites."""
    from sparsecircuits.bridges.fit import load_bridges, load_meta
    from sparsecircuits.interop.download import file_sha256
    from sparsecircuits.model.io import load_model, weights_hash
    from sparsecircuits.monitor.bridged import (
        BridgedMonitorFactory,
        load_fidelity,
        same_tokenizer,
    )
    from sparsecircuits.monitor.calibrate import load_baseline
    from sparsecircuits.monitor.catalog import catalog_path, load_catalog
    from sparsecircuits.monitor.policy import load_policy

    same_tokenizer(Path(dense_dir), Path(companion_dir))
    dev = next(dense.parameters()).device
    companion = load_model(Path(companion_dir), device=dev).eval()
    hashes = {"sparse": weights_hash(companion), "dense": weights_hash(dense)}
    bridges = load_bridges(Path(bridge), hashes=hashes)  # refuses other models' bridges
    sha = load_meta(Path(bridge)).weights_sha256
    fidelity = load_fidelity(bridge, weights_sha256=sha)  # refuses other bridges' numbers
    path = catalog_path(catalog)
    doc = load_catalog(path, companion)
    base = load_baseline(baseline_file(catalog, baseline, bridge),
                         catalog_sha256=file_sha256(path))  # fmt: skip
    pol = load_policy(policy, families=doc.monitored())
    return BridgedMonitorFactory(dense, companion, bridges, doc, base, pol, fidelity=fidelity,
                                 hashes=hashes, bridges_sha256=sha,
                                 companion_name=Path(companion_dir).name,
                                 catalog_path=path)  # fmt: skip


def build_app(cfg: ServeConfig, *, tracer_provider=None) -> FastAPI:
    """The app of one server process (``tracer_provider`` None: built from the config)."""
    from sparsecircuits import __version__
    from sparsecircuits.audit.log import LogOptions
    from sparsecircuits.audit.signing import load_signer
    from sparsecircuits.data import Tokenizer
    from sparsecircuits.interop.download import file_sha256
    from sparsecircuits.model.io import load_model, weights_hash
    from sparsecircuits.serve.access import KeyStore
    from sparsecircuits.serve.app import create_app
    from sparsecircuits.serve.auditing import Auditor, AuditSettings
    from sparsecircuits.serve.server import Limits
    from sparsecircuits.serve.tracing import configure_tracing

    mdir = Path(cfg.model_dir)
    model = load_model(mdir, device=cfg.device)
    factory = None
    info: dict[str, Any] = {"weights_hash": weights_hash(model)}
    if cfg.catalog is not None and cfg.policy is not None:
        base = None if cfg.baseline is None else Path(cfg.baseline)
        bridge = None if cfg.bridge is None else Path(cfg.bridge)
        factory = monitor_factory(
            model, catalog=Path(cfg.catalog), policy=Path(cfg.policy), baseline=base,
            bridge=bridge, dense_dir=mdir,
            companion_dir=None if cfg.companion_dir is None else Path(cfg.companion_dir),
        )  # fmt: skip
        pol = factory.policy
        bfile = baseline_file(Path(cfg.catalog), base, bridge)
        info.update(catalog_sha256=file_sha256(factory.catalog_path), policy_sha256=pol.sha256,
                    policy_version=pol.doc.version, baseline_sha256=file_sha256(bfile))  # fmt: skip
        if bridge is not None:  # every record names what its bridge-derived scores rest on
            from sparsecircuits.monitor.bridged import FIDELITY_FILE

            info.update(bridges_sha256=factory.bridges_sha256,
                        fidelity_sha256=file_sha256(bridge / FIDELITY_FILE),
                        companion_weights_hash=factory.hashes["sparse"])  # fmt: skip
    elif cfg.bridge is not None:
        raise ConfigError("--bridge monitors through a catalogue: give --catalog and --policy")
    auditor = None
    if cfg.audit_dir is not None:
        if cfg.audit_key is None:
            raise ConfigError("--audit-dir needs --audit-key (sparsecircuits audit keygen)")
        options = LogOptions(checkpoint_records=cfg.checkpoint_records,
                             checkpoint_seconds=cfg.checkpoint_seconds,
                             segment_records=cfg.segment_records,
                             retain_segments=cfg.retain_segments)  # fmt: skip
        settings = AuditSettings(Path(cfg.audit_dir), load_signer(Path(cfg.audit_key)),
                                 log_id=cfg.audit_log_id, options=options,
                                 store_inputs=cfg.store_inputs)  # fmt: skip
        manifest = {"config": cfg.model_dump(exclude={"operator_key_sha256"}),
                    "version": __version__, **info}  # fmt: skip
        auditor = Auditor(settings, manifest=manifest)
    provider = tracer_provider or configure_tracing(
        exporter=cfg.otel_exporter, endpoint=cfg.otel_endpoint
    )
    return create_app(
        model,
        Tokenizer.load(mdir),
        factory=factory,
        model_name=cfg.model_name,
        workers=cfg.workers,
        queue_size=cfg.queue,
        timeout_s=cfg.timeout_s,
        tracer_provider=provider,
        operator_key_sha256=cfg.operator_key_sha256,
        keys=None if cfg.keys_file is None else KeyStore.load(cfg.keys_file),
        auditor=auditor,
        limits=Limits(max_prompt_tokens=cfg.max_prompt_tokens, max_tokens=cfg.max_tokens),
        capture_content=cfg.otel_capture_content,
        record_info=info,
        on_close=None if tracer_provider is not None else provider.shutdown,
    )


def app_from_env() -> FastAPI:
    """uvicorn's app factory in each worker process (``--processes > 1``)."""
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        raise ConfigError(f"{CONFIG_ENV} is not set: start the server with `sparsecircuits serve`")
    return build_app(ServeConfig.model_validate(json.loads(raw)))


def run(cfg: ServeConfig, *, host: str, port: int, processes: int = 1) -> None:
    """Serve until interrupted: in this process, or in ``processes`` uvicorn workers."""
    import uvicorn

    if processes <= 1:
        uvicorn.run(build_app(cfg), host=host, port=port, log_level="info")
        return
    os.environ[CONFIG_ENV] = cfg.model_dump_json()
    uvicorn.run("sparsecircuits.serve.launch:app_from_env", factory=True, host=host, port=port,
                workers=processes, log_level="info")  # fmt: skip
