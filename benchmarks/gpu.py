"""Training steps on a GPU: achieved FLOP/s of VGG-16 and a ResNet-50 against a bf16 GEMM timed in the
same run, and BN vs GN vs LN vs NF per step.

    python benchmarks/gpu.py [--batch 128] [--steps 20] [--rounds 3] [--json out.json]
    python benchmarks/gpu.py --dry-run    # the code paths on the CPU at batch 2 (no figure)

On CUDA only (it says so and exits 2 elsewhere; ``--dry-run`` checks the script on the CPU). One training
step is forward, cross-entropy, backward and an SGD + momentum update, under
``torch.autocast("cuda", dtype=torch.bfloat16)`` with the model and input in ``channels_last``. Models:
normlab's VGG-16 (Santurkar et al.'s CIFAR net, 3 x 32 x 32, width 1) and a ResNet-50 (torchvision's
``resnet50``, 3 x 224 x 224, when torchvision is importable; else skipped with the reason). Each step time
is the median of ``--rounds`` blocks of ``--steps`` steps between CUDA synchronizations, after warm-up.
FLOPs of one step (forward + backward) are counted by ``torch.utils.flop_counter.FlopCounterMode``; the
ratio achieved / GEMM uses a bf16 8192^2 ``torch.mm`` timed in the same run (the card's reachable dense
rate, not its datasheet figure).

The per-norm table times the same VGG-16 and a ResNet-20 built by ``normlab.models.create_model`` with
``norm`` = bn, gn, ln and nf (NF: Scaled WS convs + AGC 0.01 in the step), as ratios against BN measured in
the same run, interleaved block by block. Nothing here is estimated: the figures are what this card did.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from normlab.models import create_model
from normlab.optim import adaptive_clip_grad_, agc_parameters

DEVICE = "cuda"  # "cpu" for --dry-run only


def cuda_time(fn: Callable[[], None], iterations: int) -> float:
    """Seconds per call of ``fn``, ``iterations`` calls between two synchronizations (CUDA events)."""
    if DEVICE == "cpu":
        started = time.perf_counter()
        for _ in range(iterations):
            fn()
        return (time.perf_counter() - started) / iterations
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iterations


def gemm_rate(n: int = 8192, repeat: int = 5) -> float:
    """FLOP/s of a bf16 ``n x n`` matmul: the best of ``repeat`` blocks of 10."""
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    cuda_time(lambda: torch.mm(a, b), 3)
    return 2 * n**3 / min(cuda_time(lambda: torch.mm(a, b), 10) for _ in range(repeat))


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              agc: float | None) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    clipped = agc_parameters(model)  # every weight but the final classifier's (science.md section 4)

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if agc is not None:
            adaptive_clip_grad_(clipped, agc)
        optimizer.step()

    return step


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.autocast(DEVICE, dtype=torch.bfloat16):
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def batch_for(shape: tuple[int, ...], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch, *shape, device=DEVICE).to(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), device=DEVICE)


def normlab_model(name: str, norm: str, shape: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    width = 1 if name == "vgg" else None
    model = create_model(name, norm=norm, num_classes=10, in_channels=shape[0], dims=2, width=width,
                         depth=None, norm_options={})
    return model.to(DEVICE, memory_format=torch.channels_last)


def resnet50() -> torch.nn.Module | str:
    try:
        from torchvision.models import resnet50 as build
    except Exception as exc:  # torchvision missing or broken beside this torch
        return f"skipped: torchvision is not importable ({exc})"
    torch.manual_seed(0)
    return build(num_classes=10).to(DEVICE, memory_format=torch.channels_last)


def rate_row(name: str, model: torch.nn.Module, shape: tuple[int, ...], args, gemm: float) -> dict:
    x, y = batch_for(shape, args.batch)
    step = make_step(model, x, y, agc=None)
    cuda_time(step, 3)  # warm-up: cuDNN autotuning, allocator
    seconds = statistics.median(cuda_time(step, args.steps) for _ in range(args.rounds))
    flops = step_flops(model, x, y)
    return {"model": name, "input": list(shape), "batch": args.batch, "step_ms": 1e3 * seconds,
            "gflop_per_step": flops / 1e9, "tflops": flops / seconds / 1e12,
            "of_gemm": flops / seconds / gemm}


def norm_rows(name: str, shape: tuple[int, ...], args) -> list[dict]:
    """Step time per norm, interleaved block by block, as ratios to BN (median over rounds)."""
    x, y = batch_for(shape, args.batch)
    steps = {norm: make_step(normlab_model(name, norm, shape), x, y, 0.01 if norm == "nf" else None)
             for norm in ("bn", "gn", "ln", "nf")}
    for step in steps.values():
        cuda_time(step, 3)
    times: dict[str, list[float]] = {norm: [] for norm in steps}
    for _ in range(args.rounds):
        for norm, step in steps.items():
            times[norm].append(cuda_time(step, args.steps))
    bn = statistics.median(times["bn"])
    return [{"model": name, "norm": norm, "step_ms": 1e3 * statistics.median(t),
             "vs_bn": statistics.median(t) / bn} for norm, t in times.items()]


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--dry-run", action="store_true", help="run every code path on the CPU at batch 2")
    args = parser.parse_args()
    if args.dry_run:
        DEVICE, args.batch, args.steps, args.rounds = "cpu", 2, 1, 1
        card, gemm = "CPU dry run (not a GPU figure)", gemm_rate(256, 1)
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: CUDA is not available here; run it on a GPU machine", file=sys.stderr)
        sys.exit(2)
    else:
        torch.backends.cudnn.benchmark = True
        card, gemm = torch.cuda.get_device_name(0), gemm_rate()
    print(f"{card}, torch {torch.__version__}, CUDA {torch.version.cuda}; bf16 mm: {gemm / 1e12:.3f} TFLOP/s")
    rows = [rate_row("vgg16", normlab_model("vgg", "bn", (3, 32, 32)), (3, 32, 32), args, gemm)]
    big = resnet50()
    if isinstance(big, str):
        print(f"resnet50 {big}")
    else:
        rows.append(rate_row("resnet50", big, (3, 224, 224), args, gemm))
    print(f"{'model':9} {'input':>11} {'step ms':>8} {'GFLOP':>8} {'TFLOP/s':>8} {'of GEMM':>8}")
    for r in rows:
        size = "x".join(map(str, r["input"]))
        print(f"{r['model']:9} {size:>11} {r['step_ms']:8.2f} {r['gflop_per_step']:8.1f} {r['tflops']:8.1f} "
              f"{r['of_gemm']:8.3f}")
    norms = norm_rows("vgg", (3, 32, 32), args) + norm_rows("resnet20", (3, 32, 32), args)
    print(f"{'model':9} {'norm':>4} {'step ms':>8} {'vs BN':>6}")
    for r in norms:
        print(f"{r['model']:9} {r['norm']:>4} {r['step_ms']:8.2f} {r['vs_bn']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "gemm_tflops": gemm / 1e12, "rates": rows,
                       "norms": norms}, f, indent=2)


if __name__ == "__main__":
    main()
