"""Tamper-evident audit records: hash chain, Merkle checkpoints, signatures, verification."""
