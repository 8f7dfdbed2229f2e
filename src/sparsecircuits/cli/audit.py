"""Audit commands: ``sparsecircuits audit keygen | verify | prove | check-proof | replay`` and
``sparsecircuits keys create | revoke | list`` (the server's API keys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sparsecircuits.errors import InputError

audit_app = typer.Typer(
    no_args_is_help=True,
    help="Tamper-evident audit records: keys, verification, inclusion proofs, replay.",
)
SHOWN = 50  # differences printed by replay (all are counted)
keys_app = typer.Typer(no_args_is_help=True, help="The server's API keys (stored hashed).")

PubKeys = Annotated[
    list[Path], typer.Option("--pubkey", help="trusted public key (.pub.pem) or a directory")
]


@audit_app.command("keygen")
def keygen_cmd(
    out: Annotated[Path, typer.Option(help="directory for NAME.pem and NAME.pub.pem")],
    name: Annotated[str, typer.Option(help="file name stem")] = "audit",
) -> None:
    """Create an Ed25519 signing key (private file mode 0600) and its public half."""
    from sparsecircuits.audit.signing import keygen

    priv, pub, kid = keygen(out, name=name)
    typer.echo(f"audit keygen: key {kid}\n  private {priv} (mode 0600)\n  public  {pub}")


def _trusted(paths: list[Path]) -> list[dict]:
    out = []
    for p in paths:
        try:
            doc = json.loads(p.read_bytes())
        except (OSError, ValueError) as err:
            raise InputError(f"{p}: not a checkpoint file ({err})") from None
        if not isinstance(doc, dict):
            raise InputError(f"{p}: not a checkpoint file (expected a JSON object)")
        out.append(doc)
    return out


@audit_app.command("verify")
def verify_cmd(
    trail: Annotated[Path, typer.Argument(help="audit directory (one log, or a dir of logs)")],
    pubkey: PubKeys,
    trusted_checkpoint: Annotated[
        list[Path] | None,
        typer.Option(help="a checkpoint kept elsewhere: the log must still contain it"),
    ] = None,
) -> None:
    """Check chains, signatures, tree heads and consistency; name the first bad record."""
    from sparsecircuits.audit.signing import Keyring
    from sparsecircuits.audit.verify import verify_trail

    if not trail.is_dir():
        raise InputError(f"{trail}: no such audit directory")
    reports = verify_trail(trail, Keyring.load(pubkey), trusted=_trusted(trusted_checkpoint or []))
    if not reports:
        raise InputError(f"{trail}: holds no audit log")
    bad = 0
    for r in reports:
        state = "OK" if r.ok else "FAIL"
        typer.echo(
            f"{state} log {r.log}: {r.records} records (from {r.first_seq}), {r.checkpoints} "
            f"checkpoints (last {r.last_checkpoint}), {max(r.unsigned_tail, 0)} after it, "
            f"{len(r.recoveries)} recovered tails, {len(r.unfinished)} started but not completed"
        )
        for note in r.notes:
            typer.echo(f"  note: {note}")
        if r.damages:
            bad += 1
            typer.echo(f"  first bad record: {r.damages[0]}")
            for d in r.damages[1:]:
                typer.echo(f"  also: {d}")
    total = sum(r.records for r in reports)
    typer.echo(f"audit verify: {len(reports)} logs, {total} records, {bad} damaged")
    if bad:
        raise typer.Exit(1)


@audit_app.command("prove")
def prove_cmd(
    trail: Annotated[Path, typer.Argument(help="audit directory")],
    request_id: Annotated[str, typer.Argument(help="the request's id (cmpl-...)")],
    out: Annotated[Path | None, typer.Option(help="write the proof here (default: stdout)")] = None,
) -> None:
    """An inclusion proof of the request's record that verifies against a checkpoint alone."""
    from sparsecircuits.audit.proofs import prove
    from sparsecircuits.fileio import atomic_write_json

    proof = prove(trail, request_id)
    if out is None:
        typer.echo(json.dumps(proof, indent=2))
    else:
        try:
            atomic_write_json(out, proof)
        except OSError as err:
            raise InputError(f"--out {out}: cannot write the proof ({err.strerror})") from None
        typer.echo(f"audit prove: record {proof['index']} of log {proof['log']} -> {out}")


@audit_app.command("check-proof")
def check_proof_cmd(
    proof: Annotated[Path, typer.Argument(help="a proof file from `audit prove`")],
    pubkey: PubKeys,
) -> None:
    """Verify a proof with nothing but public keys (no log needed)."""
    from sparsecircuits.audit.proofs import check_proof
    from sparsecircuits.audit.signing import Keyring
    from sparsecircuits.fileio import read_json_object

    doc = read_json_object(proof)
    problems = check_proof(doc, Keyring.load(pubkey))
    for p in problems:
        typer.echo(f"FAIL {proof}: {p}")
    if problems:
        raise typer.Exit(1)
    rec = json.loads(doc["record"])
    typer.echo(
        f"OK {proof}: the {rec.get('kind')} record of {rec.get('request_id')} (outcome "
        f"{rec.get('outcome')}, record {rec.get('seq')} of log {rec.get('log')}) is in the log "
        f"that checkpoint {doc['checkpoint'].get('size')} commits to"
    )


@audit_app.command("replay")
def replay_cmd(
    trail: Annotated[Path, typer.Argument(help="audit directory")],
    request_id: Annotated[str, typer.Argument(help="the request's id (cmpl-...)")],
    model: Annotated[str | None, typer.Option(help="model dir (default: as recorded)")] = None,
    catalog: Annotated[str | None, typer.Option(help="catalogue (default: as recorded)")] = None,
    policy: Annotated[str | None, typer.Option(help="policy (default: as recorded)")] = None,
    baseline: Annotated[str | None, typer.Option(help="baseline (default: as recorded)")] = None,
) -> None:
    """Re-run a request recorded with --store-inputs; compare scores and decision exactly."""
    from sparsecircuits.serve.replay import replay

    diffs = replay(trail, request_id, model=model, catalog=catalog, policy=policy,
                   baseline=baseline)  # fmt: skip
    for d in diffs[:SHOWN]:
        typer.echo(f"DIFF {d}")
    if len(diffs) > SHOWN:
        typer.echo(f"... and {len(diffs) - SHOWN} more differences ({len(diffs)} in all)")
    if diffs:
        raise typer.Exit(1)
    typer.echo(f"audit replay: {request_id} reproduced exactly (scores, decision, output)")


@keys_app.command("create")
def keys_create(
    file: Annotated[Path, typer.Option(help="the keys file (created if missing)")],
    key_id: Annotated[str, typer.Option("--id", help="the key's name")],
    scope: Annotated[str, typer.Option(help="user or operator")] = "user",
    requests_per_minute: Annotated[int | None, typer.Option(help="limit (default: none)")] = None,
    tokens_per_minute: Annotated[int | None, typer.Option(help="limit (default: none)")] = None,
) -> None:
    """Create a key: it is printed once; only its SHA-256 is stored."""
    from sparsecircuits.serve.access import create_key

    secret = create_key(file, key_id=key_id, scope=scope, requests_per_minute=requests_per_minute,
                        tokens_per_minute=tokens_per_minute)  # fmt: skip
    typer.echo(secret)


@keys_app.command("revoke")
def keys_revoke(
    file: Annotated[Path, typer.Option(help="the keys file")],
    key_id: Annotated[str, typer.Option("--id", help="the key's name")],
) -> None:
    """Remove a key (a running server keeps it until restarted)."""
    from sparsecircuits.serve.access import revoke_key

    revoke_key(file, key_id=key_id)
    typer.echo(f"keys: revoked {key_id}")


@keys_app.command("list")
def keys_list(file: Annotated[Path, typer.Option(help="the keys file")]) -> None:
    """Ids, scopes and limits (never secrets: the file has none)."""
    from sparsecircuits.serve.access import read_keys

    for k in read_keys(file).keys:
        typer.echo(f"{k.id}\t{k.scope}\trpm={k.requests_per_minute}\ttpm={k.tokens_per_minute}")


def register(app: typer.Typer) -> None:
    """Add ``audit`` and ``keys`` to ``app``."""
    app.add_typer(audit_app, name="audit")
    app.add_typer(keys_app, name="keys")
