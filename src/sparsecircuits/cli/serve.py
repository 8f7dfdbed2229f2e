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
        Path | None,
        typer.Option(
            help="baseline.json (default: beside the bridges with --bridge, else beside the "
            "catalogue)"
        ),
    ] = None,
    bridge: Annotated[
        Path | None,
        typer.Option(
            help="bridges (a directory, or stdlib-bridges): monitor MODEL, a dense model, "
            "through its sparse companion; needs --catalog and --policy"
        ),
    ] = None,
    companion: Annotated[
        str | None,
        typer.Option(
            help="the bridged sparse model (dir, run or name; default: the catalogue's model)"
        ),
    ] = None,
    operator_key_file: Annotated[
        Path | None,
        typer.Option(
            help="file holding the key the operator routes require (or set "
            f"{OPERATOR_KEY_ENV}); needed to bind beyond loopback"
        ),
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(help="API keys file (sparsecircuits keys create): every route needs a key"),
    ] = None,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="refuse prompts over this many tokens (default: context)")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="the largest max_tokens a request may ask (1..1024)")
    ] = 1024,
    processes: Annotated[
        int, typer.Option(help="server processes (uvicorn workers), each with its own audit log")
    ] = 1,
    audit_dir: Annotated[
        Path | None, typer.Option(help="write signed, chained audit records here")
    ] = None,
    audit_key: Annotated[
        Path | None, typer.Option(help="Ed25519 private key (sparsecircuits audit keygen)")
    ] = None,
    audit_log_id: Annotated[
        str | None, typer.Option(help="this process's log name in --audit-dir (default w0, w1..)")
    ] = None,
    store_inputs: Annotated[
        bool, typer.Option(help="keep raw prompts and completions in the records (for replay)")
    ] = False,
    checkpoint_records: Annotated[
        int, typer.Option(help="a signed tree head after this many records")
    ] = 1000,
    checkpoint_seconds: Annotated[
        float, typer.Option(help="... or this many seconds after new records")
    ] = 5.0,
    segment_records: Annotated[int, typer.Option(help="records per segment file")] = 100_000,
    retain_segments: Annotated[
        int | None, typer.Option(help="keep this many segments, delete older (default: all)")
    ] = None,
    otel_exporter: Annotated[
        str, typer.Option(help="request spans: none, console or otlp (needs --otel-endpoint)")
    ] = "none",
    otel_endpoint: Annotated[
        str | None, typer.Option(help="OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces")
    ] = None,
    otel_capture_content: Annotated[
        bool, typer.Option(help="put prompt and completion text on spans (off: hashes only)")
    ] = False,
    device: Device = "auto",
) -> None:
    """Serve OpenAI-compatible completions (POST /v1/completions, GET /v1/models) with the
    policy's decision in every response, and the operator's routes (/v1/telemetry/ID,
    /metrics, /healthz)."""
    from pydantic import ValidationError

    from sparsecircuits.model.config import format_validation_error
    from sparsecircuits.model.io import resolve_model_dir
    from sparsecircuits.serve.launch import ServeConfig, run
    from sparsecircuits.train.distributed import resolve_device

    mdir = resolve_model_dir(model)
    if bridge is not None:  # a directory or the name of shipped bridges
        from sparsecircuits.bridges.fit import resolve_bridges_dir

        bridge = resolve_bridges_dir(bridge)
    if (bridge is not None or companion is not None) and catalog is None:
        raise InputError("--bridge monitors through a catalogue of the companion: give "
                         "--catalog and --policy (and --companion needs --bridge)")  # fmt: skip
    if companion is not None and bridge is None:
        raise InputError("--companion needs --bridge")
    cdir = None if companion is None else resolve_model_dir(companion)
    if catalog is not None and str(catalog) == SHIPPED:
        if bridge is not None and cdir is None:
            raise InputError("--catalog shipped with --bridge: name the --companion that ships it")
        catalog = (cdir or mdir) / MONITOR_DIR  # with --bridge: the companion's catalogue
        if not catalog.is_dir():
            raise InputError(f"--catalog shipped: {catalog.parent.name} ships no catalogue "
                             f"({catalog})")  # fmt: skip
        policy = policy or catalog / "policy.yaml"
    if (catalog is None) != (policy is None) or (baseline is not None and catalog is None):
        raise InputError("--catalog and --policy go together (and --baseline needs them)")
    if bridge is not None and cdir is None:  # the catalogue names the model it was built for
        from sparsecircuits.monitor.catalog import catalog_path, load_catalog

        cdir = resolve_model_dir(load_catalog(catalog_path(catalog)).model_id)
    key = _operator_key(operator_key_file)
    if key is None and keys is None and not _loopback(host):
        raise InputError(
            f"--host {host} would expose every route to whoever reaches the server: give "
            f"--keys or --operator-key-file (or {OPERATOR_KEY_ENV})"
        )
    if processes < 1 or (processes > 1 and audit_log_id is not None):
        raise InputError("--processes must be >= 1 (and each process names its own log: "
                         "leave --audit-log-id out with --processes > 1)")  # fmt: skip
    if (audit_dir is None) != (audit_key is None):
        raise InputError("--audit-dir and --audit-key go together")
    if keys is not None:  # refuse a bad keys file before loading the model
        from sparsecircuits.serve.access import KeyStore

        KeyStore.load(keys)
    try:
        cfg = ServeConfig(
            model_dir=str(mdir), model_name=model if not Path(model).exists() else mdir.name,
            device=str(resolve_device(device)), catalog=_s(catalog), policy=_s(policy),
            baseline=_s(baseline), bridge=_s(bridge), companion_dir=_s(cdir), workers=workers,
            queue=queue, timeout_s=timeout,
            operator_key_sha256=None if key is None else hashlib.sha256(key.encode()).hexdigest(),
            keys_file=_s(keys), max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
            audit_dir=_s(audit_dir), audit_key=_s(audit_key), audit_log_id=audit_log_id,
            store_inputs=store_inputs, checkpoint_records=checkpoint_records,
            checkpoint_seconds=checkpoint_seconds, segment_records=segment_records,
            retain_segments=retain_segments, otel_exporter=otel_exporter,
            otel_endpoint=otel_endpoint, otel_capture_content=otel_capture_content,
        )  # fmt: skip
    except ValidationError as err:
        raise InputError(format_validation_error(err, source="serve options")) from None
    via = "" if cdir is None else f", monitored through {cdir.name} via {bridge}"
    typer.echo(f"serve: {mdir.name} at http://{host}:{port}/v1{via}  (Ctrl+C to stop)")
    run(cfg, host=host, port=port, processes=processes)


def _s(path: Path | None) -> str | None:
    return None if path is None else str(path.resolve())


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


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command()(serve)
