"""Gradient averaging over ranks with sparse (support-step) gradients, in two gloo processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsecircuits.train.distributed import DistInfo, average_gradients_, mean_over_ranks

DENSE = torch.tensor([[0.0, 2.0, 0.0], [4.0, 0.0, 6.0]])


def _sparse(scale: float) -> torch.Tensor:
    return (DENSE * scale).to_sparse()


def _rank(rank: int, init: str, results: str, mixed: bool) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        scale = float(rank + 1)
        a = torch.nn.Parameter(torch.zeros(2, 3))
        b = torch.nn.Parameter(torch.zeros(3))
        # with `mixed`, rank 1 took the dense path for `a` (its own crossover measurement)
        a.grad = (DENSE * scale) if (mixed and rank == 1) else _sparse(scale)
        b.grad = torch.full((3,), scale)
        info = DistInfo(rank=rank, world_size=2, local_rank=rank)
        average_gradients_([a, b], info)
        ga = a.grad.to_dense() if a.grad.is_sparse else a.grad
        means = mean_over_ranks([scale, 10.0 * scale], info, torch.device("cpu"))
        out = {"a": ga, "sparse": a.grad.is_sparse, "b": b.grad, "means": torch.tensor(means)}
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, mixed: bool) -> list[dict]:
    init = f"file://{tmp_path}/init-{mixed}"
    results = str(tmp_path / f"out-{mixed}")
    mp.spawn(_rank, args=(init, results, mixed), nprocs=2, join=True)
    return [torch.load(f"{results}.{r}", weights_only=True) for r in range(2)]


def test_sparse_gradients_average_their_values_and_mixed_forms_agree(tmp_path) -> None:
    for mixed in (False, True):
        out = _run(tmp_path, mixed)
        for r in out:
            assert torch.equal(r["a"], DENSE * 1.5), mixed  # (1 + 2) / 2
            assert torch.equal(r["b"], torch.full((3,), 1.5))
            assert torch.equal(r["means"], torch.tensor([1.5, 15.0], dtype=torch.float64))
        # both sparse: averaged as sparse values; forms differing: both made dense
        assert [r["sparse"] for r in out] == ([False, False] if mixed else [True, True])
