import pytest
import torch

from sparsecircuits.errors import ConfigError
from sparsecircuits.model import GPT
from sparsecircuits.train.config import PRESETS, TrainConfig, preset_config
from sparsecircuits.train.distributed import resolve_device


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configs(name):
    cfg = preset_config(name)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.n_head * cfg.model.d_head == cfg.model.d_model
    assert cfg.model.afrac == 0.25 and len(cfg.model.afrac_loctypes) == 8


def test_paper_preset_matches_the_paper_shape():
    cfg = preset_config("paper")
    m = cfg.model
    assert (m.n_layer, m.d_model, m.block_size, m.d_head) == (8, 2048, 256, 16)
    assert cfg.sparsity.target_l0 == 1 / 1000
    with torch.device("meta"):  # no memory: just the parameter shapes
        model = GPT(m)
    per_block = 4 * 2048 * 2048 + 3 * 2048 + 2048 + 2 * (2048 * 8192) + 8192 + 2048
    assert model.num_params() > 8 * per_block  # blocks dominate; embeddings come on top


def test_overrides_merge_into_nested_sections_and_are_validated():
    cfg = preset_config("tiny", optim={"lr": 0.02}, model={"n_layer": 3}, steps=7)
    assert (cfg.optim.lr, cfg.model.n_layer, cfg.steps) == (0.02, 3, 7)
    assert cfg.model.d_model == PRESETS["tiny"]["model"]["d_model"]  # siblings kept
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ConfigError, match=r"sparsity\.anneal"):
        preset_config("tiny", sparsity={"anneal": "exp"})  # a near-miss spelling is an error
    with pytest.raises(ConfigError, match="regrow_tokens"):
        preset_config("tiny", sparsity={"regrow_tokens": 0.0})


def test_device_auto_falls_back_to_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"


def test_shipped_model_recipes_are_valid_and_differ_only_in_sparsity():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    sparse = TrainConfig.from_json_file(root / "stdlib-sparse.json")
    dense = TrainConfig.from_json_file(root / "stdlib-dense.json")
    assert sparse.sparsity.target_l0 <= 1 / 32 and dense.sparsity.target_l0 == 1.0
    assert sparse.model_dump(exclude={"sparsity"}) == dense.model_dump(exclude={"sparsity"})


def test_every_recipe_in_configs_is_a_valid_config():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    recipes = sorted(root.glob("*.json"))
    assert len(recipes) >= 3
    for path in recipes:
        TrainConfig.from_json_file(path)
    wide = TrainConfig.from_json_file(root / "python-sparse.json")
    # Issue 17's floor: at least 500k nonzero block weights (12 d^2 per layer at the budget).
    assert wide.model.n_layer * 12 * wide.model.d_model**2 * wide.sparsity.target_l0 >= 500_000
