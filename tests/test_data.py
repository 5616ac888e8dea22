"""normlab.data: the loaders (on data the tests write in the official formats), subsets, the
augmentations (against per-example reference code) and BatchIterator's seeding and exact resume."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab.data import BatchIterator, crop_flip, list_datasets, load_dataset, shift
from normlab.data import cifar as cifar_module
from normlab.data.augment import crop_flip_at, shift_at
from normlab.errors import NormlabError


@pytest.fixture(scope="session")
def mnist1d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist1d")


def test_list_datasets() -> None:
    assert list_datasets() == [
        "cifar10",
        "cifar100",
        "gaussian_linear",
        "imagefolder",
        "mnist1d",
        "synthetic",
    ]


def test_mnist1d_matches_the_generator_and_is_cached(mnist1d_root: Path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    ds = load_dataset("mnist1d", root=mnist1d_root, num_samples=200)  # the default is 5000: 4000 / 1000
    assert (np.random.get_state()[1] == state).all()  # the generator's reseeding does not leak out
    assert ds.x_train.shape == (160, 1, 40) and ds.x_test.shape == (40, 1, 40)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert (ds.num_classes, ds.in_channels, ds.dims, ds.task, ds.input_shape) == (
        10,
        1,
        1,
        "classification",
        (1, 40),
    )
    args = get_dataset_args()
    args.num_samples = 200
    reference = make_dataset(args)  # the package's own output, default arguments otherwise
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), reference["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ds.y_test.numpy(), reference["y_test"])
    cached = list((mnist1d_root / "mnist1d").glob("*.npz"))
    assert len(cached) == 1
    again = load_dataset("mnist1d", root=mnist1d_root, num_samples=200)
    assert torch.equal(again.x_train, ds.x_train)


def test_subset_is_seeded_random_and_only_touches_train(mnist1d_root: Path) -> None:
    full = load_dataset("mnist1d", root=mnist1d_root, num_samples=200)
    a = load_dataset("mnist1d", root=mnist1d_root, num_samples=200, subset=40, seed=1)
    b = load_dataset("mnist1d", root=mnist1d_root, num_samples=200, subset=40, seed=1)
    c = load_dataset("mnist1d", root=mnist1d_root, num_samples=200, subset=0.25, seed=2)
    assert len(a.x_train) == len(c.x_train) == 40 and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, c.x_train) and torch.equal(a.x_test, full.x_test)
    idx = torch.randperm(160, generator=torch.Generator().manual_seed(1))[:40].sort().values
    assert torch.equal(a.x_train, full.x_train[idx]) and torch.equal(a.y_train, full.y_train[idx])


def test_gaussian_linear_is_y_equals_a_x() -> None:
    ds = load_dataset("gaussian_linear")
    A = torch.tensor(ds.meta["A"])
    assert ds.x_train.shape == (1000, 10) and A.shape == (10, 10)
    torch.testing.assert_close(ds.y_train, ds.x_train @ A.T)
    assert (ds.task, ds.num_classes, ds.in_channels, ds.dims) == ("regression", 0, 1, 1)
    assert abs(ds.x_train.mean().item()) < 0.05 and ds.x_train.std().item() == pytest.approx(1, abs=0.05)
    assert torch.equal(load_dataset("gaussian_linear").x_train, ds.x_train)
    assert not torch.equal(load_dataset("gaussian_linear", data_seed=1).x_train, ds.x_train)


def test_synthetic_shapes() -> None:
    ds = load_dataset("synthetic", shape=(3, 8, 8), num_classes=4, num_train=20, num_test=5)
    assert ds.x_train.shape == (20, 3, 8, 8) and ds.x_test.shape == (5, 3, 8, 8)
    assert (ds.dims, ds.in_channels, ds.input_shape) == (2, 3, (3, 8, 8))
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 4


# --- CIFAR: a tiny archive in the official format ------------------------------------------------------


def _pickle(obj: dict) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _tiny_cifar_archive(path: Path, cifar100: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    images = rng.integers(0, 256, size=(14, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=14)
    if cifar100:
        folder = "cifar-100-python"
        for name, rows in (("train", slice(0, 10)), ("test", slice(10, 14))):
            files[name] = _pickle(
                {
                    b"data": images[rows],
                    b"fine_labels": labels[rows].tolist(),
                    b"coarse_labels": (labels[rows] // 5).tolist(),
                }
            )
        files["meta"] = _pickle(
            {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20}
        )
    else:
        folder = "cifar-10-batches-py"
        for i in range(5):
            files[f"data_batch_{i + 1}"] = _pickle(
                {b"data": images[2 * i : 2 * i + 2], b"labels": labels[2 * i : 2 * i + 2].tolist()}
            )
        files["test_batch"] = _pickle({b"data": images[10:], b"labels": labels[10:].tolist()})
        files["batches.meta"] = _pickle({b"label_names": [f"class{i}".encode() for i in range(10)]})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return images, labels


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_download_verify_extract_and_read(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    is100 = name == "cifar100"
    spec_attr = "CIFAR100" if is100 else "CIFAR10"
    spec = getattr(cifar_module, spec_attr)
    server = tmp_path / "server"
    server.mkdir()
    images, labels = _tiny_cifar_archive(server / spec.archive, is100)
    root = tmp_path / "data"

    with pytest.raises(NormlabError, match="pass download=True .* to fetch it"):
        load_dataset(name, root=root)

    monkeypatch.setattr(cifar_module, "URL", server.as_uri() + "/")
    # the official md5 does not match the tiny archive: rejected, nothing saved
    with pytest.raises(NormlabError, match=f"checksum mismatch .* expected {spec.md5}"):
        load_dataset(name, root=root, download=True)
    assert not list(root.glob("*.tar.gz*"))

    monkeypatch.setattr(cifar_module, spec_attr, dataclasses.replace(spec, md5=_md5(server / spec.archive)))
    ds = load_dataset(name, root=root, download=True)
    assert (root / spec.archive).exists() and (root / spec.folder).is_dir()
    expected = torch.from_numpy(images.reshape(-1, 3, 32, 32)).double() / 255
    mean = expected[:10].mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    std = expected[:10].std(dim=(0, 2, 3), correction=0).view(1, 3, 1, 1)
    torch.testing.assert_close(ds.x_train.double(), (expected[:10] - mean) / std, rtol=0, atol=1e-5)
    torch.testing.assert_close(ds.x_test.double(), (expected[10:] - mean) / std, rtol=0, atol=1e-5)
    assert ds.y_train.tolist() == labels[:10].tolist() and ds.y_test.tolist() == labels[10:].tolist()
    assert (ds.num_classes, ds.input_shape, ds.dims) == ((100 if is100 else 10), (3, 32, 32), 2)

    # an existing extracted folder is read without the archive; root may also be that folder itself
    (root / spec.archive).unlink()
    assert torch.equal(load_dataset(name, root=root).x_train, ds.x_train)
    assert torch.equal(load_dataset(name, root=root / spec.folder).y_test, ds.y_test)
    if is100:
        coarse = load_dataset(name, root=root, labels="coarse")
        assert coarse.num_classes == 20 and coarse.y_train.tolist() == (labels[:10] // 5).tolist()


def test_cifar_local_archive_with_bad_checksum_is_rejected(tmp_path: Path) -> None:
    _tiny_cifar_archive(tmp_path / "cifar-10-python.tar.gz", cifar100=False)
    with pytest.raises(NormlabError, match="checksum mismatch .* delete it and download again"):
        load_dataset("cifar10", root=tmp_path)


# --- imagefolder ----------------------------------------------------------------------------------------


def test_imagefolder_reads_resizes_and_normalizes(tmp_path: Path) -> None:
    from PIL import Image

    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in (("train", 2), ("val", 1)):
        for cls, color in colors.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12, 8), color).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset("imagefolder", root=tmp_path, image_size=4, normalize=False)
    assert ds.x_train.shape == (4, 3, 4, 4) and ds.x_test.shape == (2, 3, 4, 4)
    assert ds.y_train.tolist() == [0, 0, 1, 1] and ds.meta["label_names"] == ["cat", "dog"]
    assert torch.equal(ds.x_train[0], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 4, 4))
    normed = load_dataset("imagefolder", root=tmp_path, image_size=4)
    # red and blue channels: values 1 and 0 in equal numbers -> (x - 0.5) / 0.5 = +-1; green is constant 0
    assert normed.x_train[:, 0].unique().tolist() == [-1.0, 1.0]
    with pytest.raises(NormlabError, match="imagefolder needs root="):
        load_dataset("imagefolder")
    with pytest.raises(NormlabError, match="is not a folder; imagefolder expects"):
        load_dataset("imagefolder", root=tmp_path / "train")


# --- augmentation -------------------------------------------------------------------------------------


def test_crop_flip_equals_per_example_pad_crop_flip() -> None:
    x = torch.randn(6, 3, 5, 7)
    top, left = torch.tensor([0, 8, 3, 4, 1, 7]), torch.tensor([8, 0, 2, 4, 6, 1])
    flip = torch.tensor([True, False, True, False, True, False])
    out = crop_flip_at(x, top, left, flip, padding=4)
    for i in range(6):
        ref = F.pad(x[i], (4, 4, 4, 4))[:, top[i] : top[i] + 5, left[i] : left[i] + 7]
        torch.testing.assert_close(out[i], ref.flip(-1) if flip[i] else ref, rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    assert crop_flip(x, g).shape == x.shape


def test_shift_equals_per_example_translation() -> None:
    x = torch.randn(3, 2, 10)
    offset = torch.tensor([0, 4, 8])
    out = shift_at(x, offset, padding=4)
    torch.testing.assert_close(out[1], x[1])
    torch.testing.assert_close(out[0], F.pad(x[0], (4, 0))[:, :10])  # moved right by 4, zeros enter
    torch.testing.assert_close(out[2], F.pad(x[2], (0, 4))[:, 4:])  # moved left by 4
    with pytest.raises(NormlabError, match=r"shift needs 1-D signals \(N, C, L\), got shape \(3, 2, 4, 4\)"):
        shift(torch.zeros(3, 2, 4, 4), torch.Generator())


# --- BatchIterator ------------------------------------------------------------------------------------


def test_batch_iterator_epochs_cover_the_data_once() -> None:
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    it = BatchIterator(x, y, 3, seed=5)
    assert len(it) == 3
    epoch0 = torch.cat([yb for _, yb in it])
    epoch1 = torch.cat([yb for _, yb in it])
    assert len(epoch0) == 9 and len(set(epoch0.tolist())) == 9 and not torch.equal(epoch0, epoch1)
    assert it.epoch == 2
    kept = BatchIterator(x, y, 3, shuffle=False, drop_last=False)
    assert [yb.tolist() for _, yb in kept] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert torch.equal(torch.cat([yb for _, yb in BatchIterator(x, y, 3, seed=5)]), epoch0)


def test_batch_iterator_resumes_exactly_mid_epoch_with_augmentation() -> None:
    x, y = torch.randn(20, 3, 8, 8), torch.arange(20)
    it = BatchIterator(x, y, 4, seed=3, augment="crop_flip")
    reference = [it.next_batch() for _ in range(13)]  # crosses two epoch boundaries
    partial = BatchIterator(x, y, 4, seed=3, augment="crop_flip")
    for _ in range(7):
        partial.next_batch()
    state = partial.state_dict()
    assert (state["epoch"], state["position"]) == (1, 2)
    resumed = BatchIterator(x, y, 4, seed=3, augment="crop_flip")
    resumed.load_state_dict(state)
    for xb, yb in reference[7:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, xb) and torch.equal(ry, yb)
    assert not torch.equal(reference[0][0], x[reference[0][1]])  # augmented
    with pytest.raises(NormlabError, match="state_dict has batch_size=4 but this BatchIterator has 5"):
        BatchIterator(x, y, 5, seed=3, augment="crop_flip").load_state_dict(state)


def test_batch_iterator_peek_is_the_next_batch_and_does_not_advance() -> None:
    x, y = torch.randn(20, 3, 8, 8), torch.arange(20)
    reference = BatchIterator(x, y, 6, seed=3, augment="crop_flip")
    served = [reference.next_batch() for _ in range(7)]  # 3 batches an epoch: crosses two boundaries
    it = BatchIterator(x, y, 6, seed=3, augment="crop_flip")
    for xb, yb in served:
        px, py = it.peek()
        again_x, _ = it.peek()
        assert torch.equal(px, xb) and torch.equal(py, yb) and torch.equal(again_x, xb)
        nx, ny = it.next_batch()
        assert torch.equal(nx, xb) and torch.equal(ny, yb)
    assert it.state_dict() == reference.state_dict()
    assert not torch.equal(served[0][1], served[1][1])  # the peeks followed the data, not one batch


def test_batch_iterator_next_index_gathers_the_next_batch() -> None:
    x, y = torch.randn(20, 3, 5), torch.arange(20)
    reference = BatchIterator(x, y, 6, seed=4, drop_last=False)  # 4 batches an epoch, the last of 2
    it = BatchIterator(x, y, 6, seed=4, drop_last=False)
    sizes = []
    for _ in range(9):  # across two epoch boundaries
        xb, yb = reference.next_batch()
        index = it.next_index()
        sizes.append(len(index))
        assert torch.equal(x[index], xb) and torch.equal(y[index], yb)
        assert it.state_dict() == reference.state_dict()
    assert sizes == [6, 6, 6, 2, 6, 6, 6, 2, 6]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(batch_size=50), "batch_size=50 exceeds the 20 examples, so drop_last=True leaves no batch"),
        (dict(batch_size=4, augment="mixup"), "unknown augment 'mixup'; valid: crop_flip, shift or None"),
        (dict(batch_size=4, seed=-1), "seed must be a non-negative int, got -1"),
    ],
)
def test_batch_iterator_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(NormlabError) as info:
        BatchIterator(torch.zeros(20, 1, 4), torch.zeros(20), **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("mnist2d",), {}, "unknown dataset 'mnist2d'; valid datasets: cifar10, cifar100, gaussian_linear"),
        (
            ("gaussian_linear",),
            dict(size=3),
            "unknown option(s) size for dataset 'gaussian_linear'; valid options: num_samples",
        ),
        (
            ("gaussian_linear",),
            dict(subset=0),
            "subset must be between 1 and the training set size 1000, got 0",
        ),
        (("gaussian_linear",), dict(subset=1.5), "subset as a fraction must be in (0, 1], got 1.5"),
        (("gaussian_linear",), dict(dim=0), "dim must be an int >= 1, got 0"),
        (("cifar100",), dict(labels="medium"), "labels must be 'fine' or 'coarse', got 'medium'"),
        (("mnist1d",), dict(num_samples=15), "num_samples must be a positive multiple of 10, got 15"),
        (("synthetic",), dict(shape=(0, 4)), "shape must be (D,), (C, L) or (C, H, W) of positive ints"),
    ],
)
def test_load_dataset_bad_input(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(NormlabError) as info:
        load_dataset(*args, **kwargs)
    assert message in str(info.value)
