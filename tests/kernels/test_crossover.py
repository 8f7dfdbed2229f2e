"""The measured density crossover: cached per shape, overridable, validated."""

from __future__ import annotations

import json

import pytest

from sparsecircuits.errors import ConfigError
from sparsecircuits.kernels import crossover


def test_measured_once_then_read_from_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPARSECIRCUITS_CACHE", str(tmp_path))
    monkeypatch.delenv(crossover.ENV, raising=False)
    monkeypatch.setattr(crossover, "_memory", {})
    calls = []

    def fake_measure(out_f, in_f, **_):
        calls.append((out_f, in_f))
        return 0.125

    monkeypatch.setattr(crossover, "measure_crossover", fake_measure)
    assert crossover.sparse_below(40, 24) == 0.125
    assert crossover.sparse_below(40, 24) == 0.125
    assert calls == [(40, 24)]
    table = json.loads((tmp_path / "kernels" / "crossover.json").read_text())
    assert list(table.values()) == [0.125] and "40x24" in next(iter(table))
    monkeypatch.setattr(crossover, "_memory", {})  # a new process reads the file
    assert crossover.sparse_below(40, 24) == 0.125 and len(calls) == 1


def test_a_real_measurement_returns_a_density_in_range() -> None:
    d = crossover.measure_crossover(64, 64, tokens=64, rounds=1)
    assert 0.0 < d < 1.0


def test_override_and_bad_values(monkeypatch) -> None:
    monkeypatch.setenv(crossover.ENV, "0.3")
    assert crossover.sparse_below(7, 9) == 0.3
    for bad in ("fast", "-1"):
        monkeypatch.setenv(crossover.ENV, bad)
        with pytest.raises(ConfigError, match=crossover.ENV):
            crossover.sparse_below(7, 9)
