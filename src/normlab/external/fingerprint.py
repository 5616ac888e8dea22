"""Fingerprints of a model's code and of a data set's content, for the run key (``TrainConfig.key``).

A stored result may be reused only for the same computation. For a registered model and a built-in data set
the config's plain values say everything; for a model or data from the user they do not, so the key also
holds:

- **model**: SHA-256 of the spec and of the source file it names (the ``.py`` file, or the module's file
  found on ``sys.path`` without importing anything). Editing that file changes the key. Code the file
  imports from *other* files is not covered (documented in ``docs/external.md``).
- **data** (``npz:FILE``): SHA-256 of the file's bytes, i.e. of the arrays it holds.
- **data** (folders, ``imagefolder``): the absolute root, and every file under it with its relative path,
  size and modification time (``os.stat``; no image is decoded); adding, removing, replacing or touching a
  file changes the key.
- **data** (``torch:NAME``, torch Datasets registered from Python): the registration's fingerprint
  (:func:`normlab.data.torch_data.torch_data_fingerprint`).

File hashes are cached per process by ``(path, size, mtime_ns, ctime_ns)``, so asking for a key many times in
a sweep reads a big array file once.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from normlab.external.spec import split_spec

_CHUNK = 1 << 20
_FILE_HASHES: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (cached by path, size and times)."""
    path = Path(path).resolve()
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if cache_key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        _FILE_HASHES[cache_key] = digest.hexdigest()
    return _FILE_HASHES[cache_key]


def folder_fingerprint(root: str | os.PathLike) -> str:
    """SHA-256 over the absolute root and ``(relative path, size, mtime_ns)`` of every file below it."""
    root = Path(root).expanduser().resolve()
    digest = hashlib.sha256(str(root).encode())
    if not root.is_dir():
        return digest.hexdigest() + "-missing"
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:
                continue
            line = f"\0{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}"
            digest.update(line.encode())
    return digest.hexdigest()


def locate_module_file(module: str) -> Path | None:
    """The source file of ``module`` found on ``sys.path`` without importing it (or its packages)."""
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__file__", None):
        return Path(loaded.__file__)
    parts = module.split(".")
    for entry in sys.path:
        base = Path(entry or os.getcwd()).joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def model_fingerprint(spec: str) -> str:
    """SHA-256 (16 hex digits) of ``spec`` and the bytes of the file it names (``missing`` if none)."""
    where, _ = split_spec(spec)
    path = Path(where).expanduser() if where.endswith(".py") else locate_module_file(where)
    content = file_sha256(path) if path is not None and path.is_file() else "missing"
    return hashlib.sha256(f"{spec}\0{content}".encode()).hexdigest()[:16]


def data_fingerprint(dataset: str, root: str | None) -> str | None:
    """Fingerprint of user data: ``npz:FILE`` -> its content hash; ``imagefolder`` ->
    :func:`folder_fingerprint` of ``root``; None for built-in data sets
    (their name and options determine them)."""
    if dataset.startswith("npz:"):
        path = Path(dataset[len("npz:"):]).expanduser()
        return file_sha256(path)[:16] if path.is_file() else None
    if dataset.startswith("torch:"):
        from normlab.data.torch_data import torch_data_fingerprint

        return torch_data_fingerprint(dataset)
    if dataset == "imagefolder" and root is not None:
        return folder_fingerprint(root)[:16]
    return None
