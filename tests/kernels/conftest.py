"""Run each kernel test under both backends: the compiled library and the torch fallback."""

from __future__ import annotations

import os

import pytest

from sparsecircuits.kernels._lib import ENV, library_path


@pytest.fixture(autouse=True)
def _restore_backend_env():
    """Tests switch backends by setting the variable directly (also inside hypothesis
    examples, where monkeypatch cannot be used); put it back after each test."""
    old = os.environ.get(ENV)
    yield
    if old is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = old


@pytest.fixture
def force_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "torch")


@pytest.fixture
def force_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    if library_path() is None:
        pytest.skip("compiled kernels not built")
    monkeypatch.setenv(ENV, "cpp")
