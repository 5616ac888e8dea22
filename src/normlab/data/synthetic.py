"""Generated datasets: ``gaussian_linear`` (the deep-linear-network task of Santurkar et al. 2018) and
``synthetic`` (random inputs and labels of any shape, for smoke tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from normlab.data.dataset import Dataset, register_dataset
from normlab.errors import NormlabError


def _count(what: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise NormlabError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


@register_dataset("gaussian_linear")
def load_gaussian_linear(
    root: Path | None,
    download: bool,
    *,
    num_samples: int = 1000,
    num_test: int = 1000,
    dim: int = 10,
    data_seed: int = 0,
) -> Dataset:
    """Linear regression ``y = A x`` with ``x ~ N(0, I_d)`` and ``A`` a d x d matrix of i.i.d. N(0, 1) entries
    (Santurkar et al. 2018, arXiv 1805.11604, Sec. 3.2: d = 10, 1000 samples, full-batch GD on the DLN).

    x: (N, d) float32 (one channel of length d), y: (N, d) float32; task ``"regression"``, ``num_classes`` 0.
    ``A`` is in
    ``meta["A"]``. ``data_seed`` fixes A and the samples (independent of ``load_dataset``'s subset seed).
    """
    n, n_test, d = _count("num_samples", num_samples), _count("num_test", num_test), _count("dim", dim)
    generator = torch.Generator().manual_seed(_count("data_seed", data_seed, 0))
    A = torch.randn(d, d, generator=generator)
    x = torch.randn(n + n_test, d, generator=generator)
    y = x @ A.T
    return Dataset(
        x_train=x[:n],
        y_train=y[:n],
        x_test=x[n:],
        y_test=y[n:],
        num_classes=0,
        in_channels=1,
        dims=1,
        task="regression",
        input_shape=(d,),
        name="gaussian_linear",
        meta={"A": A.tolist(), "data_seed": data_seed},
    )


@register_dataset("synthetic")
def load_synthetic(
    root: Path | None,
    download: bool,
    *,
    shape: tuple[int, ...] = (1, 40),
    num_classes: int = 10,
    num_train: int = 256,
    num_test: int = 64,
    data_seed: int = 0,
) -> Dataset:
    """Random data for smoke tests: x ~ N(0, 1) of per-example ``shape`` ((C, L): dims 1; (C, H, W): dims 2;
    (D,): feature vectors), labels uniform in ``[0, num_classes)``. Nothing to learn beyond memorization."""
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape
    if (
        not isinstance(shape, tuple)
        or not 1 <= len(shape) <= 3
        or not all(isinstance(s, int) and s >= 1 for s in shape)
    ):
        raise NormlabError(f"shape must be (D,), (C, L) or (C, H, W) of positive ints, got {shape!r}")
    n, n_test, k = (
        _count("num_train", num_train),
        _count("num_test", num_test),
        _count("num_classes", num_classes),
    )
    generator = torch.Generator().manual_seed(_count("data_seed", data_seed, 0))
    x = torch.randn(n + n_test, *shape, generator=generator)
    y = torch.randint(0, k, (n + n_test,), generator=generator)
    return Dataset(
        x_train=x[:n],
        y_train=y[:n],
        x_test=x[n:],
        y_test=y[n:],
        num_classes=k,
        in_channels=shape[0] if len(shape) > 1 else 1,
        dims=max(1, len(shape) - 1),
        task="classification",
        input_shape=shape,
        name="synthetic",
        meta={"data_seed": data_seed},
    )
