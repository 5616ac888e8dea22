"""ImageNet-style image folders: ``root/train/<class>/*.{png,jpg,jpeg}`` and ``root/val/<class>/...``,
loaded with PIL into memory.

Split: with ``test_fraction=None`` (default) the test split is ``val/``. With ``test_fraction=f`` in (0, 1)
the test split is held out of the training images instead: ``root/train/<class>/`` (or ``root/<class>/``
when there is no ``train/`` folder), per class the first ``round(f * n)`` images of a permutation seeded
by 0 (stratified and the same for every run seed, so seeds compare on one test set); ``val/`` is not read.

Each image is converted to RGB, its shorter side resized to ``image_size`` (bilinear) and the centre
``image_size x image_size`` square cropped (the standard ImageNet evaluation transform, which keeps the
aspect ratio), scaled to [0, 1] and normalized per channel with the training split's mean and standard
deviation. Classes are the sorted folder names of ``train/``; y indexes them.

A data folder is untrusted: a file that is not an image, a truncated one, or one larger than
``MAX_PIXELS`` (read from the header, before anything is decoded: a small PNG can claim a gigapixel) is
refused with a one-line NormlabError naming it. Only regular files and folders inside the folder are read:
a link (to a file or a whole class folder, in or out of the folder), a FIFO or a device named ``*.png`` is
skipped, with one note on stderr naming what was skipped (a FIFO would block the reader, a link would pull
in files from elsewhere). The images must fit in memory, checked before any is decoded (``image_size``
squared is what each one costs), and there must be at least two classes.
"""

from __future__ import annotations

import os
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from normlab.data.cifar import channel_stats
from normlab.data.dataset import Dataset, register_dataset
from normlab.errors import NormlabError

EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (a 9459 x 9459 image, ~256 MB as RGB)
SPLITS = ("train", "val")


def list_images(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(path, class index) of every image in ``split_dir/<class>/``, in sorted order: regular files only
    (links, FIFOs and devices are skipped with a note, :func:`class_folders`)."""
    items, skipped = [], []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        if not _is_real(class_dir, stat.S_ISDIR):
            continue
        for p in sorted(class_dir.iterdir()):
            if p.suffix.lower() not in EXTENSIONS:
                continue
            if _is_real(p, stat.S_ISREG):
                items.append((p, index))
            else:
                skipped.append(p)
    _note_skipped(split_dir, skipped)
    return items


def class_folders(base: Path) -> list[str]:
    """The sorted names of the class folders under ``base``; a link to a folder is skipped with a note."""
    names, skipped = [], []
    for p in sorted(base.iterdir()):
        if _is_real(p, stat.S_ISDIR):
            names.append(p.name)
        elif p.is_dir():
            skipped.append(p)
    _note_skipped(base, skipped)
    return names


def _is_real(path: Path, kind) -> bool:
    """``path`` itself (not what a link at it points to) is of ``kind`` (``stat.S_ISREG`` / ``S_ISDIR``)."""
    try:
        return kind(os.lstat(path).st_mode)
    except OSError:
        return False


def _note_skipped(folder: Path, skipped: list[Path]) -> None:
    if not skipped:
        return
    shown = ", ".join(f"{p.name} ({_what(p)})" for p in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    note = (f"note: skipped {len(skipped)} entries of {folder} that are not regular files or folders inside "
            f"it: {shown}{more}")
    if note not in _NOTED:  # once per process: a command may load its data twice (its checks, then training)
        _NOTED.add(note)
        print(note, file=sys.stderr)


_NOTED: set[str] = set()


def _what(path: Path) -> str:
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return "a link"
    return "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"


def check_memory(count: int, size: int, where: Path) -> None:
    """``count`` images of 3 x ``size`` x ``size`` (uint8 while loading, then float32) must fit in RAM."""
    need = count * 3 * size * size * 5
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > ram:
        raise NormlabError(
            f"{count} images of {where} at image_size {size} need about {need / 2**30:.3g} GiB, more than "
            f"this machine's {ram / 2**30:.3g} GiB; use a smaller --image-size"
        )


def load_image(path: Path, size: int) -> np.ndarray:
    """(3, size, size) uint8: RGB, shorter side resized to ``size``, centre-cropped."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise NormlabError(
                        f"image {path} is {w} x {h} = {w * h / 1e6:.0f} megapixels; the limit is "
                        f"{MAX_PIXELS / 1e6:.0f} megapixels (resize it, or remove it from the folder)"
                    )
                return _resize_crop(img.convert("RGB"), size)
    except NormlabError:
        raise
    except Image.DecompressionBombError as exc:  # PIL refuses > 2 x its limit while opening
        raise NormlabError(
            f"image {path} is too large ({exc}); the limit is {MAX_PIXELS / 1e6:.0f} megapixels"
        ) from None
    # PIL reports a damaged file as OSError (truncated), SyntaxError/ValueError (bad chunks) or
    # DecompressionBombError, depending on the format.
    except Exception as exc:
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise NormlabError(f"image {path} cannot be read ({reason}); it is not a valid image") from None


def _resize_crop(img, size: int) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def load_split(split_dir: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = list_images(split_dir, classes)
    if not items:
        raise NormlabError(f"no images ({', '.join(EXTENSIONS)}) under {split_dir}/<class>/")
    return load_items(items, size)


def hold_out(items: list[tuple[Path, int]], fraction: float) -> tuple[list, list]:
    """``(train, test)``: per class, ``round(fraction * n)`` images (at least 1, at most n - 1) to test,
    drawn by a permutation seeded by 0; both lists keep the sorted order."""
    generator = np.random.default_rng(0)
    test: set[Path] = set()
    for label in sorted({label for _, label in items}):
        paths = [path for path, y in items if y == label]
        if len(paths) < 2:
            raise NormlabError(f"class {label} has {len(paths)} image(s); test_fraction needs >= 2 per class")
        count = min(max(1, round(fraction * len(paths))), len(paths) - 1)
        test.update(paths[i] for i in generator.permutation(len(paths))[:count])
    return [it for it in items if it[0] not in test], [it for it in items if it[0] in test]


def load_items(items: list[tuple[Path, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_memory(len(items), size, items[0][0].parent.parent if items else Path("."))
    x = np.stack([load_image(path, size) for path, _ in items])
    y = np.array([label for _, label in items], dtype=np.int64)
    return torch.from_numpy(x).float().div_(255), torch.from_numpy(y)


@register_dataset("imagefolder")
def load_imagefolder(
    root: Path | None,
    download: bool,
    *,
    image_size: int = 64,
    normalize: bool = True,
    test_fraction: float | None = None,
) -> Dataset:
    """Images under ``root/train/<class>/`` and ``root/val/<class>/`` (or a held-out ``test_fraction``, see
    the module docstring); x (N, 3, image_size, image_size)."""
    if root is None:
        raise NormlabError(
            "imagefolder needs root= (CLI: --data-root): a folder with train/<class>/ and val/<class>/"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise NormlabError(f"image_size must be a positive int, got {image_size!r}")
    if test_fraction is not None:
        return _held_out(root, image_size, normalize, test_fraction)
    for split in SPLITS:
        if not (root / split).is_dir():
            raise NormlabError(
                f"{root / split} is not a folder; imagefolder expects {root}/train/<class>/ and val/<class>/"
            )
    classes = _two_classes(class_folders(root / "train"), root / "train")
    extra = sorted(set(class_folders(root / "val")) - set(classes))
    if extra:
        raise NormlabError(f"val/ has classes that train/ lacks: {', '.join(extra)}")
    x_train, y_train = load_split(root / "train", classes, image_size)
    x_test, y_test = load_split(root / "val", classes, image_size)
    return _dataset(root, classes, image_size, normalize, x_train, y_train, x_test, y_test, {})


def _held_out(root: Path, image_size: int, normalize: bool, fraction: float) -> Dataset:
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 1
    if not ok:
        raise NormlabError(f"test_fraction must be a number in (0, 1), got {fraction!r}")
    if not root.is_dir():
        raise NormlabError(f"{root} is not a folder; imagefolder expects {root}/<class>/ or train/<class>/")
    base = root / "train" if (root / "train").is_dir() else root
    classes = _two_classes(class_folders(base), base)
    items = list_images(base, classes)
    if not items:
        raise NormlabError(f"no images ({', '.join(EXTENSIONS)}) under {base}/<class>/")
    train_items, test_items = hold_out(items, float(fraction))
    x_train, y_train = load_items(train_items, image_size)
    x_test, y_test = load_items(test_items, image_size)
    meta = {"test_fraction": float(fraction), "test_files": [str(p.relative_to(base)) for p, _ in test_items]}
    return _dataset(root, classes, image_size, normalize, x_train, y_train, x_test, y_test, meta)


def _two_classes(classes: list[str], base: Path) -> list[str]:
    if not classes:
        raise NormlabError(f"no class folders under {base}")
    if len(classes) < 2:
        raise NormlabError(f"{base} has one class folder ({classes[0]}); classification needs at least 2")
    return classes


def _dataset(root, classes, image_size, normalize, x_train, y_train, x_test, y_test, extra) -> Dataset:
    meta: dict = {"source": str(root), "label_names": classes, **extra}
    if normalize:
        mean, std = channel_stats(x_train)
        shift, scale = mean.float().view(1, 3, 1, 1), std.float().clamp_min(1e-8).view(1, 3, 1, 1)
        x_train.sub_(shift).div_(scale)
        x_test.sub_(shift).div_(scale)
        meta.update(mean=mean.tolist(), std=std.tolist())
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(classes),
        in_channels=3,
        dims=2,
        task="classification",
        input_shape=(3, image_size, image_size),
        name="imagefolder",
        meta=meta,
    )
