"""Data from Python: torch ``Dataset`` objects as a normlab data set, held in memory or streamed.

    from normlab.data import register_torch_data
    name = register_torch_data("mine", train_set, test_set, num_classes=10)               # in memory
    name = register_torch_data("big", train_set, test_set, num_classes=10, stream=True,   # streamed
                               num_workers=4)
    train(TrainConfig(dataset=name, ...))                     # name == "torch:mine" / "torch:big"

Each item is ``(x, y)``: x a tensor (C, H, W) / (C, L) / (D,), y an int class (or a float target tensor).
Inputs are made contiguous float32 where they enter (a channels-last batch crashed a conv backward).

- **In memory** (``stream=False``): the datasets are read once through a ``DataLoader`` (``num_workers``)
  into tensors; from then on it is a normal :class:`normlab.data.Dataset` (subset, augment, resume).
- **Streamed** (``stream=True``): for data larger than memory. Training batches come from a ``DataLoader``
  with ``num_workers`` persistent worker processes over a seeded sampler (epoch e draws its permutation
  from seed ``(seed, e)``, drop_last), so the order is reproducible and a checkpoint resumes by skipping
  to its batch.
  Test metrics run over the whole test set through a loader; ``eval_train_samples`` and the train/eval gap
  use the first examples of each split (up to ``eval_train_samples`` / ``_HEAD`` = 4096). ``augment`` does
  not apply (put transforms in the Dataset).

A registered name lives in this process (and its forks); spawned sweep workers do not see it, so train such
configs with the default inline executor. Run key: the registration's ``fingerprint`` (default: SHA-256 over
every item, computed once on first use, one pass over the data) enters ``TrainConfig.key``, so other data
under the same name is never a cache hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from normlab.data.dataset import Dataset
from normlab.errors import NormlabError

PREFIX = "torch:"
_HEAD = 4096
_READ_BATCH = 256


@dataclasses.dataclass
class _Registered:
    train: TorchDataset
    test: TorchDataset
    num_classes: int
    stream: bool
    num_workers: int
    fingerprint: str | None
    loaded: Any = None


_REGISTRY: dict[str, _Registered] = {}


def register_torch_data(
    name: str,
    train: TorchDataset,
    test: TorchDataset,
    *,
    num_classes: int | None = None,
    stream: bool = False,
    num_workers: int = 0,
    fingerprint: str | None = None,
) -> str:
    """Register ``train`` / ``test`` under ``"torch:" + name`` (returned); see the module docstring.

    Args:
        num_classes: classes of a classification task (None: regression targets, or 1 + the largest label
            of an in-memory set).
        stream: stream batches from a DataLoader instead of holding the data in memory.
        num_workers: DataLoader worker processes (reading the in-memory copy, or every streamed batch).
        fingerprint: a string that changes whenever the data does (e.g. a version); None: a hash of all items.
    """
    if not name or ":" in name:
        raise NormlabError(f"torch data name must be non-empty without ':', got {name!r}")
    for split, data in (("train", train), ("test", test)):
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__") or len(data) == 0:
            kind = type(data).__name__
            raise NormlabError(f"{split} must be a non-empty map-style torch Dataset, got {kind}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise NormlabError(f"num_workers must be an int >= 0, got {num_workers!r}")
    _REGISTRY[name] = _Registered(train, test, num_classes, bool(stream), num_workers, fingerprint)
    return PREFIX + name


def load_torch_data(name: str) -> Dataset | StreamingDataset:
    """The registered data ``name`` (``torch:...``): a :class:`Dataset` or a :class:`StreamingDataset`."""
    entry = _entry(name)
    if entry.loaded is None:
        entry.loaded = _streaming(name, entry) if entry.stream else _in_memory(name, entry)
    return entry.loaded


def torch_data_fingerprint(name: str) -> str | None:
    """The registration's fingerprint (computed over every item the first time); None if not registered."""
    entry = _REGISTRY.get(name[len(PREFIX):])
    if entry is None:
        return None
    if entry.fingerprint is None:
        digest = hashlib.sha256()
        for split in (entry.train, entry.test):
            digest.update(f"{type(split).__name__}:{len(split)}".encode())
            for x, y in _loader(split, entry.num_workers):
                digest.update(x.contiguous().numpy().tobytes())
                digest.update(torch.as_tensor(y).contiguous().numpy().tobytes())
        entry.fingerprint = digest.hexdigest()[:16]
    return entry.fingerprint


@dataclasses.dataclass
class StreamingDataset:
    """Data served by DataLoaders (module docstring); the fields of :class:`Dataset` but the tensors."""

    train: TorchDataset
    test: TorchDataset
    num_classes: int
    in_channels: int
    dims: int
    task: str
    input_shape: tuple[int, ...]
    name: str
    num_workers: int = 0
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def batches(self, batch_size: int, *, seed: int, device: torch.device | str) -> LoaderBatches:
        return LoaderBatches(self.train, batch_size, seed=seed, device=device, num_workers=self.num_workers)

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in _loader(self.test, self.num_workers, batch_size):
            yield _prepare(x), y

    def head(self, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` examples of ``split`` ("train" or "test") as tensors."""
        data = self.train if split == "train" else self.test
        count = min(count, len(data))
        items = [data[i] for i in range(count)]
        x = _prepare(torch.stack([torch.as_tensor(item[0]) for item in items]))
        return x, _labels([item[1] for item in items])

    @property
    def x_train(self) -> torch.Tensor:  # the few examples code that shapes a model looks at
        return self.head("train", 2)[0]


class LoaderBatches:
    """``next_batch()`` over a DataLoader with a seeded RandomSampler per epoch (drop_last); resumable by
    ``(epoch, position)`` like :class:`normlab.data.BatchIterator`."""

    def __init__(self, data: TorchDataset, batch_size: int, *, seed: int, device, num_workers: int) -> None:
        if batch_size > len(data):
            raise NormlabError(f"batch_size={batch_size} exceeds the {len(data)} streamed training examples")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.device, self.num_workers = device, num_workers
        self.num_batches = len(data) // batch_size
        self._epoch, self._position, self._iterator = 0, 0, None
        self._peeked: tuple[torch.Tensor, torch.Tensor] | None = None
        self._loader: DataLoader | None = None
        self._sampler: _EpochSampler | None = None

    def __len__(self) -> int:
        return self.num_batches

    def _start(self, skip: int) -> None:
        if self._loader is None:  # one loader per run: persistent workers start once, not every epoch
            self._sampler = _EpochSampler(len(self.data), self.seed)
            self._loader = DataLoader(self.data, batch_size=self.batch_size, sampler=self._sampler,
                                      drop_last=True, num_workers=self.num_workers,
                                      persistent_workers=self.num_workers > 0)  # fmt: skip
        self._sampler.epoch = self._epoch  # indices are drawn in this process, so workers need not know
        self._iterator = iter(self._loader)
        for _ in range(skip):  # resuming mid-epoch: the sampler's order is fixed, so skip to the position
            next(self._iterator)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.peek()
        self._peeked = None
        self._position += 1
        return batch

    def peek(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch :meth:`next_batch` will return, without advancing: it is loaded now and kept for it
        (a checkpoint counts it as not yet served, so a resumed run loads it again)."""
        if self._peeked is None:
            if self._position >= self.num_batches:
                self._epoch, self._position, self._iterator = self._epoch + 1, 0, None
            if self._iterator is None:
                self._start(self._position)
            x, y = next(self._iterator)
            self._peeked = _prepare(x).to(self.device), torch.as_tensor(y).to(self.device)
        return self._peeked

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "num_examples": len(self.data), "batch_size": self.batch_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_examples", "batch_size"):
            if state.get(key) != self.state_dict()[key]:
                mine = self.state_dict()[key]
                raise NormlabError(f"state_dict has {key}={state.get(key)!r}, this loader {mine!r}")
        self._epoch, self._position, self._iterator = int(state["epoch"]), int(state["position"]), None
        self._peeked = None


class _EpochSampler(Sampler[int]):
    """A permutation of range(n) from a generator seeded by ``(seed, epoch)`` (set ``epoch`` each epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __iter__(self) -> Iterator[int]:
        words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(int(words))).tolist())

    def __len__(self) -> int:
        return self.n


def _entry(name: str) -> _Registered:
    entry = _REGISTRY.get(name[len(PREFIX):])
    if entry is None:
        known = ", ".join(PREFIX + n for n in sorted(_REGISTRY)) or "none"
        raise NormlabError(
            f"dataset {name!r} is not registered in this process (normlab.data.register_torch_data); "
            f"registered: {known}"
        )
    return entry


def _loader(data: TorchDataset, num_workers: int, batch_size: int = _READ_BATCH) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).float().contiguous()


def _labels(values: list) -> torch.Tensor:
    y = torch.as_tensor(np.asarray([torch.as_tensor(v).numpy() for v in values]))
    return y.long() if not torch.is_floating_point(y) else y.float()


def _shape_fields(x: torch.Tensor, name: str) -> tuple[int, int, tuple[int, ...]]:
    if x.dim() not in (1, 2, 3):
        raise NormlabError(
            f"dataset {name!r}: items have shape {tuple(x.shape)}; expected (D,), (C, L) or (C, H, W)"
        )
    in_channels = 1 if x.dim() == 1 else int(x.shape[0])
    return in_channels, (2 if x.dim() == 3 else 1), tuple(x.shape)


def _task(y: torch.Tensor, num_classes: int | None, name: str) -> tuple[str, int]:
    if torch.is_floating_point(y):
        return "regression", 0
    classes = num_classes if num_classes is not None else int(y.max()) + 1
    if classes < 2:
        raise NormlabError(f"dataset {name!r}: num_classes must be >= 2, got {classes}")
    return "classification", classes


def _in_memory(name: str, entry: _Registered) -> Dataset:
    splits = []
    for data in (entry.train, entry.test):
        batches = list(_loader(data, entry.num_workers))
        x = torch.cat([_prepare(xb) for xb, _ in batches])
        splits.append((x, torch.cat([torch.as_tensor(yb) for _, yb in batches])))
    (x_train, y_train), (x_test, y_test) = splits
    in_channels, dims, shape = _shape_fields(x_train[0], name)
    task, classes = _task(torch.cat([y_train, y_test]), entry.num_classes, name)
    if task == "classification":
        y_train, y_test = y_train.long(), y_test.long()
    return Dataset(x_train, y_train, x_test, y_test, classes, in_channels, dims, task, shape, name,
                   meta={"source": "torch", "train_type": type(entry.train).__name__})  # fmt: skip


def _streaming(name: str, entry: _Registered) -> StreamingDataset:
    x0, y0 = entry.train[0]
    in_channels, dims, shape = _shape_fields(torch.as_tensor(x0), name)
    y = torch.as_tensor(y0)
    if torch.is_floating_point(y):
        task, classes = "regression", 0
    elif entry.num_classes is None:
        raise NormlabError(f"dataset {name!r} is streamed: give num_classes= (it is not read ahead)")
    else:
        task, classes = _task(y, entry.num_classes, name)
    meta = {"source": "torch", "streamed": True}
    return StreamingDataset(entry.train, entry.test, classes, in_channels, dims, task, shape, name,
                            num_workers=entry.num_workers, meta=meta)  # fmt: skip
