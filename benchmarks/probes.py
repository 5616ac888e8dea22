"""Cost of every probe in units of one training step, and the overhead of the default ProbeSchedule.

    python benchmarks/probes.py [--repeat 5] [--threads 1] [--steps 400]

Model: a pre-activation ResNet-8 with BatchNorm (``create_model("resnet", depth=8)``, 1-D, 1 x 40 input,
10 classes), batch 64, SGD with momentum, CPU float32. A training step is zero_grad + forward + loss +
backward + optimizer step. Table 1 gives each probe's median time over ``--repeat`` rounds divided by the
median training step; the step is timed in the same rounds, interleaved round-robin with the probes so that
load changes on a shared machine hit all alike. Goals: landscape with k points <= 1.1 (k + 1) steps, ICS over
L layers <= L + 1 steps.

Table 2 trains the same config for ``--steps`` steps with and without ``ProbeSchedule()`` (the default
probes) through ``normlab.train.Trainer`` and divides the wall times of ``fit()`` (goal <= 1.25), again
interleaved over ``--repeat`` // 2 + 1 rounds; the median and the minimum (the least disturbed run on a
shared machine) are both reported, and the within-run ratio wall / (wall - time inside the probes) of the
instrumented runs, which load changes between runs cannot skew.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from normlab import probes
from normlab.models import create_model
from normlab.probes._layers import weight_layers


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def probe_costs(repeat: int) -> tuple[float, list[tuple[str, float, str]]]:
    torch.manual_seed(0)
    model = create_model("resnet", norm="bn", in_channels=1, dims=1, num_classes=10, depth=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))
    # The probes measure a copy that keeps training, so weights and optimizer state are realistic.
    train_model, train_opt = copy.deepcopy((model, optimizer))

    def step() -> None:
        train_opt.zero_grad(set_to_none=True)
        F.cross_entropy(train_model(x), y).backward()
        train_opt.step()

    for _ in range(3):
        step()  # warm-up, and momentum buffers exist for ICS
    model.load_state_dict(train_model.state_dict())
    optimizer.load_state_dict(train_opt.state_dict())
    num_layers = len(weight_layers(model))
    k = 8
    candidates: dict[str, tuple[Callable[[], object], str]] = {
        "train_eval_gap": (lambda: probes.train_eval_gap(model, x, y, batch_size=64), "-"),
        "activation_stats": (lambda: probes.activation_stats(model, x), "-"),
        f"landscape (k={k})": (
            lambda: probes.landscape(model, (x, y), optimizer=optimizer, num_points=k),
            f"<= {1.1 * (k + 1):.1f}",
        ),
        f"ics (L={num_layers})": (lambda: probes.ics(model, optimizer, (x, y)), f"<= {num_layers + 1}"),
        "hessian (20 Lanczos + 20 Hutchinson)": (
            lambda: probes.hessian(model, (x, y), max_iter=20, trace_samples=20), "-"
        ),
        "signal_propagation": (lambda: probes.signal_propagation(model, x), "-"),
        "example_similarity": (lambda: probes.example_similarity(model, x), "-"),
        "residual_scale": (lambda: probes.residual_scale(model, x), "-"),
        "batch_dependence (4 examples)": (lambda: probes.batch_dependence(model, x, num_examples=4), "-"),
    }
    for fn, _ in candidates.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in candidates}
    steps: list[float] = []
    for _ in range(repeat):
        steps += [_timed(step) for _ in range(3)]
        for name, (fn, _) in candidates.items():
            times[name].append(_timed(fn))
    step_time = statistics.median(steps)
    rows = [(name, statistics.median(times[name]), goal) for name, (_, goal) in candidates.items()]
    return step_time, rows


class _TimedSchedule:
    """The default ProbeSchedule, adding up the time spent inside it."""

    def __init__(self) -> None:
        self.schedule = probes.ProbeSchedule()
        self.every_n_steps = self.schedule.every_n_steps
        self.seconds = 0.0

    def __call__(self, ctx) -> None:
        start = time.perf_counter()
        self.schedule(ctx)
        self.seconds += time.perf_counter() - start


def schedule_overhead(steps: int, rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Wall times of ``fit()`` without and with the schedule, and the within-run ratio
    wall / (wall - time in probes) of each instrumented run (insensitive to load changes between runs)."""
    from normlab.train import TrainConfig, Trainer

    config = TrainConfig(model="resnet", depth=8, norm="bn", dataset="synthetic", batch_size=64, steps=steps,
                         log_every=50, eval_train_samples=256)
    plain, instrumented, within = [], [], []
    for _ in range(rounds):
        trainer = Trainer(config, progress=False)
        plain.append(_timed(trainer.fit))
        trainer = Trainer(config, progress=False)
        timed = _TimedSchedule()
        trainer.add_callback(timed, timed.every_n_steps)
        instrumented.append(_timed(trainer.fit))
        within.append(instrumented[-1] / (instrumented[-1] - timed.seconds))
    return plain, instrumented, within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    step_time, rows = probe_costs(args.repeat)
    print(f"one training step (ResNet-8 BN, batch 64, SGD momentum): {1e3 * step_time:.1f} ms (median)")
    print(f"{'probe':<40}{'ms':>10}{'steps':>10}  goal")
    for name, seconds, goal in rows:
        print(f"{name:<40}{1e3 * seconds:>10.1f}{seconds / step_time:>10.2f}  {goal}")

    plain, instrumented, within = schedule_overhead(args.steps, args.repeat // 2 + 1)
    print()
    print(f"training run, {args.steps} steps, {probes.ProbeSchedule()!r}")
    print(f"{'':<40}{'median s':>10}{'min s':>10}")
    for label, times in (("uninstrumented", plain), ("with default ProbeSchedule", instrumented)):
        print(f"{label:<40}{statistics.median(times):>10.2f}{min(times):>10.2f}")
    ratio_median = statistics.median(instrumented) / statistics.median(plain)
    print(f"{'ratio (goal <= 1.25)':<40}{ratio_median:>10.3f}{min(instrumented) / min(plain):>10.3f}")
    label = "within-run ratio wall / (wall - probes)"
    print(f"{label:<40}{statistics.median(within):>10.3f}{min(within):>10.3f}")


if __name__ == "__main__":
    main()
