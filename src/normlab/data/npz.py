"""User arrays: ``npz:FILE``, a NumPy ``.npz`` archive with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

x: float arrays (N, C, H, W) images, (N, C, L) signals or (N, D) features (other real dtypes are cast to
float32; uint8 images are scaled to [0, 1]). y: integer class indices 0..K-1 (classification, K = max + 1
over both splits) or float targets (N,) / (N, D) (regression). Loaded with ``allow_pickle=False``: an
archive never runs code. Every problem is one NormlabError line naming the array and what it should be.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from normlab.data.dataset import MAX_CLASSES, Dataset
from normlab.errors import NormlabError
from normlab.files import refuse_special

PREFIX = "npz:"
KEYS = ("x_train", "y_train", "x_test", "y_test")


def is_npz(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def load_npz(name: str) -> Dataset:
    """The :class:`Dataset` in the archive ``name`` = ``npz:FILE`` (module docstring)."""
    path = Path(name[len(PREFIX):]).expanduser()
    refuse_special(path, f"dataset {name!r}: file")
    if not path.is_file():
        raise NormlabError(f"dataset {name!r}: file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in KEYS if k not in archive.files]
            if missing:
                raise NormlabError(
                    f"dataset {name!r} lacks array(s) {', '.join(missing)}; it needs {', '.join(KEYS)} "
                    f"(has {', '.join(archive.files) or 'none'})"
                )
            arrays = {k: archive[k] for k in KEYS}
        for key, value in arrays.items():  # a member saved without .npy is read as raw bytes
            if not isinstance(value, np.ndarray):
                raise NormlabError(f"dataset {name!r}: member {key!r} is not a .npy array")
    except NormlabError:
        raise
    except Exception as exc:  # not a zip, object arrays (pickle refused), truncated file
        raise NormlabError(f"dataset {name!r} is not a readable .npz of plain arrays: {exc}") from None
    x_train, x_test = _inputs(name, "x_train", arrays["x_train"]), _inputs(name, "x_test", arrays["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise NormlabError(
            f"dataset {name!r}: x_train examples have shape {tuple(x_train.shape[1:])} but x_test "
            f"{tuple(x_test.shape[1:])}"
        )
    for split, x in (("train", x_train), ("test", x_test)):
        y = arrays[f"y_{split}"]
        if y.ndim == 0 or len(y) != len(x):
            raise NormlabError(
                f"dataset {name!r}: y_{split} has shape {y.shape} but x_{split} has {len(x)} examples"
            )
    y_train, y_test, task, num_classes = _targets(name, arrays["y_train"], arrays["y_test"])
    dims = 2 if x_train.dim() == 4 else 1
    in_channels = 1 if x_train.dim() == 2 else int(x_train.shape[1])
    return Dataset(
        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=num_classes,
        in_channels=in_channels, dims=dims, task=task, input_shape=tuple(x_train.shape[1:]), name=name,
        meta={"source": str(path.resolve())},
    )


def _inputs(name: str, key: str, x: np.ndarray) -> torch.Tensor:
    if x.ndim not in (2, 3, 4) or x.shape[0] == 0:
        raise NormlabError(
            f"dataset {name!r}: {key} has shape {x.shape}; expected (N, D), (N, C, L) or (N, C, H, W) "
            "with N > 0"
        )
    if x.dtype == np.uint8:
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise NormlabError(f"dataset {name!r}: {key} has dtype {x.dtype}; expected a float or integer array")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise NormlabError(f"dataset {name!r}: {key} holds NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(x))


def _targets(
    name: str, y_train: np.ndarray, y_test: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, str, int]:
    if np.issubdtype(y_train.dtype, np.integer) and np.issubdtype(y_test.dtype, np.integer):
        for key, y in (("y_train", y_train), ("y_test", y_test)):
            if y.ndim != 1:
                raise NormlabError(f"dataset {name!r}: {key} has shape {y.shape}; class labels are (N,)")
            if y.min() < 0:
                raise NormlabError(f"dataset {name!r}: {key} has a negative label {int(y.min())}")
            if int(y.max()) >= MAX_CLASSES:  # before the int64 cast: uint64's max would wrap to -1
                raise NormlabError(
                    f"dataset {name!r}: {key} holds label {int(y.max())}; labels are class indices below "
                    f"{MAX_CLASSES}"
                )
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        if num_classes < 2:
            raise NormlabError(f"dataset {name!r}: labels have a single class; classification needs >= 2")
        if len(np.unique(y_train)) < 2:
            raise NormlabError(f"dataset {name!r}: y_train holds fewer than 2 classes")
        return torch.from_numpy(y_train.astype(np.int64)), torch.from_numpy(y_test.astype(np.int64)), \
            "classification", num_classes
    if np.issubdtype(y_train.dtype, np.floating) and np.issubdtype(y_test.dtype, np.floating):
        y_train, y_test = y_train.astype(np.float32), y_test.astype(np.float32)
        if y_train.ndim == 1:
            y_train, y_test = y_train[:, None], y_test.reshape(-1, 1)
        return torch.from_numpy(y_train), torch.from_numpy(y_test), "regression", 0
    raise NormlabError(
        f"dataset {name!r}: y_train/y_test have dtypes {y_train.dtype}/{y_test.dtype}; expected integer "
        "class labels (both) or float regression targets (both)"
    )
