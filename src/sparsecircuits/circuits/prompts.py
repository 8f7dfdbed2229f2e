"""A fixed set of task prompts, packed for fast repeated forward passes during pruning."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsecircuits.tasks.batch import TaskBatch
from sparsecircuits.tasks.metrics import diff_losses, logit_diffs, pad_prompts


@dataclass(frozen=True)
class Chunk:
    """Prompts of similar length: idx (n, T) right-padded, lengths (n,), correct/other (n,)."""

    idx: torch.Tensor
    lengths: torch.Tensor
    correct: torch.Tensor
    other: torch.Tensor
    sign: torch.Tensor  # +1 for A prompts, -1 for B prompts (direction of the A-vs-B logit)
    pair: torch.Tensor  # index of the prompt's pair in the batch (its A and B share it)


class PromptSet:
    """Both prompts of every pair of ``batch`` (2n prompts), sorted by length into chunks of at
    most ``chunk_size`` so little compute goes to padding. Losses are per-prompt means, like the
    task metrics (the paper's stored numbers are 2x)."""

    def __init__(
        self,
        batch: TaskBatch,
        *,
        chunk_size: int = 64,
        shuffle_seed: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        prompts = [*batch.prompts_a, *batch.prompts_b]
        correct = torch.cat([batch.target_a, batch.target_b])
        other = torch.cat([batch.other_a, batch.other_b])
        sign = torch.cat([torch.ones(batch.n), -torch.ones(batch.n)])
        pair = torch.arange(batch.n).repeat(2)
        if shuffle_seed is None:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        else:  # minibatches: random pairs, both prompts of a pair in the same chunk
            gen = torch.Generator().manual_seed(shuffle_seed)
            pairs = torch.randperm(batch.n, generator=gen).tolist()
            order = [j for i in pairs for j in (i, i + batch.n)]
        chunks = []
        for s in range(0, len(order), chunk_size):
            part = order[s : s + chunk_size]
            idx, lengths = pad_prompts([prompts[i] for i in part])
            sel = torch.tensor(part)
            chunks.append(
                Chunk(
                    idx.to(device),
                    lengths.to(device),
                    correct[sel].to(device),
                    other[sel].to(device),
                    sign[sel].to(device),
                    pair[sel],
                )
            )
        self.chunks: tuple[Chunk, ...] = tuple(chunks)
        self.n_prompts = len(prompts)

    @classmethod
    def of(cls, *chunks: Chunk) -> PromptSet:
        """A prompt set made of existing chunks (e.g. one minibatch)."""
        out = cls.__new__(cls)
        out.chunks = tuple(chunks)
        out.n_prompts = sum(len(c.lengths) for c in chunks)
        return out

    def logit_diffs(self, last_logits: Callable[[Chunk], torch.Tensor]) -> torch.Tensor:
        """``z[correct] - z[other]`` at the final position of every prompt: (n_prompts,),
        in chunk order. ``last_logits(chunk)`` returns that chunk's (n, vocab) logits."""
        return torch.cat([logit_diffs(last_logits(c), c.correct, c.other) for c in self.chunks])

    @property
    def signs(self) -> torch.Tensor:
        return torch.cat([c.sign for c in self.chunks])

    @property
    def pairs(self) -> torch.Tensor:
        """Pair index of every prompt, in chunk order (n_prompts,), on the CPU."""
        return torch.cat([c.pair for c in self.chunks])

    def pair_means(self, values: torch.Tensor) -> torch.Tensor:
        """Per-pair means (n_pairs, ...) of per-prompt ``values`` (n_prompts, ...) in chunk
        order: resampling pairs, not prompts, keeps a pair's two prompts together."""
        pairs = self.pairs
        n = int(pairs.max()) + 1
        out = torch.zeros((n, *values.shape[1:]), dtype=torch.float64)
        out.index_add_(0, pairs, values.double())
        counts = torch.bincount(pairs, minlength=n).double()
        return out / counts.view(-1, *([1] * (values.dim() - 1)))

    def loss(self, last_logits: Callable[[Chunk], torch.Tensor]) -> torch.Tensor:
        """Mean per-prompt two-token loss ``softplus(z_o - z_c)`` (differentiable)."""
        return diff_losses(self.logit_diffs(last_logits)).mean()
