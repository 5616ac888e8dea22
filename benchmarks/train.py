"""Training-step overhead of normlab's Trainer against a bare hand-written PyTorch loop, and the wall time
of ``normlab compare``.

Both loops train the same model (the MNIST-1D ``cnn``, built by the same seed) on the same in-memory data
with SGD + momentum; the bare loop shuffles with ``torch.randperm`` and reads ``loss.item()`` only every 10
steps, as a hand-written loop would. Repetitions alternate bare / normlab so a busy machine slows both
alike. Each loop is timed over ``steps`` and ``2 * steps`` steps and the per-step time is the difference
divided by ``steps``: the marginal cost of a step, free of fixed costs (normlab's final evaluation and
train/eval-gap probe, which the bare loop does not do). The table reports the best repetition (min,
timeit's convention: the least disturbed one) and the median, and the ratio ``normlab time per step /
bare time per step`` of each (goal <= 1.05).

    python benchmarks/train.py [--steps 400] [--repeats 5] [--threads 1] [--compare]

``--compare`` also runs the default ``normlab compare`` into a temporary store and prints its wall time and
number of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.nn import functional as F

from normlab.data import load_dataset
from normlab.models import create_model
from normlab.train import TrainConfig, Trainer

# CPU time of this process: with one torch thread it is the loop's own time, and it is far less disturbed
# than wall time when other jobs share the machine. --wall switches to wall-clock time.
_clock = time.process_time


def bare_loop(data, batch_size: int, steps: int, lr: float, seed: int) -> float:
    """Seconds per step of a plain PyTorch loop: index, forward, cross-entropy, backward, SGD step."""
    torch.manual_seed(seed)
    model = create_model("cnn", norm="bn", num_classes=10, in_channels=1, dims=1, input_size=40)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    x, y = data.x_train, data.y_train
    per_epoch = len(x) // batch_size
    perm = torch.randperm(len(x))
    model.train()
    start = _clock()
    for step in range(steps):
        k = step % per_epoch
        if k == 0:
            perm = torch.randperm(len(x))
        idx = perm[k * batch_size : (k + 1) * batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            loss.item()
    return (_clock() - start) / steps


def normlab_loop(batch_size: int, steps: int, lr: float, seed: int) -> float:
    """Seconds of the whole ``Trainer.fit`` timed from outside, divided by ``steps``: the loop with its lr
    schedule, divergence check, logging every 10 steps (grad norm, accuracy) and the final evaluation."""
    config = TrainConfig(
        batch_size=batch_size, steps=steps, lr=lr, seed=seed, schedule="cosine", eval_train_samples=0
    )
    trainer = Trainer(config, progress=False)
    start = _clock()
    trainer.fit()
    return (_clock() - start) / steps


def run_compare() -> tuple[float, int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "normlab", "compare", "--store", os.path.join(tmp, "r.sqlite"), "--json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
    report = json.loads(proc.stdout)
    return wall, report["runs"], report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", default="16,128")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--wall", action="store_true", help="time with the wall clock instead of CPU time")
    args = parser.parse_args()
    global _clock
    if args.wall:
        _clock = time.perf_counter
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist1d")
    clock = "wall time" if args.wall else "CPU time"
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps x{args.repeats}, {clock}")
    columns = [("batch", 6), ("bare ms/step", 13), ("normlab ms/step", 16)]
    columns += [("ratio (min)", 12), ("ratio (median)", 15)]
    print(" ".join(f"{name:>{width}}" for name, width in columns))
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        lr = 0.1 * batch_size / 128
        bare, ours = [], []
        normlab_loop(batch_size, 20, lr, 0)  # warm-up (imports, allocator)
        n = args.steps
        for r in range(args.repeats):
            bare.append(2 * bare_loop(data, batch_size, 2 * n, lr, r) - bare_loop(data, batch_size, n, lr, r))
            ours.append(2 * normlab_loop(batch_size, 2 * n, lr, r) - normlab_loop(batch_size, n, lr, r))
        b, o = min(bare), min(ours)
        ratio_median = statistics.median(ours) / statistics.median(bare)
        print(f"{batch_size:>6} {1e3 * b:>13.3f} {1e3 * o:>16.3f} {o / b:>12.3f} {ratio_median:>15.3f}")
    if args.compare:
        wall, runs, report = run_compare()
        print(f"\nnormlab compare (defaults): {runs} runs in {wall:.1f} s wall ({wall / runs:.2f} s per run)")
        for row in report["rows"]:
            accs = row["accuracies"]
            print(
                f"  {row['norm']:>5} bs {row['batch_size']:>4}: test acc {100 * row['test_acc_mean']:.1f} "
                f"± {100 * row['test_acc_ci95']:.1f}% at lr {row['best_lr']}, max stable lr "
                f"{row['largest_stable_lr']}, {row['steps_per_s']:.0f} steps/s, gap "
                f"{100 * row['train_eval_gap']:+.1f} pts, seeds {[round(a, 3) for a in accs]}"
            )


if __name__ == "__main__":
    main()
