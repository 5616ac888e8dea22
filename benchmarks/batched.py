"""Batched runs (normlab.batched) against the same runs one by one, measured in the same run.

    python benchmarks/batched.py [--steps 300] [--rounds 3] [--members 9] [--modes auto,grouped,vmap,loop]
    python benchmarks/batched.py --steps 3000 --rounds 1 --modes auto,grouped   # a compare run's length
    python benchmarks/batched.py --grid [--epochs 8] [--subset N] [--no-steps]   # + the compare grid, long

1. Time per optimizer step of K (default 9) members trained as one stacked model, divided by the time of
   K separate runs' steps (each run's ``steps_per_s``, which excludes evaluation), for the MNIST-1D CNN
   with BN and GN at batch 16 and 128 (issue 12's goal: <= 0.25 at batch 16), once with the engine's own
   choice of forward mode (``auto``: the first the model allows, a fixed rule) and once per mode forced
   (``grouped``: member-major activations through ordinary kernels, :mod:`normlab.batched.grouped`;
   ``vmap``; ``loop``: member by member).
   Members differ in seed and lr as a compare grid's do. Rounds interleave batched and separate, so
   machine load hits both alike.
2. ``--grid``: wall time of the default ``normlab compare`` grid (4 norms x 2 batch sizes x 3 lrs x 3 seeds
   = 72 runs, ``--epochs`` each) batched / unbatched on 1 worker, and unbatched on 2 workers / 1 worker
   (goal <= 0.6), each through ``run_sweep`` into a fresh store; one worker uses every usable core, as
   ``normlab compare --workers 1`` does.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from normlab.batched import train_batched
from normlab.train import TrainConfig, Trainer


def member_configs(norm: str, batch_size: int, members: int, steps: int) -> list[TrainConfig]:
    base = TrainConfig(norm=norm, batch_size=batch_size, steps=steps, log_every=10, eval_train_samples=0)
    lrs = [0.05, 0.2, 0.8]
    return [base.replace(seed=i // len(lrs), lr=lrs[i % len(lrs)] * batch_size / 128) for i in range(members)]


MODES = ("auto", "grouped", "vmap", "loop")


def seconds_per_step_batched(configs: list[TrainConfig], mode: str = "auto") -> float:
    results = train_batched(configs, modes=None if mode == "auto" else [mode])
    return 1.0 / results[0].steps_per_s


def seconds_per_step_separate(configs: list[TrainConfig]) -> float:
    return sum(1.0 / Trainer(c, progress=False).fit().steps_per_s for c in configs)


def step_ratios(
    steps: int,
    rounds: int,
    members: int,
    modes: tuple[str, ...] = MODES,
    batch_sizes: tuple[int, ...] = (16, 128),
) -> None:
    print(f"time per optimizer step, {members} members batched / {members} separate runs "
          f"(cnn on mnist1d, {steps} steps, {rounds} rounds, {torch.get_num_threads()} thread(s))")
    print(f"{'norm':6} {'batch':>5} {'mode':>8} {'batched ms':>11} {'separate ms':>12} "
          f"{'ratio (median)':>15} {'min':>6}")
    for norm in ("bn", "gn"):
        for batch_size in batch_sizes:
            configs = member_configs(norm, batch_size, members, steps)
            batched: dict[str, list[float]] = {m: [] for m in modes}
            separate, ratios = [], {m: [] for m in modes}
            for _ in range(rounds):
                s = seconds_per_step_separate(configs)
                separate.append(s)
                for mode in modes:
                    b = seconds_per_step_batched(configs, mode)
                    batched[mode].append(b)
                    ratios[mode].append(b / s)
            for mode in modes:
                print(f"{norm:6} {batch_size:5d} {mode:>8} {1e3 * statistics.median(batched[mode]):11.2f} "
                      f"{1e3 * statistics.median(separate):12.2f} {statistics.median(ratios[mode]):15.3f} "
                      f"{min(ratios[mode]):6.3f}")


def grid_wall(epochs: int, subset: int | None) -> None:
    from normlab.cli.compare_cmd import COMPARE_DEFAULTS
    from normlab.store import Store
    from normlab.sweep import InlineExecutor, LocalPoolExecutor, compare_configs, run_sweep

    configs = compare_configs(
        model="cnn",
        norms=COMPARE_DEFAULTS["norms"].split(","),
        batch_sizes=[int(b) for b in COMPARE_DEFAULTS["batch_sizes"].split(",")],
        seeds=list(range(COMPARE_DEFAULTS["seeds"])),
        base_lrs=[float(v) for v in COMPARE_DEFAULTS["lrs"].split(",")],
        agc_clip=COMPARE_DEFAULTS["agc_clip"],
        epochs=epochs,
        subset=subset,
    )
    from normlab.train.threads import fit_threads

    threads = torch.get_num_threads()
    walls = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, make, batch in (
            ("1 worker, batched", InlineExecutor, True),
            ("1 worker, one by one", InlineExecutor, False),
            ("2 workers, batched", lambda: LocalPoolExecutor(2), True),
            ("2 workers, one by one", lambda: LocalPoolExecutor(2), False),
        ):
            executor = make()
            # One worker may use every core (as `normlab compare --workers 1` does); pool workers set their
            # own (cores // workers).
            torch.set_num_threads(fit_threads(1) if label.startswith("1 worker") else threads)
            started = time.perf_counter()
            with Store(Path(folder) / f"{len(walls)}.sqlite") as store:
                run_sweep(configs, store, executor, batch=batch)
            walls[label] = time.perf_counter() - started
            getattr(executor, "shutdown", lambda: None)()
            print(f"{label:24} {walls[label]:8.1f} s")
    torch.set_num_threads(threads)
    one, two = walls["1 worker, one by one"], walls["2 workers, one by one"]
    print(f"compare grid ({len(configs)} runs, {epochs} epochs): batched / one by one, 1 worker: "
          f"{walls['1 worker, batched'] / one:.3f}; 2 workers / 1 worker (one by one): {two / one:.3f}; "
          f"(batched): {walls['2 workers, batched'] / walls['1 worker, batched']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES), help=f"modes to time, of {','.join(MODES)}")
    parser.add_argument("--batch-sizes", default="16,128")
    parser.add_argument("--grid", action="store_true", help="also time the default compare grid (long)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each grid run")
    parser.add_argument("--subset", type=int, default=None, help="grid runs on this many training examples")
    parser.add_argument("--no-steps", action="store_true", help="skip the step-time table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_steps:
        modes = tuple(args.modes.split(","))
        if unknown := set(modes) - set(MODES):
            parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; allowed: {', '.join(MODES)}")
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
        step_ratios(args.steps, args.rounds, args.members, modes, batch_sizes)
    if args.grid:
        grid_wall(args.epochs, args.subset)


if __name__ == "__main__":
    main()
