"""``sparsecircuits serve``: the model server (FastAPI + uvicorn), bound to 127.0.0.1 unless
told otherwise."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from sparsecircuits.cli.common import DEFAULT_MODEL, Device, ModelArg
from sparsecircuits.errors import InputError


def serve(
    model: ModelArg = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option(help="address to bind (127.0.0.1: this machine only)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="model worker threads (>= 1)")] = 1,
    queue: Annotated[
        int, typer.Option(help="requests that may wait for a worker; more get 503 (>= 0)")
    ] = 16,
    timeout: Annotated[float, typer.Option(help="seconds each request may take (> 0)")] = 120.0,
    catalog: Annotated[
        Path | None,
        typer.Option(
            help="circuit catalogue (per-request telemetry); 'shipped': the model's "
            "own, with its baseline and log-only policy"
        ),
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="policy YAML (needs --catalog)")] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="baseline.json (default: the one beside the catalogue)")
    ] = None,
    operator_key_file: Annotated[
        Path | None,
        typer.Option(
            help="file holding the key the operator routes require (or set "
            f"{OPERATOR_KEY_ENV}); needed to bind beyond loopback"
        ),
    ] = None,
    device: Device = "auto",
) -> None:
    """Serve OpenAI-compatible completions (POST /v1/completions, GET /v1/models) with the
    policy's decision in every response, and the operator's routes (/v1/telemetry/ID,
    /metrics, /healthz)."""
    from sparsecircuits.model.io import load_model, resolve_model_dir

    mdir = resolve_model_dir(model)
    if catalog is not None and str(catalog) == SHIPPED:
        catalog = mdir / MONITOR_DIR
        if not catalog.is_dir():
            raise InputError(f"--catalog shipped: {mdir.name} ships no catalogue ({catalog})")
        policy = policy or catalog / "policy.yaml"
    if (catalog is None) != (policy is None) or (baseline is not None and catalog is None):
        raise InputError("--catalog and --policy go together (and --baseline needs them)")
    if workers < 1 or queue < 0 or timeout <= 0:
        raise InputError(
            f"--workers must be >= 1, --queue >= 0 and --timeout > 0; got {workers}, {queue}, "
            f"{timeout}"
        )
    key = _operator_key(operator_key_file)
    if key is None and not _loopback(host):
        raise InputError(
            f"--host {host} would expose the operator routes (telemetry, metrics) to whoever "
            f"reaches the server: give --operator-key-file or {OPERATOR_KEY_ENV}"
        )
    import uvicorn

    from sparsecircuits.data import Tokenizer
    from sparsecircuits.serve.app import create_app
    from sparsecircuits.train.distributed import resolve_device

    m = load_model(mdir, device=resolve_device(device))
    factory = None
    if catalog is not None:
        factory = _monitor_factory(m, catalog=catalog, policy=policy, baseline=baseline)
    app = create_app(
        m,
        Tokenizer.load(mdir),
        factory=factory,
        operator_key_sha256=None if key is None else hashlib.sha256(key.encode()).hexdigest(),
        model_name=model if not Path(model).exists() else mdir.name,
        workers=workers,
        queue_size=queue,
        timeout_s=timeout,
    )
    typer.echo(f"serve: {mdir.name} at http://{host}:{port}/v1  (Ctrl+C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="info")


OPERATOR_KEY_ENV = "SPARSECIRCUITS_OPERATOR_KEY"
SHIPPED = "shipped"  # --catalog shipped: the model directory's monitor/ (catalogue, baseline)
MONITOR_DIR = "monitor"


def _operator_key(path: Path | None) -> str | None:
    """The operator key from ``path`` or the environment (None: none given). Only its hash
    goes further; the key itself is never logged or stored."""
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise InputError(f"{path}: cannot read the operator key ({err.strerror})") from None
        if len(key) < 16:
            raise InputError(f"{path}: an operator key needs at least 16 characters")
        return key
    key = os.environ.get(OPERATOR_KEY_ENV, "").strip()
    if key and len(key) < 16:
        raise InputError(f"{OPERATOR_KEY_ENV}: an operator key needs at least 16 characters")
    return key or None


def _loopback(host: str) -> bool:
    """Whether ``host`` binds this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _monitor_factory(model, *, catalog: Path, policy: Path, baseline: Path | None):
    """The per-request circuit telemetry of a catalogue, its baseline and a policy; each file
    is checked against the others (the model's weights hash, the catalogue's hash, the
    catalogue's families)."""
    from sparsecircuits.interop.download import file_sha256
    from sparsecircuits.monitor.calibrate import BASELINE_FILE, load_baseline
    from sparsecircuits.monitor.catalog import catalog_path, load_catalog
    from sparsecircuits.monitor.live import CircuitMonitorFactory
    from sparsecircuits.monitor.policy import load_policy

    path = catalog_path(catalog)
    doc = load_catalog(path, model)  # refuses a catalogue built for another model
    base = load_baseline(baseline or path.parent / BASELINE_FILE, catalog_sha256=file_sha256(path))
    pol = load_policy(policy, families=doc.monitored())
    return CircuitMonitorFactory(model, doc, base, pol, catalog_path=path)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command()(serve)
