"""Is ``BatchIterator`` ever the bottleneck? Per-batch cost of serving batches against a model step, measured
in the same run.

    python benchmarks/data.py [--examples 10000] [--batch 128] [--repeat 5] [--threads 1]

On CIFAR-sized fake data (N, 3, 32, 32) float32 it times, per batch of ``--batch``:
1. ``BatchIterator.next_batch()`` without augmentation, with ``crop_flip``, and with ``shift`` on
   (N, 1, 40) MNIST-1D-sized signals;
2. the reference loop the vectorized augmentation replaces: per-example ``F.pad`` + slice + ``flip``;
3. a forward pass (eval mode, no grad) of ``resnet20`` and of the MNIST-1D ``cnn`` on one batch.
and prints the ratios to the forward pass of the matching model (lower is better; << 1 means the data
pipeline is not the bottleneck). Medians over ``--repeat`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from normlab.data import BatchIterator
from normlab.models import create_model


def per_example_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The loop ``crop_flip`` replaces: pad, crop and maybe flip one example at a time."""
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    for i in range(len(x)):
        top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
        crop = F.pad(x[i], (padding,) * 4)[:, top : top + h, left : left + w]
        out[i] = crop.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else crop
    return out


def time_batches(fn: Callable[[], object], batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, labels = torch.randn(args.examples, 3, 32, 32), torch.randint(0, 10, (args.examples,))
    signals = torch.randn(args.examples, 1, 40)
    plain = BatchIterator(images, labels, args.batch)
    crop = BatchIterator(images, labels, args.batch, augment="crop_flip")
    loop = BatchIterator(images, labels, args.batch, augment=per_example_crop_flip)
    shifted = BatchIterator(signals, labels, args.batch, augment="shift")
    resnet = create_model("resnet20", dims=2, in_channels=3).eval()
    cnn = create_model("cnn").eval()
    xb, sb = images[: args.batch], signals[: args.batch]

    def forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(x)

        return run

    candidates = {
        "next_batch (images, no augment)": (plain.next_batch, "resnet20 forward"),
        "next_batch (images, crop_flip)": (crop.next_batch, "resnet20 forward"),
        "per-example crop+flip loop": (loop.next_batch, "resnet20 forward"),
        "next_batch (signals, shift)": (shifted.next_batch, "cnn forward"),
        "resnet20 forward": (forward(resnet, xb), "resnet20 forward"),
        "cnn forward": (forward(cnn, sb), "cnn forward"),
    }
    batches = {name: (3 if "forward" in name and "resnet" in name else 20) for name in candidates}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeat):
        for name, (fn, _) in candidates.items():
            times[name].append(time_batches(fn, batches[name]))
    setup = f"batch {args.batch}, {args.examples} examples, {args.threads} thread(s)"
    print(f"{setup}, median of {args.repeat} rounds")
    print(f"{'per batch':34s} {'ms':>9s}  {'ratio to':18s} {'ratio':>8s}")
    for name, (_, baseline) in candidates.items():
        median = statistics.median(times[name])
        ratio = median / statistics.median(times[baseline])
        print(f"{name:34s} {1e3 * median:9.3f}  {baseline:18s} {ratio:8.4f}")


if __name__ == "__main__":
    main()
