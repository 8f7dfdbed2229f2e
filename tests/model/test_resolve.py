"""Model specs: directories, training runs and shipped names."""

import pytest

from sparsecircuits.errors import CheckpointError
from sparsecircuits.model import GPT, save_model
from sparsecircuits.model import io as model_io

from .helpers import tiny_config


def test_run_directory_resolves_to_its_final_model(tmp_path):
    save_model(GPT(tiny_config()), tmp_path / "run" / "model")
    assert model_io.resolve_model_dir(tmp_path / "run") == tmp_path / "run" / "model"
    assert model_io.resolve_model_dir(tmp_path / "run" / "model") == tmp_path / "run" / "model"


def test_shipped_names_resolve_inside_the_package_root(tmp_path, monkeypatch):
    save_model(GPT(tiny_config()), tmp_path / "demo-model")
    (tmp_path / "not-a-model").mkdir()
    monkeypatch.setattr(model_io, "PRETRAINED_ROOT", tmp_path)
    assert model_io.pretrained_names() == ["demo-model"]
    assert model_io.resolve_model_dir("demo-model") == tmp_path / "demo-model"
    assert model_io.load_model("demo-model").config == tiny_config()
    with pytest.raises(CheckpointError, match=r"shipped: demo-model"):
        model_io.resolve_model_dir("other-model")
