"""Ed25519 keys for audit records and checkpoints: create, load, name, sign, verify.

A key's id is the first 16 hex digits of the SHA-256 of its raw 32-byte public key, so anyone
holding the public key can recompute it (a record names its key by id, never by file). The
private key file is PEM (PKCS#8, unencrypted: the server reads it unattended) and mode 0600;
the public key file beside it is PEM (SubjectPublicKeyInfo) and may be published.

Rotation: create a new key, restart the server with it. Records and checkpoints signed from then
on carry the new id; ``audit verify`` takes every public key that ever signed (``--pubkey`` once
per key, or a directory of ``*.pub.pem``).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sparsecircuits.errors import InputError

PUBLIC_SUFFIX = ".pub.pem"


def key_id(public: Ed25519PublicKey) -> str:
    """16 hex digits naming ``public``: the start of SHA-256 over its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """A private key and its id; ``sign`` returns the base64 signature of ``data``."""

    private: Ed25519PrivateKey
    key_id: str

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.private.sign(data)).decode()

    @classmethod
    def generate(cls) -> Signer:
        """A fresh key in memory (tests; the server loads one from a file)."""
        private = Ed25519PrivateKey.generate()
        return cls(private, key_id(private.public_key()))


class Keyring:
    """Public keys by id: what ``verify`` trusts."""

    def __init__(self, keys: list[Ed25519PublicKey] | None = None) -> None:
        self.keys: dict[str, Ed25519PublicKey] = {key_id(k): k for k in keys or []}

    def verify(self, *, key_id: str, data: bytes, signature: str) -> bool:
        """Whether ``signature`` (base64) over ``data`` is by the key named ``key_id``;
        False for an unknown id or anything malformed."""
        public = self.keys.get(key_id)
        if public is None:
            return False
        try:
            raw = base64.b64decode(signature, validate=True)
            # One spelling per signature: base64 ignores the unused low bits of the last
            # character, so 16 strings decode alike; only the canonical one is accepted.
            if base64.b64encode(raw).decode() != signature:
                return False
            public.verify(raw, data)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    @classmethod
    def load(cls, paths: list[Path]) -> Keyring:
        """Public keys from PEM files, or every ``*.pub.pem`` in a directory given as a path."""
        files: list[Path] = []
        for p in paths:
            files.extend(sorted(p.glob(f"*{PUBLIC_SUFFIX}")) if p.is_dir() else [p])
        if not files:
            raise InputError(f"--pubkey: no public keys found in {', '.join(map(str, paths))}")
        return cls([load_public(f) for f in files])


def keygen(out: Path, *, name: str = "audit") -> tuple[Path, Path, str]:
    """Create ``out/NAME.pem`` (private, mode 0600) and ``out/NAME.pub.pem``; returns both
    paths and the key id. Refuses to overwrite an existing private key: it cannot be re-made,
    and the server may still be signing with it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"--out {out}: cannot create the directory ({err.strerror})") from None
    priv_path, pub_path = out / f"{name}.pem", out / f"{name}{PUBLIC_SUFFIX}"
    if priv_path.exists():
        raise InputError(f"{priv_path}: a key already exists there; choose another --name")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL with mode 0600 from the start: the key is never readable by others, not even
    # for the moment between a write and a chmod.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pub_path.write_bytes(pub)
    return priv_path, pub_path, key_id(private.public_key())


def load_signer(path: Path) -> Signer:
    """The private key at ``path`` (PEM, Ed25519). Refuses a key file others can read."""
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{path}: cannot read the audit key ({err.strerror})") from None
    if mode & 0o077:
        raise InputError(
            f"{path}: the audit key is readable by others (mode {mode:o}); chmod 600 it"
        )
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise InputError(f"{path}: expected an Ed25519 key, got {type(private).__name__}")
    return Signer(private, key_id(private.public_key()))


def load_public(path: Path) -> Ed25519PublicKey:
    """The public key at ``path`` (PEM, Ed25519)."""
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except OSError as err:
        raise InputError(f"{path}: cannot read the public key ({err.strerror})") from None
    except ValueError as err:
        raise InputError(f"{path}: not a PEM public key ({err})") from None
    if not isinstance(public, Ed25519PublicKey):
        raise InputError(f"{path}: expected an Ed25519 public key, got {type(public).__name__}")
    return public
