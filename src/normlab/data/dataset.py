"""The in-memory :class:`Dataset` every loader returns, the name -> loader registry, and
:func:`load_dataset`."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normlab.errors import NormlabError

TASKS = ("classification", "regression")
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841; a label near 2**64 is a corrupt file, not a class
MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841; a label near 2**64 is a corrupt file, not a class


@dataclass
class Dataset:
    """A dataset held in memory as tensors.

    Attributes:
        x_train, x_test: inputs, (N, C, L) for 1-D signals, (N, C, H, W) for images, (N, D) for features;
            float32.
        y_train, y_test: int64 class indices (N,) for classification, float32 targets (N, D) for regression.
        num_classes: number of classes; 0 for regression.
        in_channels: C. A feature vector (D,) counts as one channel of length D (``in_channels`` 1), so a
            model that flattens its input sizes it as ``in_channels * input_shape[-1] ** dims`` throughout.
        dims: 1 for (N, C, L) and (N, D), 2 for (N, C, H, W): the ``dims`` models and norms take.
        task: ``"classification"`` or ``"regression"``.
        input_shape: the shape of one example (without the batch dim).
        name: the name it was loaded by.
        meta: provenance and preprocessing (normalization constants, generator settings, subset indices).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    in_channels: int
    dims: int
    task: str
    input_shape: tuple[int, ...]
    name: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Inputs enter contiguous: channels-last batches from user loaders crashed a conv backward
        # (``free(): invalid next size``); contiguous() is free for tensors that already are.
        self.x_train, self.x_test = self.x_train.contiguous(), self.x_test.contiguous()
        if self.task not in TASKS:
            raise NormlabError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise NormlabError(
                f"inputs and targets differ in length: train {len(self.x_train)} vs {len(self.y_train)}, "
                f"test {len(self.x_test)} vs {len(self.y_test)}"
            )
        check_values(self)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, train={len(self.x_train)}, "
            f"test={len(self.x_test)}, input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def check_values(data: Dataset) -> None:
    """Refuse data the loss cannot train on, once, at load (issue 29): a bad value would otherwise end as a
    C++ error deep in the loss, or be recorded as a diverged run (which compare reads as an unstable lr).

    Classification: at least 2 (and at most ``MAX_CLASSES``) classes, integer labels in ``0..K-1``
    (``-100``, cross-entropy's ``ignore_index``, is refused too: it would silently drop examples).
    Regression: finite targets. Both: finite float inputs.
    """
    where = f"dataset {data.name!r}" + (f" ({data.meta['source']})" if data.meta.get("source") else "")
    count = data.num_classes
    classes_ok = not isinstance(count, bool) and isinstance(count, int) and 2 <= count <= MAX_CLASSES
    if data.task == "classification" and not classes_ok:
        raise NormlabError(f"{where} has {count!r} classes; classification needs 2 to {MAX_CLASSES}")
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if x.is_floating_point() and len(x) and not torch.isfinite(x).all():
            raise NormlabError(f"{where}: x_{split} holds NaN or inf")
        if data.task == "regression":
            if y.is_floating_point() and len(y) and not torch.isfinite(y).all():
                raise NormlabError(f"{where}: y_{split} (regression targets) holds NaN or inf")
            continue
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise NormlabError(f"{where}: y_{split} has dtype {y.dtype}; class labels are integers")
        if len(y) == 0:
            continue
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= data.num_classes:
            bad = low if low < 0 else high
            hint = " (-100 is cross-entropy's ignore_index: normlab trains on every example)" * (bad == -100)
            raise NormlabError(
                f"{where}: y_{split} holds label {bad}, outside the {data.num_classes} classes "
                f"0..{data.num_classes - 1}{hint}"
            )


_LOADERS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: register ``loader(root: Path, download: bool, **options) -> Dataset`` under ``name``."""

    def decorator(loader: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _LOADERS:
            raise NormlabError(f"dataset {name!r} is already registered")
        _LOADERS[name] = loader
        return loader

    return decorator


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    _load_builtin_datasets()
    return sorted(_LOADERS)


def dataset_options(name: str) -> list[str]:
    """The loader-specific option names :func:`load_dataset` accepts for ``name``."""
    params = inspect.signature(_get_loader(name)).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def default_root() -> Path:
    """``$XDG_CACHE_HOME/normlab`` (``~/.cache/normlab``): where data is cached when no root is given."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normlab"


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    subset: int | float | None = None,
    seed: int = 0,
    **options: Any,
) -> Dataset:
    """Load dataset ``name`` into memory.

    Args:
        root: folder holding (or to receive) the data; ``None`` = :func:`default_root`.
        download: fetch missing files (CIFAR) instead of failing.
        subset: keep a seeded random subset of the *training* split: an int count or a fraction in (0, 1].
        seed: seed of the subset draw.
        options: loader-specific options, listed by :func:`dataset_options`.

    Raises:
        NormlabError: unknown name or option, bad value, or missing data (the message says how to get it).
    """
    if name.startswith("torch:"):  # torch Datasets registered from Python (normlab.data.torch_data)
        from normlab.data.torch_data import StreamingDataset, load_torch_data

        if options:
            raise NormlabError(f"dataset {name!r} takes no options, got {', '.join(sorted(options))}")
        loaded = load_torch_data(name)
        if subset is not None and isinstance(loaded, StreamingDataset):
            raise NormlabError(f"subset applies to in-memory data; dataset {name!r} is streamed")
        return take_subset(loaded, subset, seed) if subset is not None else loaded
    if name.startswith("npz:"):  # user arrays: npz:FILE (normlab.data.npz); root and options do not apply
        from normlab.data.npz import load_npz

        if options:
            raise NormlabError(f"dataset {name!r} takes no options, got {', '.join(sorted(options))}")
        dataset = load_npz(name)
        return take_subset(dataset, subset, seed) if subset is not None else dataset
    loader = _get_loader(name)
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        given, allowed = ", ".join(unknown), ", ".join(valid) or "none"
        raise NormlabError(f"unknown option(s) {given} for dataset {name!r}; valid options: {allowed}")
    if not isinstance(download, bool):
        raise NormlabError(f"download must be True or False, got {download!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise NormlabError(f"seed must be an int, got {seed!r}")
    dataset = loader(Path(root).expanduser() if root is not None else None, download, **options)
    if subset is not None:
        dataset = take_subset(dataset, subset, seed)
    return dataset


def take_subset(dataset: Dataset, subset: int | float, seed: int) -> Dataset:
    """``dataset`` with a seeded uniformly random subset of its training split (sorted indices; the test split
    unchanged). ``meta`` records the count and seed, which determine the indices."""
    n = len(dataset.x_train)
    if isinstance(subset, bool) or not isinstance(subset, (int, float)):
        raise NormlabError(f"subset must be an int count or a fraction in (0, 1], got {subset!r}")
    if isinstance(subset, float):
        if not 0.0 < subset <= 1.0:
            raise NormlabError(f"subset as a fraction must be in (0, 1], got {subset!r}")
        count = max(1, round(subset * n))
    else:
        count = subset
    if not 1 <= count <= n:
        raise NormlabError(f"subset must be between 1 and the training set size {n}, got {subset!r}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n, generator=generator)[:count].sort().values
    meta = {**dataset.meta, "subset": count, "subset_seed": seed}
    return Dataset(
        x_train=dataset.x_train[indices],
        y_train=dataset.y_train[indices],
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        num_classes=dataset.num_classes,
        in_channels=dataset.in_channels,
        dims=dataset.dims,
        task=dataset.task,
        input_shape=dataset.input_shape,
        name=dataset.name,
        meta=meta,
    )


def _get_loader(name: str) -> Callable[..., Dataset]:
    _load_builtin_datasets()
    if name not in _LOADERS:
        raise NormlabError(f"unknown dataset {name!r}; valid datasets: {', '.join(list_datasets())}")
    return _LOADERS[name]


def _load_builtin_datasets() -> None:
    # Loaders live beside their formats; importing the package registers them.
    import normlab.data  # noqa: F401
