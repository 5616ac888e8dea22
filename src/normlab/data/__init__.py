"""Datasets as in-memory tensors (:func:`load_dataset`) and seeded, resumable mini-batches
(:class:`BatchIterator`).

Datasets: ``mnist1d`` (generated locally, the default), ``cifar10``, ``cifar100``, ``imagefolder``,
``gaussian_linear`` (Santurkar et al.'s deep-linear-network task) and ``synthetic``; from the user:
``npz:FILE`` (arrays, :mod:`normlab.data.npz`) and ``torch:NAME`` (torch Datasets registered with
:func:`register_torch_data`, in memory or streamed through a DataLoader).
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
from normlab.data.torch_data import StreamingDataset, register_torch_data

__all__ = [
    "BatchIterator",
    "Dataset",
    "StreamingDataset",
    "crop_flip",
    "dataset_options",
    "default_root",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "register_torch_data",
    "shift",
]
