"""Circuit-aware red teaming, measured: how often ``scan --objective engage`` drives a family's
largest engagement over the scored positions above the benign 99th percentile of the same
statistic, per search mode, at the same budget.

For each family and mode (``gcg``: gradient candidates; ``random``: random single swaps, the
baseline; ``evolve``: no gradients), ``--seeds`` seeded searches on the family's default
template, each with ``--budget`` candidate evaluations; a seed succeeds when the search found
at least one hit (every constraint held, engagement above the threshold). Prints the success
rate, the median evaluations to the first hit, and the time per search.

    python benchmarks/redteam.py [--seeds 50] [--budget 512] [--families string-literal ...]
        [--modes gcg random evolve] [--out results.json]

``--objective evade`` measures instead how well the breakout detectors of the telemetry
benchmark hold up against ``evade`` (``redteam_evade.py`` says how):

    python benchmarks/redteam.py --objective evade [--items 100] [--budget 512] [--span 4]
        [--min-target-prob 0.1] [--dense stdlib-dense]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import redteam_evade
from _timing import machine

from sparsecircuits.model.io import resolve_model_dir
from sparsecircuits.redteam.scan import load_monitor, scan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stdlib-sparse")
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--families", nargs="*", default=None)
    ap.add_argument("--modes", nargs="*", default=["gcg", "random", "evolve"])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--objective", choices=["engage", "evade"], default="engage")
    ap.add_argument(
        "--measure",
        choices=["engagement", "causal_share"],
        default="engagement",
        help="engage: what is driven up (and compared with its benign p99)",
    )
    ev = ap.add_argument_group("evade")
    ev.add_argument("--items", type=int, default=100, help="breakout items attacked")
    ev.add_argument("--span", type=int, default=4, help="tokens searched before the breakout")
    ev.add_argument("--min-target-prob", type=float, default=0.1)
    ev.add_argument("--dense", default="stdlib-dense", help="behaviour transfer to this model")
    ev.add_argument("--n-train", type=int, default=2000)
    ev.add_argument("--n-test", type=int, default=2000)
    ev.add_argument("--seed", type=int, default=0, help="data split seed")
    ev.add_argument(
        "--calibrate",
        choices=["test", "train"],
        default="test",
        help="the split whose benign items set the 1%%-FPR thresholds",
    )
    args = ap.parse_args()
    d = resolve_model_dir(args.model)
    shipped = d / "monitor" / "policy.yaml"  # its rules, as the server applies them
    mon = load_monitor(d, d / "monitor", policy=shipped if shipped.exists() else None)
    if args.objective == "evade":
        print(machine())
        redteam_evade.run(mon, args)
        return
    families = args.families or sorted(mon.rules)
    rows = []
    for fam in families:
        for mode in args.modes:
            wins, firsts, secs = 0, [], []
            for seed in range(args.seeds):
                searcher, res = scan(mon, family=fam, objective="engage", mode=mode,
                                     budget=args.budget, seed=seed,
                                     measure=args.measure)  # fmt: skip
                secs.append(res.seconds)
                if res.hits:
                    wins += 1
                    firsts.append(res.hits[0].evaluations)
            rows.append({
                "family": fam, "mode": mode, "seeds": args.seeds, "budget": args.budget,
                "success": wins / args.seeds, "threshold": searcher.obj.threshold(),
                "median_evals_to_hit": statistics.median(firsts) if firsts else None,
                "s_per_search": statistics.median(secs),
            })  # fmt: skip
    print(machine())
    print(f"model {args.model}; objective engage; measure {args.measure}; {args.seeds} seeds; "
          f"budget {args.budget} evaluations per search; a success: a hit (the largest "
          f"{args.measure} from the span on above the benign p99 of the same statistic, every "
          "constraint held)")  # fmt: skip
    print(f"{'family':<15}{'mode':<8}{'threshold':>10}{'success':>9}{'evals to hit':>14}"
          f"{'s/search':>10}")  # fmt: skip
    for r in rows:
        first = "-" if r["median_evals_to_hit"] is None else f"{r['median_evals_to_hit']:.0f}"
        print(f"{r['family']:<15}{r['mode']:<8}{r['threshold']:>10.3f}{r['success']:>9.0%}"
              f"{first:>14}{r['s_per_search']:>10.2f}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
