"""Sparse storage: a compact model loaded as CSR nonzeros computes the same function."""

from __future__ import annotations

import json

import pytest
import torch

from sparsecircuits.model import (
    GPT,
    GPTConfig,
    WeightSparsity,
    load_model,
    save_model,
    sparse_parameter_names,
)
from sparsecircuits.model.sparse_storage import CSRLinear, nnz_bytes


def _saved(tmp_path, *, tied: bool, bias: bool, frac: float = 1 / 16):
    cfg = GPTConfig(
        block_size=16, vocab_size=90, n_layer=2, n_head=4, d_head=16, d_model=64,
        bias=bias, tied_unembed=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.1)
    WeightSparsity(model, sparse_parameter_names(model)).project_(frac)
    save_model(model, tmp_path, compact=True)
    return model


@pytest.mark.parametrize(("tied", "bias"), [(False, False), (True, True)])
def test_same_logits_and_activation_gradients_with_less_memory(tmp_path, tied, bias) -> None:
    ref = _saved(tmp_path, tied=tied, bias=bias).eval()
    sparse = load_model(tmp_path, storage="sparse")
    n_csr = sum(isinstance(m, CSRLinear) for m in sparse.modules())
    assert n_csr == 2 * 4 + (0 if tied else 1)  # 4 Linears per block (+ untied lm_head);
    # every one holds >= 4096 entries, the compact format's floor for indices + values
    idx = torch.randint(0, 90, (3, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sparse(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)
    grads = []
    for m in (ref, sparse):
        x = m.embed(idx).detach().requires_grad_(True)
        m.forward_from(0, x, idx).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    assert nnz_bytes(sparse) < nnz_bytes(ref)
    blk = sparse.transformer.h[0].mlp.c_fc
    assert torch.equal(blk.weight, ref.transformer.h[0].mlp.c_fc.weight)  # dense on demand


def test_dense_files_and_dense_weights_still_load(tmp_path) -> None:
    ref = _saved(tmp_path, tied=False, bias=False, frac=1.0)  # dense: nothing is compact
    sparse = load_model(tmp_path, storage="sparse")
    assert not any(isinstance(m, CSRLinear) for m in sparse.modules())
    idx = torch.randint(0, 90, (2, 16))
    torch.testing.assert_close(sparse(idx)[0], ref.eval()(idx)[0])


def test_bad_sparse_files_get_clear_errors(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from sparsecircuits.errors import CheckpointError, ConfigError
    from sparsecircuits.model.compact import META_KEY
    from sparsecircuits.model.io import WEIGHTS_FILE

    _saved(tmp_path, tied=False, bias=True)
    path = tmp_path / WEIGHTS_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    bad = dict(tensors)
    del bad["transformer.h.0.mlp.c_fc.bias"]  # config.bias is set: the bias is required
    index = json.loads(meta[META_KEY])
    del index["transformer.h.0.mlp.c_fc.bias"]
    save_file(bad, str(path), {**meta, META_KEY: json.dumps(index)})
    with pytest.raises(CheckpointError, match=r"missing transformer\.h\.0\.mlp\.c_fc\.bias"):
        load_model(tmp_path, storage="sparse")
    bad = dict(tensors)
    save_file(bad, str(path), meta)
    bad["transformer.h.0.mlp.c_fc.weight::idx"] = (
        bad["transformer.h.0.mlp.c_fc.weight::idx"] + 10**6
    )
    save_file(bad, str(path), meta)
    with pytest.raises(CheckpointError, match="indices outside"):
        load_model(tmp_path, storage="sparse")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        load_model(tmp_path, storage="sparse", device="cuda")
