"""``torch.compile`` against eager for a training step, and the study VGG's rate against the machine's GEMM.

    python benchmarks/compile.py [--models cnn,vgg,resnet20] [--steps 20] [--rounds 3] [--run-steps 3000]

For each model (MNIST-1D CNN on (1, 40) signals; the study VGG at width 1 and resnet20 on (3, 32, 32)
images; batch ``--batch``, default 128) one training step is forward, cross-entropy, backward and an SGD
+ momentum update. Eager and compiled (``torch.compile`` of the model, as ``TrainConfig.compile`` does)
steps are timed in interleaved rounds of ``--steps`` steps (median over ``--rounds``). Printed:
- compiled / eager step time with compile time excluded;
- the same with the compile time (first compiled steps minus steady ones) spread over a run of
  ``--run-steps`` steps: below 1 only when compiling pays for such a run;
- the VGG step's achieved GFLOP/s (FLOPs of forward + backward counted by
  ``torch.utils.flop_counter.FlopCounterMode``) divided by the rate of a 2048 x 2048 ``torch.mm`` timed
  in the same run.
``TrainConfig.compile`` stays off by default unless the included ratio is below 1 for a model here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from normlab.models import create_model

MODELS = {
    "cnn": dict(in_channels=1, dims=1, input_size=40, shape=(1, 40)),
    "vgg": dict(in_channels=3, dims=2, shape=(3, 32, 32), width=1),
    "resnet20": dict(in_channels=3, dims=2, shape=(3, 32, 32)),
}


def build(name: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    spec = dict(MODELS[name])
    shape = spec.pop("shape")
    width = spec.pop("width", None)
    options = {"input_size": spec.pop("input_size")} if "input_size" in spec else {}
    torch.manual_seed(0)
    model = create_model(name, norm="bn", num_classes=10, width=width, depth=None, norm_options={},
                         **spec, **options)
    return model, torch.randn(batch, *shape), torch.randint(0, 10, (batch,))


def step_fn(
    model: torch.nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)

    def step() -> None:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(fn: Callable[[], None], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def gemm_rate(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n**3 / min(timed(lambda: torch.mm(a, b), 1) for _ in range(repeat))


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def compare(name: str, batch: int, steps: int, rounds: int, run_steps: int) -> dict[str, float]:
    model, x, y = build(name, batch)
    eager = step_fn(model, model, x, y)
    compiled_model, _, _ = build(name, batch)
    compiled = step_fn(compiled_model, torch.compile(compiled_model), x, y)
    eager()
    started = time.perf_counter()
    compiled()
    compiled()
    first_two = time.perf_counter() - started
    eager_times, compiled_times = [], []
    for _ in range(rounds):
        eager_times.append(timed(eager, steps))
        compiled_times.append(timed(compiled, steps))
    te, tc = statistics.median(eager_times), statistics.median(compiled_times)
    compile_time = max(first_two - 2 * tc, 0.0)
    return {
        "eager_ms": 1e3 * te,
        "compiled_ms": 1e3 * tc,
        "compile_s": compile_time,
        "excluded": tc / te,
        "included": (compile_time + run_steps * tc) / (run_steps * te),
        "flops": step_flops(model, x, y) if name == "vgg" else 0,
        "eager_s": te,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="cnn,vgg,resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--run-steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gemm = gemm_rate()
    threads = torch.get_num_threads()
    print(f"batch {args.batch}, {threads} thread(s); torch.mm 2048^2: {gemm / 1e9:.1f} GFLOP/s")
    print(f"{'model':9} {'eager ms':>9} {'compiled ms':>12} {'compile s':>10} {'excl.':>7} "
          f"{'incl. ' + str(args.run_steps):>11}")
    for name in args.models.split(","):
        r = compare(name, args.batch, args.steps, args.rounds, args.run_steps)
        print(f"{name:9} {r['eager_ms']:9.2f} {r['compiled_ms']:12.2f} {r['compile_s']:10.1f} "
              f"{r['excluded']:7.3f} {r['included']:11.3f}")
        if r["flops"]:
            rate = r["flops"] / r["eager_s"]
            print(f"  vgg step: {r['flops'] / 1e9:.2f} GFLOP, {rate / 1e9:.1f} GFLOP/s eager = "
                  f"{rate / gemm:.2f} of the GEMM rate")


if __name__ == "__main__":
    main()
