"""Datasets as in-memory tensors (:func:`load_dataset`) and seeded, resumable mini-batches
(:class:`BatchIterator`).

Datasets: ``mnist1d`` (generated locally, the default), ``cifar10``, ``cifar100``, ``imagefolder``,
``gaussian_linear`` (Santurkar et al.'s deep-linear-network task) and ``synthetic``.
"""

from normlab.data import cifar, imagefolder, mnist1d, synthetic  # noqa: F401  (registers the datasets)
from normlab.data.augment import crop_flip, shift
from normlab.data.dataset import (
    Dataset,
    dataset_options,
    default_root,
    list_datasets,
    load_dataset,
    register_dataset,
)
from normlab.data.iterator import BatchIterator

__all__ = [
    "BatchIterator",
    "Dataset",
    "crop_flip",
    "dataset_options",
    "default_root",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "shift",
]
