"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official python-pickle archives.

``root`` may hold the extracted folder (``cifar-10-batches-py`` / ``cifar-100-python``), the archive
(``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, MD5-verified then extracted), or nothing, in which
case ``download=True`` fetches the archive from www.cs.toronto.edu/~kriz/ with MD5 verification. The batch
files are pickles; a pickle can name any importable callable and so run code, and a data folder is
untrusted. They are read with :class:`BatchUnpickler`, which resolves only what the official files
contain (numpy arrays and dtypes; dicts, lists, bytes and ints need no lookup) and refuses anything else
in one line, before anything named in the file is called.

Inputs are scaled to [0, 1], then normalized per channel with the training split's mean and standard
deviation (recorded in ``meta``); x is (N, 3, 32, 32) float32, y (N,) int64.
"""

from __future__ import annotations

import pickle
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from normlab.data import download as fetch
from normlab.data.dataset import Dataset, default_root, register_dataset
from normlab.errors import NormlabError
from normlab.files import refuse_special

URL = "https://www.cs.toronto.edu/~kriz/"


@dataclass(frozen=True)
class CifarSpec:
    name: str
    archive: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str


CIFAR10 = CifarSpec(
    name="cifar10",
    archive="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
)
CIFAR100 = CifarSpec(
    name="cifar100",
    archive="cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
)


def locate(spec: CifarSpec, root: Path, download: bool) -> Path:
    """The extracted folder of ``spec`` under ``root``, extracting or downloading the archive if needed."""
    if (root / spec.meta_file).exists():  # root is the extracted folder itself
        return root
    folder = root / spec.folder
    if folder.is_dir():
        return folder
    archive = root / spec.archive
    if archive.exists():
        fetch.check_md5(archive, spec.md5)
    elif download:
        fetch.download(URL + spec.archive, archive, spec.md5)
    else:
        raise NormlabError(
            f"{spec.name} not found under {root} (looked for {spec.folder}/ and {spec.archive}); pass "
            f"download=True (CLI: --download) to fetch it from {URL}, or root= (CLI: --data-root) to point "
            "at a folder that holds it"
        )
    return extract(archive, root, spec.folder)


def extract(archive: Path, root: Path, folder: str) -> Path:
    """Extract ``archive`` into ``root`` through a temporary folder, so ``root/folder`` appears complete
    or not at all."""
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        with tarfile.open(archive, "r:gz") as tar:
            safe_extract(tar, Path(tmp))
        if not (Path(tmp) / folder).is_dir():
            raise NormlabError(
                f"{archive} does not contain the folder {folder}/; is it the official archive?"
            )
        (Path(tmp) / folder).rename(root / folder)
    return root / folder


def safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract regular files and folders only, never outside ``dest`` (tarfile's "data" filter where this
    Python has it, 3.10.12+; the same checks by hand otherwise)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or root not in (target, *target.parents):
            raise NormlabError(
                f"refusing to extract {member.name!r}: not a plain file inside the archive's folder"
            )
    tar.extractall(dest)


# The globals the official batch and meta files reference: numpy's array reconstructor, ndarray, dtype.
# ``np.ndarray.__reduce__`` names the reconstructor this numpy pickles with (numpy.core or numpy._core).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes (protocol 2), limited to the latin-1 codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class BatchUnpickler(pickle.Unpickler):
    """An unpickler for the CIFAR python batches that resolves only numpy's array/dtype reconstruction.

    Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) raises
    :class:`pickle.UnpicklingError`, so a crafted file fails before it can call anything.
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_batch(path: Path) -> dict:
    """Unpickle one CIFAR batch/meta file with :class:`BatchUnpickler`.

    Raises:
        NormlabError: the file is not a pickled dict of the allowed content (the message names the file).
    """
    refuse_special(path, "CIFAR batch file")
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise NormlabError(f"{path} is not an official CIFAR batch file; refusing it ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as exc:
        raise NormlabError(f"{path} is not a readable CIFAR batch file ({type(exc).__name__})") from None
    if not isinstance(batch, dict):
        raise NormlabError(f"{path} is not a CIFAR batch file: it holds a {type(batch).__name__}")
    return batch


def read_batches(folder: Path, files: tuple[str, ...], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the pickled batches: data rows (N, 3072) uint8, the R, G, B planes of 32x32 pixels,
    become (N, 3, 32, 32)."""
    xs, ys = [], []
    for name in files:
        path = folder / name
        if not path.exists():
            raise NormlabError(
                f"{path} is missing; the folder {folder} is incomplete, delete it and extract again"
            )
        batch = load_batch(path)
        data, labels = batch.get(b"data"), batch.get(label_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
            raise NormlabError(
                f"{path} is not a CIFAR batch file: {b'data'!r} must be a uint8 array of shape (N, 3072)"
            )
        try:
            y = np.asarray(labels, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError, OverflowError):  # OverflowError: a label beyond int64 (2**64 - 1)
            y = None
        if y is None or labels is None or len(y) != len(data):
            raise NormlabError(
                f"{path} is not a CIFAR batch file: {label_key!r} must be {len(data)} integer labels"
            )
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def read_label_names(folder: Path, meta_file: str, key: bytes) -> list[str]:
    path = folder / meta_file
    names = load_batch(path).get(key)
    if not isinstance(names, list):
        raise NormlabError(f"{path} is not a CIFAR meta file: {key!r} must be a list of names")
    return [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) standard deviation over N, H, W of x (N, C, H, W), in float64."""
    x64 = x.to(torch.float64)
    return x64.mean(dim=(0, 2, 3)), x64.std(dim=(0, 2, 3), correction=0)


def build(
    spec: CifarSpec,
    root: Path | None,
    download: bool,
    *,
    label_key: bytes,
    names_key: bytes,
    num_classes: int,
    normalize: bool,
) -> Dataset:
    if not isinstance(normalize, bool):
        raise NormlabError(f"normalize must be True or False, got {normalize!r}")
    root = root or default_root()
    if not root.exists() and download:
        root.mkdir(parents=True)
    folder = locate(spec, root, download)
    x_train, y_train = read_batches(folder, spec.train_files, label_key)
    x_test, y_test = read_batches(folder, spec.test_files, label_key)
    xtr = torch.from_numpy(x_train).float().div_(255)
    xte = torch.from_numpy(x_test).float().div_(255)
    meta: dict = {"source": str(folder), "label_names": read_label_names(folder, spec.meta_file, names_key)}
    if normalize:
        mean, std = channel_stats(xtr)
        shift, scale = mean.float().view(1, 3, 1, 1), std.float().view(1, 3, 1, 1)
        xtr.sub_(shift).div_(scale)
        xte.sub_(shift).div_(scale)
        meta.update(mean=mean.tolist(), std=std.tolist())
    return Dataset(
        x_train=xtr,
        y_train=torch.from_numpy(y_train),
        x_test=xte,
        y_test=torch.from_numpy(y_test),
        num_classes=num_classes,
        in_channels=3,
        dims=2,
        task="classification",
        input_shape=(3, 32, 32),
        name=spec.name,
        meta=meta,
    )


@register_dataset("cifar10")
def load_cifar10(root: Path | None, download: bool, *, normalize: bool = True) -> Dataset:
    """CIFAR-10: 50,000 train / 10,000 test 32x32 RGB images, 10 classes."""
    return build(
        CIFAR10,
        root,
        download,
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        normalize=normalize,
    )


@register_dataset("cifar100")
def load_cifar100(
    root: Path | None, download: bool, *, normalize: bool = True, labels: str = "fine"
) -> Dataset:
    """CIFAR-100: 50,000 train / 10,000 test images; ``labels="fine"`` (100 classes) or ``"coarse"`` (20)."""
    if labels not in ("fine", "coarse"):
        raise NormlabError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    return build(
        CIFAR100,
        root,
        download,
        label_key=f"{labels}_labels".encode(),
        names_key=f"{labels}_label_names".encode(),
        num_classes=100 if labels == "fine" else 20,
        normalize=normalize,
    )
