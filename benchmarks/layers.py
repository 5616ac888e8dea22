"""Speed of normlab's layers and AGC against their PyTorch baselines, measured in the same run.

    python benchmarks/layers.py [--repeat 10] [--threads 1] [--tables norms ws agc]

Prints three tables of median and minimum times and their ratios (lower is better):
1. forward+backward (training mode) of every registered norm on a (128, 64, 32, 32) float32 CPU tensor,
   divided by ``nn.BatchNorm2d``'s;
2. ``ScaledStdConv2d`` (3x3, 64 -> 64) divided by ``nn.Conv2d`` + ``nn.BatchNorm2d``, batch 128;
3. ``adaptive_clip_grad_`` on a list of parameters with the shapes of torchvision's resnet50 (built here
   without torchvision), divided by timm's per-parameter loop (``timm.utils.agc.adaptive_clip_grad``).
After table 1, two lines give the floor of per-position noisy BN: its two random fills of x's size
(``normal_`` + ``uniform_``, timed in the same rounds) as a ratio to BN's forward+backward, so
``1 + that ratio`` is the least noisy BN can take whatever it fuses (see layers/noisy_bn.py); and the
generator's raw output alone, 1.5 32-bit words per activation (two draws of float32's 24 random bits),
timed as ``random_`` on an int32 tensor of x's size: no conversion, no arithmetic, the rate of torch's CPU
generator itself.
Timings are interleaved (one run of each candidate per round, in a new random order each round) so that
load changes on a shared machine hit all candidates alike; figures are the median and the minimum over
``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from normlab.layers import ScaledStdConv2d, activation_gamma, create_norm
from normlab.optim import adaptive_clip_grad_


def timm_agc_reference(parameters: list[torch.Tensor], clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """timm's ``adaptive_clip_grad`` (timm/utils/agc.py), reproduced as the baseline."""

    def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
        if x.ndim <= 1:
            return x.norm(2.0)
        return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        p_data, g_data = p.detach(), p.grad.detach()
        max_norm = unitwise_norm(p_data).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50 in ``named_parameters`` order (25,557,032 numbers)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]


def interleaved_times(
    fns: dict[str, Callable[[], None]], repeat: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeat`` calls each, interleaved in a new random order every
    round (a fixed order measurably favours whichever candidate runs first: allocator and cache state)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(repeat):
        names = list(fns)
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return run


def print_table(title: str, baseline: str, times: dict[str, list[float]]) -> None:
    """Median and minimum per candidate and their ratios to the baseline's (the minimum is the figure least
    disturbed by other processes on a shared machine)."""
    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: min(t) for name, t in times.items()}
    print(f"\n{title}")
    print(f"{'candidate':<38}{'median ms':>10}{'ratio':>7}{'min ms':>10}{'ratio':>7}")
    for name in times:
        print(f"{name:<38}{med[name] * 1e3:>10.2f}{med[name] / med[baseline]:>7.2f}"
              f"{low[name] * 1e3:>10.2f}{low[name] / low[baseline]:>7.2f}")


def bench_norms(repeat: int) -> None:
    x = torch.randn(128, 64, 32, 32, requires_grad=True)
    grad = torch.randn_like(x)
    layers: dict[str, nn.Module] = {"nn.BatchNorm2d (baseline)": nn.BatchNorm2d(64)}
    for name in ("bn", "ghost_bn", "batch_renorm", "noisy_bn", "evalnorm", "frozen_bn", "noise", "gn", "ln",
                 "in"):
        layers[name] = create_norm(name, 64, dims=2)
    # noisy_bn is per-position by default (Santurkar et al. Alg. 1: every activation its own m, s)
    layers["noisy_bn(per_position=False)"] = create_norm("noisy_bn", 64, per_position=False)
    layers["noisy_bn(noise_after_affine=False)"] = create_norm("noisy_bn", 64, noise_after_affine=False)
    layers["ghost_bn(virtual_batch_size=16)"] = create_norm("ghost_bn", 64, virtual_batch_size=16)
    layers["evalnorm (eval, sample_weight=0.25)"] = create_norm("evalnorm", 64, sample_weight=0.25).eval()
    fns = {name: forward_backward(m, x, grad) for name, m in layers.items()}
    # Not a layer: the floor of per-position noisy BN, the two random tensors Alg. 1 needs per step
    # (one normal_ and one uniform_ fill of x's size), whatever the layer does around them.
    buffer = torch.empty_like(x)
    fns[FLOOR] = lambda: (buffer.normal_(), buffer.uniform_())
    words = torch.empty(x.shape, dtype=torch.int32)
    fns[WORDS] = words.random_
    times = interleaved_times(fns, repeat)
    print_table("Norm layers, forward+backward, (128, 64, 32, 32) float32, ratio to nn.BatchNorm2d",
                "nn.BatchNorm2d (baseline)", times)
    print_noise_floor(times)


FLOOR = "(floor) normal_ + uniform_ fills of x"
WORDS = "(floor) random_ int32 words, x's size"


def print_noise_floor(times: dict[str, list[float]]) -> None:
    """Per-position noisy BN (Alg. 1) needs two random tensors of x's size per step, so its time is at least
    BN's plus those two fills: print that floor, its ratio to BN, per round then median (each round's fills
    and BN were timed next to each other), and what is left of noisy BN once the fills are taken off.
    These are measured figures, not a target: the earlier 1.3x-BN goal is withdrawn (issue 26: the
    generator's raw output alone is ~0.45-0.5x BN, and no hand-written RNG kernel is wanted)."""
    bn, fills, noisy = times["nn.BatchNorm2d (baseline)"], times[FLOOR], times["noisy_bn"]
    fill_ratio = statistics.median(f / b for f, b in zip(fills, bn, strict=True))
    noisy_ratio = statistics.median(n / b for n, b in zip(noisy, bn, strict=True))
    print(f"\nnoisy_bn (per position) floor: the two random fills alone take {fill_ratio:.2f}x BN's "
          f"forward+backward (median over rounds of fills/BN), so noisy_bn >= {1 + fill_ratio:.2f}x BN "
          f"whatever it fuses; measured {noisy_ratio:.2f}x, {noisy_ratio - fill_ratio:.2f}x without the "
          "fills.")
    words = 1.5 * statistics.median(w / b for w, b in zip(times[WORDS], bn, strict=True))
    print(f"  the generator's raw output alone, 1.5 32-bit words per activation (two 24-bit draws), takes "
          f"{words:.2f}x BN's forward+backward: noisy_bn >= {1 + words:.2f}x BN even if turning bits into "
          "noise and applying it cost nothing.")


def bench_ws_conv(repeat: int) -> None:
    x = torch.randn(128, 64, 16, 16, requires_grad=True)
    grad = torch.randn(128, 64, 16, 16)
    conv_bn = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64))
    ws = ScaledStdConv2d(64, 64, 3, padding=1, gamma=activation_gamma("relu"))
    fns = {"Conv2d + BatchNorm2d (baseline)": forward_backward(conv_bn, x, grad),
           "ScaledStdConv2d": forward_backward(ws, x, grad)}
    print_table("Scaled WS conv 3x3 64->64, forward+backward, (128, 64, 16, 16) float32",
                "Conv2d + BatchNorm2d (baseline)", interleaved_times(fns, repeat))


def bench_agc(repeat: int) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen) * 0.05) for s in resnet50_shapes()]
    grads = [torch.randn(s, generator=gen) * 0.01 for s in resnet50_shapes()]

    def with_fresh_grads(fn: Callable[[list[torch.Tensor]], None]) -> Callable[[], None]:
        def run() -> None:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            fn(params)

        return run

    def reset_only(ps: list[torch.Tensor]) -> None:
        pass

    times = interleaved_times({"grad reset only": with_fresh_grads(reset_only),
                               "timm per-parameter loop (baseline)": with_fresh_grads(timm_agc_reference),
                               "adaptive_clip_grad_": with_fresh_grads(adaptive_clip_grad_)}, repeat)
    # The gradient copies are the same for both candidates; subtract each round's copy time to compare the
    # clipping alone.
    reset = times.pop("grad reset only")
    times = {name: [max(t - r, 1e-9) for t, r in zip(ts, reset, strict=True)] for name, ts in times.items()}
    print(f"\n(resnet50: {len(params)} tensors, {sum(p.numel() for p in params):,} numbers; "
          f"gradient reset, median {statistics.median(reset) * 1e3:.2f} ms, subtracted)")
    print_table("AGC on resnet50-shaped parameters, ratio to timm's loop",
                "timm per-parameter loop (baseline)", times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="timed rounds per candidate (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--tables", nargs="+", choices=("norms", "ws", "agc"), default=["norms", "ws", "agc"],
                        help="which tables to time (default: all three)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeat} rounds")
    tables = {"norms": bench_norms, "ws": bench_ws_conv, "agc": bench_agc}
    for name in args.tables:
        tables[name](args.repeat)


if __name__ == "__main__":
    main()
