"""Mutation check of the circuit verdicts: apply each mutant below to a copy of the repository,
run the tests that should catch it, and print which fail. Every mutant must make at least one
test fail; a mutant that survives means a check could be broken without the suite noticing.

    .venv/bin/python tools/mutants.py                  # all mutants (about 15 minutes, 2 cores)
    .venv/bin/python tools/mutants.py "no tau clamp"   # one by name

The repository itself is never modified: mutants are applied in a temporary copy of its tracked
files (plus the compiled kernels), which is deleted afterwards.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

C = "src/sparsecircuits/circuits/"
P, VT = "tests/circuits/test_planted.py", "tests/circuits/test_verdicts.py"
MUTANTS = [
    (
        "sufficiency criterion flipped",
        C + "verdicts.py",
        "return loss <= target",
        "return loss > target",
        [P, VT],
    ),
    (
        "sufficiency always passes",
        C + "verify.py",
        'V.verdict(V.sufficient(loss, ctx.target)),\n        "circuit test loss <= target"',
        'V.verdict(True),\n        "circuit test loss <= target"',
        [P],
    ),
    (
        "necessity ablates the complement",
        C + "verify.py",
        "    gates = torch.ones(ctx.space.total)\n    gates[ctx.kept] = 0.0",
        "    gates = torch.zeros(ctx.space.total)\n    gates[ctx.kept] = 1.0",
        [P],
    ),
    (
        "necessity always passes",
        C + "verify.py",
        "V.verdict(V.necessary(frac)),",
        "V.verdict(True),",
        [P],
    ),
    (
        "necessity: absolute 0.6 instead of relative",
        C + "verdicts.py",
        "return fraction >= NECESSITY_MIN_FRACTION",
        "return True",
        [P, VT],
    ),
    (
        "necessity judged for circuits that miss",
        C + "verdicts.py",
        "return circuit_reached_test and loss_full",
        "return loss_full",
        [P, VT],
    ),
    (
        "random circuits always pass",
        C + "verify_nulls.py",
        "V.verdict(V.beats_all(loss, losses)),",
        "V.verdict(True),",
        [P],
    ),
    (
        "random circuits drawn from all nodes",
        C + "verify_tools.py",
        "parts = [g.offset + torch.randperm(g.size, generator=gen)[:c] for g, c in counts if c]",
        "parts = [torch.randperm(space.total, generator=gen)[:c] for g, c in counts if c]",
        [P, VT],
    ),
    (
        "swap null always passes",
        C + "verify_nulls.py",
        "V.verdict(V.beats_share(loss, losses)),",
        "V.verdict(True),",
        [P],
    ),
    (
        "interchange always passes",
        C + "verdicts.py",
        "return share >= MIN_FOLLOW",
        "return True",
        [P, VT],
    ),
    (
        "negative controls always pass",
        C + "verify_reprune.py",
        'verdict = V.verdict(all(r["passed"] for r in done)) if done else "N/A"',
        'verdict = "PASS"',
        [P],
    ),
    (
        "random init always passes",
        C + "verify_reprune.py",
        "V.verdict(_larger(run, n)),",
        "V.verdict(True),",
        [P],
    ),
    (
        "random init redraws the bigram table",
        C + "verify_tools.py",
        'KEPT_IN_RANDOM_INIT = ("bigram_table",)',
        "KEPT_IN_RANDOM_INIT = ()",
        ["tests/circuits/test_verify.py::test_randomize_weights_keeps_the_exact_sparsity_pattern"],
    ),
    (
        "ablation_kinds gets a verdict again",
        C + "verify.py",
        '        "INFO",\n        "reported without a verdict',
        '        "PASS",\n        "reported without a verdict',
        [P],
    ),
    (
        "mask relaxation always passes",
        C + "verify.py",
        'V.verdict(rule["ok"]),',
        "V.verdict(True),",
        [P],
    ),
    (
        "mask relaxation ignores its rise",
        C + "verdicts.py",
        '"ok": toward and rise <= MAX_RISE',
        '"ok": toward',
        [P, VT],
    ),
    (
        "seed stability criterion flipped",
        C + "verdicts.py",
        "return jaccard_mean >= MIN_JACCARD",
        "return jaccard_mean < MIN_JACCARD",
        [P, VT],
    ),
    (
        "seed stability always passes",
        C + "verify_reprune.py",
        "V.verdict(V.stable(mean)),",
        "V.verdict(True),",
        [P],
    ),
    (
        "reversed pruning order",
        C + "prune.py",
        "order = torch.sort(-tau, stable=True).indices",
        "order = torch.sort(tau, stable=True).indices",
        [P, "tests/circuits/test_prune.py"],
    ),
    (
        "no tau clamp",
        C + "prune.py",
        "tau.clamp_(-1.0, 1.0)",
        "pass",
        ["tests/circuits/test_prune.py"],
    ),
    (
        "means include padding",
        C + "means.py",
        "valid = torch.arange(t)[None, :] < lengths[:, None]",
        "pass",
        ["tests/circuits/test_means.py"],
    ),
    (
        "calibration scale unconstrained",
        "src/sparsecircuits/tasks/metrics.py",
        "params[0].clamp(-30, 30).exp() * d",
        "params[0] * d",
        ["tests/tasks/test_metrics.py"],
    ),
    (
        "negative calibration accepted on load",
        C + "schema.py",
        "scale: float = Field(gt=0, allow_inf_nan=False)",
        "scale: float",
        [P],
    ),
]


def copy_repo(dest: Path) -> None:
    """The tracked files of the repository, plus the compiled kernels, under ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    for name in files.stdout.decode().split("\0"):
        if name:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    for so in (REPO / "src/sparsecircuits/kernels").glob("*.so"):
        shutil.copy2(so, dest / "src/sparsecircuits/kernels" / so.name)


def main(only: list[str]) -> int:
    survivors = 0
    with tempfile.TemporaryDirectory(prefix="sc-mutants-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        env = {**os.environ, "PYTHONPATH": f"{root / 'src'}:{root}", "OMP_NUM_THREADS": "2"}
        for name, f, old, new, tests in MUTANTS:
            if only and name not in only:
                continue
            p = root / f
            text = p.read_text()
            if text.count(old) != 1:
                print(f"{name}: the code to mutate was not found once; update this script")
                survivors += 1
                continue
            try:
                p.write_text(text.replace(old, new))
                r = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                    cwd=root,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=1200,
                )
            finally:
                p.write_text(text)
            failed = sorted(set(re.findall(r"^FAILED (\S+?)(?: - |$)", r.stdout, re.M)))
            survivors += not failed
            names = ", ".join(x.split("/")[-1] for x in failed) or "NONE: the mutant survives"
            print(f"{name}: {len(failed)} failing: {names}", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
