"""Wall time of the default ``normlab compare`` (auto budget: every run trained to its plateau, lr grid
extended until bracketed) against the same grid under the old budget (8 epochs, equal for every batch size,
the lr grid as given), in one run, each into a fresh temporary store.

Both are the real command (``python -m normlab compare --json``) in a subprocess, so process start,
worker spawn and data generation count as a user would see them. Runs alternate old / new when
``--repeats`` > 1 so a busy machine slows both alike. Printed: wall time of each, the ratio new / old, runs
trained, total optimizer steps, and how many runs converged under each budget (the old budget's runs are
judged by the same plateau rule at their end, :mod:`normlab.train.convergence`).

    python benchmarks/compare.py [--repeats 1] [--workers N] [--quick] [--keep-store PATH]

``--keep-store PATH`` keeps the new compare's store (last repeat) at PATH: ``normlab compare --store PATH``
then prints its table and writes its report at once, every run reused from the store.

``--quick`` runs 2 norms (bn, none), 1 seed and a 2-lr grid: a smoke test of the script, not the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def run_compare(extra: list[str], workers: int | None, keep: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "s.sqlite")
        args = [sys.executable, "-m", "normlab", "compare", "--store", store, "--no-report", "--json", *extra]
        if workers is not None:
            args += ["--workers", str(workers)]
        started = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if keep is not None and proc.returncode == 0:
            shutil.copyfile(store, keep)
    if proc.returncode != 0:
        raise SystemExit(f"compare failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    summary = json.loads(proc.stdout)
    steps = sum(s for row in summary["rows"] for o in row["grid"] for s in o["steps"])
    return {"wall": wall, "runs": summary["runs"], "steps": steps, "convergence": summary["convergence"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep-store", default=None, help="keep the new compare's store here")
    args = parser.parse_args()
    common = ["--norms", "bn,none", "--seeds", "1", "--lrs", "0.005,0.02"] if args.quick else []
    # The old budget: 8 epochs for every batch size, the grid as given (no lr search).
    old_flags = [*common, "--epochs", "8", "--lr-extensions", "0"]
    new_flags = common
    old, new = [], []
    for _ in range(args.repeats):
        old.append(run_compare(old_flags, args.workers))
        new.append(run_compare(new_flags, args.workers, args.keep_store))
    for name, runs in (("old (8 epochs, grid as given)", old), ("new (auto budget, bracketed lrs)", new)):
        last = runs[-1]
        walls = [r["wall"] for r in runs]
        print(f"{name}: wall median {statistics.median(walls):.1f} s (min {min(walls):.1f}), "
              f"{last['runs']} runs, {last['steps']} steps, convergence {last['convergence']}")
    ratio = statistics.median(r["wall"] for r in new) / statistics.median(r["wall"] for r in old)
    print(f"new / old wall time: {ratio:.2f}x (goal for the default: new <= 180 s on 2 free cores)")


if __name__ == "__main__":
    main()
