"""The package installs and works without a C++ compiler (the torch fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sparsecircuits.kernels import _lib

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_builds_without_a_compiler(tmp_path: Path) -> None:
    env = {**os.environ, "CC": "/nonexistent/cc", "CXX": "/nonexistent/c++"}
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("sparsecircuits-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparsecircuits/kernels/select.py" in names
    assert not any("_sckernels" in n for n in names)  # built without the extension


def test_without_the_library_everything_uses_the_fallback(monkeypatch) -> None:
    monkeypatch.setattr(_lib, "library_path", lambda: None)
    _lib._load.cache_clear()
    try:
        assert _lib.backend() == "torch"
        from sparsecircuits.model import GPT, GPTConfig

        model = GPT(GPTConfig(n_layer=1, d_model=32, n_head=2, d_head=16, vocab_size=50))
        _, loss = model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))
        loss.backward()
        assert torch.isfinite(loss)
        monkeypatch.setenv(_lib.ENV, "cpp")
        with pytest.raises(Exception, match="not built"):
            _lib.lib()
    finally:
        _lib._load.cache_clear()


def test_a_stale_or_foreign_library_is_refused_with_a_reason(monkeypatch, tmp_path) -> None:
    """A library without this package's symbols (built from older sources, or not ours at
    all) is not used: the fallback runs, and forcing cpp names the file and the reason."""
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a foreign library")
    monkeypatch.setattr(_lib, "library_path", lambda: Path(libm))
    _lib._load.cache_clear()
    try:
        assert _lib.backend() == "torch"
        monkeypatch.setenv(_lib.ENV, "cpp")
        with pytest.raises(Exception, match="no sc_isa"):
            _lib.lib()
    finally:
        _lib._load.cache_clear()
