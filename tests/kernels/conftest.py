"""Run each kernel test under both backends: the compiled library and the torch fallback."""

from __future__ import annotations

import pytest

from sparsecircuits.kernels._lib import ENV, library_path


@pytest.fixture
def force_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "torch")


@pytest.fixture
def force_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    if library_path() is None:
        pytest.skip("compiled kernels not built")
    monkeypatch.setenv(ENV, "cpp")
