"""Cost of a full cross-backend check of resnet20 relative to one eager forward pass.

Runs ``crossval_model`` on resnet20 (BN, eval mode, every layer's output recorded) with the five
backends (numpy oracle, torch, torch-compile, onnxruntime, jax) and divides each backend's wall time, and
the total, by the median time of one eager PyTorch forward pass of the same model on the same batch, all
measured in this run. Compile and export times are part of their backends' times (that is what a check
costs). Inductor keeps an on-disk cache, so a second run compiles faster; for cold-compile figures run
with ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``.
Usage: ``python benchmarks/crossval.py [--batch 8] [--size 32] [--threads 1] [--backends ...]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from normlab.crossval import crossval_model, trace_model
from normlab.crossval.state import randomize_norm_state
from normlab.models import create_model


def eager_forward_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    with torch.no_grad():
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backends", default="numpy,torch,torch-compile,onnxruntime,jax")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = randomize_norm_state(
        create_model("resnet20", norm="bn", num_classes=10, in_channels=3, dims=2)
    ).eval()
    x = np.random.default_rng(0).normal(size=(args.batch, 3, args.size, args.size)).astype(np.float32)

    eager = eager_forward_seconds(model, torch.from_numpy(x))
    start = time.perf_counter()
    graph = trace_model(model, x)
    trace = time.perf_counter() - start
    start = time.perf_counter()
    report = crossval_model(graph, x, args.backends, name="resnet20")
    total = time.perf_counter() - start + trace

    print(
        f"resnet20, batch {args.batch}x3x{args.size}x{args.size}, {args.threads} thread(s), "
        f"torch {torch.__version__}"
    )
    print(f"baseline: one eager forward = {eager * 1e3:.2f} ms (median of 20)")
    print(f"{'step':<16}{'seconds':>10}{'x eager fwd':>14}  notes")
    print(f"{'trace':<16}{trace:>10.3f}{trace / eager:>14.1f}")
    for s in report.backends:
        notes = "; ".join([s.status, *([s.message] if s.message else []), *s.notes])
        print(f"{s.name:<16}{s.seconds:>10.3f}{s.seconds / eager:>14.1f}  {notes}")
    print(
        f"{'total check':<16}{total:>10.3f}{total / eager:>14.1f}  ({len(graph.recorded)} layers compared, "
        f"{len(report.pairs)} pairs, inconsistent: {report.inconsistent})"
    )
    worst = max(report.pairs, key=lambda p: p.max_abs)
    print(f"largest pairwise max |O1-O2|: {worst.max_abs:.2e} ({'|'.join(worst.backends)})")


if __name__ == "__main__":
    main()
