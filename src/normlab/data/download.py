"""Download a file with checksum verification: stream to ``<dest>.part`` while hashing, check the MD5,
then rename into place, so an interrupted or corrupted download never leaves a file that looks complete."""

from __future__ import annotations

import hashlib
import sys
import urllib.request
from pathlib import Path

from normlab.errors import NormlabError
from normlab.files import atomic_open

CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    """Hex MD5 of the file at ``path``."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(path: Path, expected: str) -> None:
    """Raise NormlabError if ``path``'s MD5 is not ``expected``."""
    got = md5sum(path)
    if got != expected:
        raise NormlabError(
            f"checksum mismatch for {path}: md5 {got}, expected {expected}; the file is corrupt or not the "
            "official archive: delete it and download again (download=True / --download)"
        )


def download(url: str, dest: Path, md5: str, *, progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` (atomically) and verify its MD5; return ``dest``.

    Raises:
        NormlabError: the download failed or its MD5 differs from ``md5`` (the partial file is removed).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5(usedforsecurity=False)
    try:  # atomic_open: the temp file is moved over dest only if the block ends without an error
        with urllib.request.urlopen(url) as response, atomic_open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            with _Progress(dest.name, total, enabled=progress) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.advance(len(chunk))
            got = digest.hexdigest()
            if got != md5:
                raise NormlabError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; nothing saved")
    except OSError as exc:
        raise NormlabError(f"could not download {url}: {exc}") from exc
    return dest


class _Progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise (logs, tests)."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        self.name, self.total = name, total
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            self._progress = Progress(
                *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn()
            )
            self._progress.start()
            self._task = self._progress.add_task(f"downloading {self.name}", total=self.total or None)
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
