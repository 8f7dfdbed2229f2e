"""``sparsecircuits audit keygen | verify | prove | check-proof`` and ``keys create | list |
revoke`` through the CLI: exit codes, what they print, and one-line errors for bad input."""

from __future__ import annotations

import json
import logging
import shutil
import stat
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from sparsecircuits import cli
from sparsecircuits.audit import layout
from sparsecircuits.audit.log import AuditLog, LogOptions
from sparsecircuits.audit.signing import keygen, load_signer
from sparsecircuits.errors import InputError
from sparsecircuits.serve.access import hash_secret

N_REQUESTS = 9  # 18 records: start + complete each


def _run(*args: str):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def _main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The console entry point (errors become one line and exit status 2): (status, out, err)."""
    monkeypatch.setattr(sys, "argv", ["sparsecircuits", *map(str, args)])
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # keep pytest's logging
    with pytest.raises(SystemExit) as exc:
        cli.main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def _one_line_error(args: list[str], monkeypatch, capsys) -> str:
    code, _, err = _main(args, monkeypatch, capsys)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    """(private key, public key) made by the library's keygen."""
    priv, pub, _ = keygen(tmp_path / "keys")
    return priv, pub


@pytest.fixture
def trail(tmp_path, keys) -> Path:
    """A closed trail with one log ``w0``: an open record, then start/complete pairs
    (checkpoints every 4 records, and a final one at close)."""
    path = tmp_path / "trail"
    log = AuditLog(path, load_signer(keys[0]), options=LogOptions(checkpoint_records=4))
    try:
        log.append("open", {"server": {"pid": 1}})
        for i in range(N_REQUESTS):
            rid = f"cmpl-{i:032x}"
            log.append("start", {"request_id": rid, "params": {"max_tokens": i + 1}})
            log.sync(log.append("complete", {"request_id": rid, "outcome": "completed"}))
    finally:
        log.close()
    return path


def _segment(trail: Path) -> Path:
    (seg,) = [p for _, p in layout.segments(trail / "w0")]
    return seg


# --- keygen --------------------------------------------------------------------------------------
def test_keygen_creates_a_private_key_0600_and_its_public_half(tmp_path):
    out = tmp_path / "k"
    res = _run("audit", "keygen", "--out", out)
    assert res.exit_code == 0, res.output
    priv, pub = out / "audit.pem", out / "audit.pub.pem"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    signer = load_signer(priv)  # loads (it would refuse a key others can read)
    assert f"key {signer.key_id}" in res.output and str(priv) in res.output
    assert (
        signer.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == pub.read_bytes()
    )
    res = _run("audit", "keygen", "--out", out, "--name", "second")
    assert res.exit_code == 0 and (out / "second.pem").exists()


def test_keygen_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "k"
    assert _run("audit", "keygen", "--out", out).exit_code == 0
    before = (out / "audit.pem").read_bytes(), (out / "audit.pub.pem").read_bytes()
    res = _run("audit", "keygen", "--out", out)
    assert res.exit_code != 0 and isinstance(res.exception, InputError)
    line = _one_line_error(["audit", "keygen", "--out", out], monkeypatch, capsys)
    assert "already exists" in line
    assert ((out / "audit.pem").read_bytes(), (out / "audit.pub.pem").read_bytes()) == before


# --- verify --------------------------------------------------------------------------------------
def test_verify_a_good_trail(trail, keys):
    n = 1 + 2 * N_REQUESTS
    for pubkey in (keys[1], keys[1].parent):  # a file, or a directory of *.pub.pem
        res = _run("audit", "verify", trail, "--pubkey", pubkey)
        assert res.exit_code == 0, res.output
        assert f"OK log w0: {n} records (from 0)" in res.output
        assert "0 started but not completed" in res.output
        assert f"audit verify: 1 logs, {n} records, 0 damaged" in res.output
        assert "FAIL" not in res.output
    res = _run("audit", "verify", trail / "w0", "--pubkey", keys[1])  # one log's directory
    assert res.exit_code == 0 and "OK log w0" in res.output


@pytest.mark.parametrize("n", [0, 5, 18])
def test_verify_names_the_first_edited_record(trail, keys, n):
    seg = _segment(trail)
    lines = seg.read_bytes().split(b"\n")
    doc = json.loads(lines[n])
    key = "request_id" if "request_id" in doc else "time"
    value = doc[key]
    i = len(value) - 2  # one character, same length, still JSON
    edited = value[:i] + ("7" if value[i] != "7" else "3") + value[i + 1 :]
    lines[n] = lines[n].replace(value.encode(), edited.encode(), 1)
    seg.write_bytes(b"\n".join(lines))
    res = _run("audit", "verify", trail, "--pubkey", keys[1])
    assert res.exit_code == 1, res.output
    assert f"first bad record: edited: log w0 record {n} " in res.output
    assert f"w0/{seg.name}:{n + 1}" in res.output
    assert "FAIL log w0" in res.output and "1 damaged" in res.output


def test_verify_with_a_stranger_key(trail, tmp_path):
    _, other, _ = keygen(tmp_path / "other")
    res = _run("audit", "verify", trail, "--pubkey", other)
    assert res.exit_code == 1
    assert "not trusted" in res.output or "bad signature" in res.output


def _truncate_tail(trail: Path, keep: int) -> None:
    """What an attacker who can write the log does: cut records after ``keep`` and delete
    every checkpoint that covered them."""
    seg = _segment(trail)
    lines = [x for x in seg.read_bytes().split(b"\n") if x]
    seg.write_bytes(b"".join(x + b"\n" for x in lines[:keep]))
    for size, path in layout.checkpoints(trail / "w0"):
        if size > keep:
            path.unlink()


def test_trusted_checkpoint_catches_a_tail_cut_with_its_checkpoints(trail, keys, tmp_path):
    (size, last), *_ = reversed(layout.checkpoints(trail / "w0"))
    kept = tmp_path / "kept-elsewhere.json"  # an auditor's copy of the newest tree head
    shutil.copy(last, kept)
    assert size == 1 + 2 * N_REQUESTS
    _truncate_tail(trail, keep=9)
    # The documented limit: the log alone cannot show that records after its last checkpoint
    # existed once; what is left is a shorter, fully consistent log. It passes.
    res = _run("audit", "verify", trail, "--pubkey", keys[1])
    assert res.exit_code == 0, res.output
    assert "OK log w0: 9 records" in res.output
    # A tree head kept out of band catches it.
    res = _run("audit", "verify", trail, "--pubkey", keys[1], "--trusted-checkpoint", kept)
    assert res.exit_code == 1, res.output
    assert "first bad record: truncated: log w0" in res.output
    assert f"covers {size} records; the log has 9" in res.output


def test_trusted_checkpoint_that_still_holds(trail, keys):
    (_, first), *_ = layout.checkpoints(trail / "w0")
    res = _run("audit", "verify", trail, "--pubkey", keys[1], "--trusted-checkpoint", first)
    assert res.exit_code == 0, res.output


def test_trusted_checkpoint_forged_or_of_a_gone_log(trail, keys, tmp_path):
    (_, last), *_ = reversed(layout.checkpoints(trail / "w0"))
    doc = json.loads(last.read_bytes())
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**doc, "root": "0" * 64}))
    res = _run("audit", "verify", trail, "--pubkey", keys[1], "--trusted-checkpoint", forged)
    assert res.exit_code == 1 and "forged_checkpoint" in res.output
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps({**doc, "log": "w7"}))  # names a log that is not there
    res = _run("audit", "verify", trail, "--pubkey", keys[1], "--trusted-checkpoint", gone)
    assert res.exit_code == 1 and "deleted: log w7" in res.output


# --- prove / check-proof -------------------------------------------------------------------------
def test_prove_and_check_proof_round_trip(trail, keys, tmp_path):
    rid = f"cmpl-{3:032x}"
    out = tmp_path / "proof.json"
    res = _run("audit", "prove", trail, rid, "--out", out)
    assert res.exit_code == 0, res.output
    assert f"-> {out}" in res.output and "of log w0" in res.output
    res = _run("audit", "check-proof", out, "--pubkey", keys[1])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"OK {out}")
    # the same proof on stdout
    res = _run("audit", "prove", trail, rid)
    assert res.exit_code == 0
    assert json.loads(res.output) == json.loads(out.read_text())


@pytest.mark.parametrize("part", ["record", "proof", "index", "root"])
def test_check_proof_of_a_tampered_proof_exits_1(trail, keys, tmp_path, part):
    out = tmp_path / "proof.json"
    assert _run("audit", "prove", trail, f"cmpl-{3:032x}", "--out", out).exit_code == 0
    p = json.loads(out.read_text())
    if part == "record":
        p["record"] = p["record"].replace('"outcome":"completed"', '"outcome":"completer"')
    elif part == "proof":
        h = p["proof"][0]
        p["proof"][0] = ("1" if h[0] == "0" else "0") + h[1:]
    elif part == "index":
        p["index"] -= 1
    else:
        r = p["checkpoint"]["root"]
        p["checkpoint"]["root"] = r[:-1] + ("1" if r[-1] == "0" else "0")
    out.write_text(json.dumps(p))
    res = _run("audit", "check-proof", out, "--pubkey", keys[1])
    assert res.exit_code == 1, res.output
    assert res.output.startswith(f"FAIL {out}: ")
    assert "OK" not in res.output


def test_check_proof_with_the_wrong_key(trail, tmp_path):
    out = tmp_path / "proof.json"
    assert _run("audit", "prove", trail, f"cmpl-{0:032x}", "--out", out).exit_code == 0
    _, other, _ = keygen(tmp_path / "other")
    res = _run("audit", "check-proof", out, "--pubkey", other)
    assert res.exit_code == 1 and "not by a trusted key" in res.output


# --- keys ----------------------------------------------------------------------------------------
def test_keys_create_list_revoke(tmp_path):
    file = tmp_path / "keys.json"
    res = _run("keys", "create", "--file", file, "--id", "alice", "--scope", "operator",
               "--requests-per-minute", "60")  # fmt: skip
    assert res.exit_code == 0, res.output
    secret = res.output.strip()
    assert secret.startswith("sck-") and len(secret.splitlines()) == 1  # the secret, only
    text = file.read_text()
    assert secret not in text and hash_secret(secret) in text  # stored hashed
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    res = _run("keys", "create", "--file", file, "--id", "bob", "--tokens-per-minute", "500")
    assert res.exit_code == 0
    bob = res.output.strip()
    assert bob != secret and bob not in file.read_text()

    res = _run("keys", "list", "--file", file)
    assert res.exit_code == 0
    assert res.output.splitlines() == [
        "alice\toperator\trpm=60\ttpm=None",
        "bob\tuser\trpm=None\ttpm=500",
    ]
    assert secret not in res.output and bob not in res.output

    res = _run("keys", "revoke", "--file", file, "--id", "alice")
    assert res.exit_code == 0 and "revoked alice" in res.output
    res = _run("keys", "list", "--file", file)
    assert res.output.splitlines() == ["bob\tuser\trpm=None\ttpm=500"]
    assert hash_secret(secret) not in file.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id", "alice"], "already exists"),  # a second key of the same id
        (["--id", "bad id!"], "id"),
        (["--id", "carol", "--scope", "admin"], "scope"),
        (["--id", "carol", "--requests-per-minute", "0"], "requests_per_minute"),
    ],
)
def test_keys_create_refuses_bad_input(tmp_path, monkeypatch, capsys, args, message):
    file = tmp_path / "keys.json"
    assert _run("keys", "create", "--file", file, "--id", "alice").exit_code == 0
    before = file.read_bytes()
    line = _one_line_error(["keys", "create", "--file", file, *args], monkeypatch, capsys)
    assert message in line
    assert file.read_bytes() == before


def test_keys_revoke_unknown_and_list_missing(tmp_path, monkeypatch, capsys):
    file = tmp_path / "keys.json"
    assert _run("keys", "create", "--file", file, "--id", "alice").exit_code == 0
    line = _one_line_error(["keys", "revoke", "--file", file, "--id", "zed"], monkeypatch, capsys)
    assert "no key with id 'zed'" in line
    _one_line_error(["keys", "list", "--file", tmp_path / "nope.json"], monkeypatch, capsys)


# --- bad input: one line, no traceback -----------------------------------------------------------
def test_verify_a_missing_trail_dir(tmp_path, keys, monkeypatch, capsys):
    missing = tmp_path / "no-such-trail"
    res = _run("audit", "verify", missing, "--pubkey", keys[1])
    assert res.exit_code != 0 and isinstance(res.exception, InputError)
    line = _one_line_error(["audit", "verify", missing, "--pubkey", keys[1]], monkeypatch, capsys)
    assert "no such audit directory" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line_error(["audit", "verify", empty, "--pubkey", keys[1]], monkeypatch, capsys)
    assert "holds no audit log" in line


def _ec_public_pem(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


@pytest.mark.parametrize("kind", ["text", "broken pem", "private key", "ec key", "missing"])
def test_a_pubkey_that_is_not_an_ed25519_pem(trail, keys, tmp_path, monkeypatch, capsys, kind):
    bad = tmp_path / "bad.pub.pem"
    if kind == "text":
        bad.write_text("not a key\n")
    elif kind == "broken pem":
        bad.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    elif kind == "private key":
        shutil.copy(keys[0], bad)
    elif kind == "ec key":
        _ec_public_pem(bad)
    proof = tmp_path / "proof.json"
    proof.write_text("{}")  # read first; the keys are what must fail
    for cmd in (["audit", "verify", trail], ["audit", "check-proof", proof]):
        line = _one_line_error([*cmd, "--pubkey", bad], monkeypatch, capsys)
        assert str(bad) in line


def test_a_pubkey_directory_without_keys(trail, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-keys"
    empty.mkdir()
    line = _one_line_error(["audit", "verify", trail, "--pubkey", empty], monkeypatch, capsys)
    assert "no public keys found" in line


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "", "\x00\x01"])
def test_a_malformed_trusted_checkpoint(trail, keys, tmp_path, monkeypatch, capsys, content):
    bad = tmp_path / "trusted.json"
    bad.write_text(content)
    args = ["audit", "verify", trail, "--pubkey", keys[1], "--trusted-checkpoint", bad]
    line = _one_line_error(args, monkeypatch, capsys)
    assert "not a checkpoint file" in line and str(bad) in line
    missing = tmp_path / "missing.json"
    args = ["audit", "verify", trail, "--pubkey", keys[1], "--trusted-checkpoint", missing]
    assert "not a checkpoint file" in _one_line_error(args, monkeypatch, capsys)


def test_prove_errors(trail, tmp_path, monkeypatch, capsys):
    line = _one_line_error(["audit", "prove", trail, "cmpl-unknown"], monkeypatch, capsys)
    assert "no record of request 'cmpl-unknown'" in line
    _one_line_error(["audit", "prove", tmp_path / "nowhere", "cmpl-x"], monkeypatch, capsys)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema": 1}'])
def test_check_proof_of_a_file_that_is_not_a_proof(keys, tmp_path, monkeypatch, capsys, content):
    bad = tmp_path / "proof.json"
    bad.write_text(content)
    code, out, err = _main(["audit", "check-proof", bad, "--pubkey", keys[1]], monkeypatch, capsys)
    assert code != 0 and "Traceback" not in err
    lines = [x for x in (out + err).splitlines() if x.strip()]
    assert len(lines) == 1, out + err


def test_check_proof_of_a_proof_whose_checkpoint_is_not_an_object(trail, keys, tmp_path):
    out = tmp_path / "proof.json"
    assert _run("audit", "prove", trail, f"cmpl-{1:032x}", "--out", out).exit_code == 0
    p = json.loads(out.read_text())
    p["checkpoint"] = "cp-000000000019.json"
    out.write_text(json.dumps(p))
    res = _run("audit", "check-proof", out, "--pubkey", keys[1])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 1 and "FAIL" in res.output


def test_keygen_into_a_path_that_is_a_file(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _one_line_error(["audit", "keygen", "--out", afile], monkeypatch, capsys)
    assert str(afile) in line


def test_prove_into_a_path_that_cannot_be_written(trail, tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = ["audit", "prove", trail, f"cmpl-{0:032x}", "--out", afile / "proof.json"]
    assert "--out" in _one_line_error(args, monkeypatch, capsys)
