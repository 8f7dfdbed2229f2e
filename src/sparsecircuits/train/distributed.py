"""torch.distributed set-up for ``torchrun`` (gloo on CPU, nccl on GPU) and gradient averaging."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sparsecircuits.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistInfo()


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` and other torch
    device strings are accepted when that device exists here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"--device '{spec}': not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device '{spec}': CUDA is not available on this machine")
    return device


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; returns (info, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE_PROCESS, device
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def average_gradients_(params: list[nn.Parameter], info: DistInfo) -> None:
    """All-reduce and average gradients over ranks in one flat buffer (no-op single-process)."""
    if not info.enabled:
        return
    with_grad = [p for p in params if p.grad is not None]
    # A sparse gradient (support steps) has the same pattern on every rank, the weights being
    # identical, and only its values are averaged. Whether a layer took the sparse kernels is
    # decided per process (a measured crossover), so the ranks first agree on each gradient's
    # form: where they differ, every rank makes that gradient dense.
    code = torch.tensor([p.grad._nnz() if p.grad.is_sparse else -1 for p in with_grad])
    lo, hi = code.clone(), code.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    for p, a, b in zip(with_grad, lo.tolist(), hi.tolist(), strict=True):
        if a != b and p.grad.is_sparse:
            p.grad = p.grad.to_dense()
    grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in with_grad]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """The ranks' mean of each value (the values themselves single-process)."""
    if not info.enabled or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
