"""MNIST-1D (Greydanus 2020, arXiv 2011.14439): 10 classes of length-40 1-D signals, generated locally by
the ``mnist1d`` package (a few seconds) and cached; normlab's embedded default dataset.

Generated with the package's default arguments (``get_dataset_args()``: 5000 samples, 80/20 train/test
split, generator seed 42), which reproduce the dataset of the paper. The package already centres the
signals and scales them to unit standard deviation over the whole set.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from normlab.data.dataset import Dataset, default_root, register_dataset
from normlab.errors import NormlabError
from normlab.files import atomic_open, refuse_special

SEQ_LENGTH = 40


def generate(num_samples: int = 5000) -> dict[str, np.ndarray]:
    """Run the mnist1d generator with its default arguments (``num_samples`` aside) and return
    ``{"x", "y", "x_test", "y_test"}``. The generator reseeds NumPy's and Python's global RNGs; their
    states are restored so loading data never changes the caller's randomness."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}


def cache_path(root: Path, num_samples: int) -> Path:
    """``root/mnist1d/mnist1d-<hash of the generator arguments>.npz``."""
    from mnist1d.data import get_dataset_args

    args = {k: v for k, v in get_dataset_args(as_dict=True).items() if k != "url"}
    args["num_samples"] = num_samples
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    return root / "mnist1d" / f"mnist1d-{digest}.npz"


def load_or_generate(path: Path, num_samples: int) -> dict[str, np.ndarray]:
    refuse_special(path, "MNIST-1D cache")
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            data = {key: cached[key] for key in cached.files}
        wrong = [key for key in ("x", "y", "x_test", "y_test") if not isinstance(data.get(key), np.ndarray)]
        if wrong:  # a member missing, or saved without .npy (read back as raw bytes)
            raise NormlabError(
                f"MNIST-1D cache {path} is not what normlab wrote: {', '.join(wrong)} not a .npy array; "
                "delete it to regenerate"
            )
        return data
    data = generate(num_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temporary file + rename: a concurrent or interrupted run never sees half a file, a link is not followed.
    with atomic_open(path, "wb") as f:
        np.savez(f, **data)
    return data


@register_dataset("mnist1d")
def load_mnist1d(root: Path | None, download: bool, *, num_samples: int = 5000) -> Dataset:
    """MNIST-1D: x (N, 1, 40) float32, y (N,) int64, 10 classes; 4000 train / 1000 test by default.
    ``num_samples`` (total, before the 80/20 split) must be a positive multiple of 10. ``download`` is
    not needed: the data is generated."""
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or num_samples < 10
        or num_samples % 10
    ):
        raise NormlabError(f"num_samples must be a positive multiple of 10, got {num_samples!r}")
    path = cache_path(root or default_root(), num_samples)
    data = load_or_generate(path, num_samples)

    def inputs(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).reshape(len(a), 1, SEQ_LENGTH)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        x_train=inputs(data["x"]),
        y_train=labels(data["y"]),
        x_test=inputs(data["x_test"]),
        y_test=labels(data["y_test"]),
        num_classes=10,
        in_channels=1,
        dims=1,
        task="classification",
        input_shape=(1, SEQ_LENGTH),
        name="mnist1d",
        meta={
            "source": "mnist1d package make_dataset (default args)",
            "num_samples": num_samples,
            "cache": str(path),
        },
    )
