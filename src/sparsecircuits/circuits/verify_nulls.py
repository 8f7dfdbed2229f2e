"""The checks that compare the circuit with other node sets or patch it between prompts:
``random_circuits``, ``swap_null`` and ``interchange`` (see ``verify.py`` for the list)."""

from __future__ import annotations

import torch

from sparsecircuits.circuits import verdicts as V
from sparsecircuits.circuits.interchange import interchange
from sparsecircuits.circuits.prune import gates_for
from sparsecircuits.circuits.verify import Context, fmt
from sparsecircuits.circuits.verify_tools import matched_random_sets, swapped_sets
from sparsecircuits.tasks.metrics import diff_accuracy, diff_losses

SWAP_FRACTION = 0.1  # share of the circuit's nodes the swap null replaces (at least one)
N_RANDOM_INTERCHANGE = 5  # random node sets patched as the interchange baseline


def _by_pair(
    ctx: Context, circ: torch.Tensor, others: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair means of the circuit's (n,) and the other sets' (R, n) per-prompt losses:
    (n_pairs,) and (R, n_pairs), so bootstraps resample whole pairs."""
    test = ctx.data.test
    return test.pair_means(circ), test.pair_means(others.T).T


def _versus_sets(ctx: Context, sets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt losses of the circuit (n,) and of each node set (R, n)."""
    others = torch.stack([ctx.losses(gates_for(ctx.space, s)) for s in sets])
    return ctx.circuit, others


def _not_reached(ctx: Context, name: str, criterion: str) -> dict | None:
    """An N/A record when the circuit misses the target on held-out templates: beating other
    node sets is only evidence for a circuit that does the task."""
    if ctx.reached_test:
        return None
    loss = float(ctx.circuit_cal.mean())
    return V.check_result(
        name, "N/A", criterion,
        f"not judged: the circuit's held-out loss {loss:.3f} misses the target "
        f"{ctx.target:.3f}.",
        loss=loss,
    )  # fmt: skip


def check_random_circuits(ctx: Context) -> dict:
    """The circuit beats every random node set with its own (layer, location) histogram."""
    criterion = (
        "circuit loss < every random node set with the circuit's (layer, location) histogram"
    )
    if (na := _not_reached(ctx, "random_circuits", criterion)) is not None:
        return na
    gen = torch.Generator().manual_seed(ctx.options.seed)
    sets = matched_random_sets(ctx.space, ctx.kept, n=ctx.options.n_random, gen=gen)
    circ, others = _versus_sets(ctx, sets)
    loss, losses = float(circ.mean()), others.mean(1).tolist()
    cp, op = _by_pair(ctx, circ, others)
    ci = V.bootstrap(
        lambda idx: op[:, idx].mean(2).min(0).values - cp[idx].mean(1),
        len(cp),
        seed=ctx.options.seed,
    )
    lo = min(losses)
    return V.check_result(
        "random_circuits",
        V.verdict(V.beats_all(loss, losses)),
        criterion,
        f"circuit loss {loss:.3f} vs {len(losses)} random {len(ctx.kept)}-node sets drawn from "
        f"the circuit's own groups: mean {sum(losses) / len(losses):.3f}, min {lo:.3f} "
        f"(margin to the best random set {fmt(ci)}).",
        loss=loss,
        margin_interval=list(ci),
        uncertain=V.straddles(ci, 0.0),
        random_mean=sum(losses) / len(losses),
        random_min=lo,
        random_losses=losses,
    )


def check_swap_null(ctx: Context) -> dict:
    """The circuit beats >= SWAP_MIN_SHARE of copies with SWAP_FRACTION of its nodes swapped
    for random nodes of the same (layer, location) group."""
    k = max(1, round(SWAP_FRACTION * len(ctx.kept)))
    criterion = (
        f"circuit loss < at least {V.SWAP_MIN_SHARE:.0%} of copies with {k} node(s) swapped "
        "for random nodes of the same group"
    )
    if (na := _not_reached(ctx, "swap_null", criterion)) is not None:
        return na
    gen = torch.Generator().manual_seed(ctx.options.seed + 1)
    sets = swapped_sets(ctx.space, ctx.kept, k=k, n=ctx.options.n_random, gen=gen)
    circ, others = _versus_sets(ctx, sets)
    loss, losses = float(circ.mean()), others.mean(1).tolist()
    share = sum(loss < x for x in losses) / len(losses)
    cp, op = _by_pair(ctx, circ, others)
    ci = V.bootstrap(
        lambda idx: (op[:, idx].mean(2) > cp[idx].mean(1)).double().mean(0),
        len(cp),
        seed=ctx.options.seed,
    )
    return V.check_result(
        "swap_null",
        V.verdict(V.beats_share(loss, losses)),
        criterion,
        f"swapping {k} of the {len(ctx.kept)} nodes for random same-group nodes: mean loss "
        f"{sum(losses) / len(losses):.3f} vs the circuit's {loss:.3f}; {share:.0%} of "
        f"{len(losses)} swapped sets do worse ({fmt(ci)}).",
        loss=loss,
        k=k,
        share_worse=share,
        interval=list(ci),
        uncertain=V.straddles(ci, V.SWAP_MIN_SHARE),
        swapped_losses=losses,
    )


def check_interchange(ctx: Context) -> dict:
    """Patching the circuit's values from B into A makes A follow B's answer."""
    model, batch = ctx.lm.model, ctx.data.test_batch
    got = interchange(model, ctx.space, ctx.kept, batch)
    if got.n_patched_nodes == 0:
        return V.check_result(
            "interchange", "N/A", "patching needs activation nodes",
            "not judged: the circuit has only token-embedding nodes, which are not patched.",
        )  # fmt: skip
    follow = (got.diffs > 0).double()  # per prompt: the output follows the source's answer
    share = float(follow.mean())
    n = len(follow) // 2  # A prompts receive first, then B prompts: pair i at i and n + i
    ci = V.mean_interval((follow[:n] + follow[n:]) / 2, seed=ctx.options.seed)
    gen = torch.Generator().manual_seed(ctx.options.seed + 2)
    rand = matched_random_sets(ctx.space, ctx.kept, n=N_RANDOM_INTERCHANGE, gen=gen)
    rand_shares = [diff_accuracy(interchange(model, ctx.space, r, batch).diffs) for r in rand]
    rand_share = sum(rand_shares) / len(rand_shares)
    return V.check_result(
        "interchange",
        V.verdict(V.follows(share)),
        f"with the circuit's node values patched in from the other prompt of the pair, at "
        f"least {V.MIN_FOLLOW:.0%} of held-out prompts follow that prompt's answer",
        f"patching the {got.n_patched_nodes} circuit nodes from the paired prompt makes "
        f"{share:.0%} of {len(follow)} held-out prompts follow its answer ({fmt(ci)}); "
        f"{len(rand)} random node sets of the same histogram: {rand_share:.0%} on average. "
        f"{got.equal_length} of {got.n_pairs} pairs have equal length (patched at every "
        "position; others aligned from the end).",
        share_follow=share,
        interval=list(ci),
        uncertain=V.straddles(ci, V.MIN_FOLLOW),
        loss_follow=float(diff_losses(got.diffs).mean()),
        random_share_follow=rand_share,
        random_shares_follow=rand_shares,
        equal_length_pairs=got.equal_length,
        n_pairs=got.n_pairs,
    )
