"""Writing a file without following a link: every file normlab writes (reports, index pages, outcome.json,
figures, exports, checkpoints) goes through :func:`atomic_open` / :func:`atomic_write`.

The bytes go to a new temporary file in the target's own folder (``.<name>.<random>.tmp``, created with
``O_EXCL``, so no link can sit at its name) and are moved over the target with ``os.replace``. A rename
replaces a symlink at the target; it never writes through it, so a ``report.md`` linked to a shell start-up
file is swapped for the report and the file it pointed at is untouched (issue 29). The move is atomic on
POSIX and Windows: a crash mid-write leaves the previous file whole, and a failed write removes its temp file.
The new file gets the permissions a plain ``open(path, "w")`` would give (0666 less the umask).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from normlab.errors import NormlabError

_UMASK: int | None = None


def _file_mode() -> int:
    global _UMASK
    if _UMASK is None:  # os.umask only reads by setting; done once, before any thread writes files
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str = "utf-8",
                newline: str | None = None, devices: bool = False) -> Iterator[IO]:
    """``open(path, mode)`` for writing (``"w"`` or ``"wb"``) that replaces ``path`` only once the block
    ends without an error, and replaces a link at ``path`` instead of writing through it.

    ``devices``: a device or FIFO the user named, or a link to one (``runs export -o /dev/stdout``, a link
    to the process's stdout), is written in place, never replaced.

    Raises:
        NormlabError: ``path`` is a folder.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes with mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise NormlabError(f"{str(path)!r} is a folder; give a file path")
    text = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
    if devices and _is_stream(path):
        with open(path, mode, **text) as out:
            yield out
        return
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode, **text) as stream:
            yield stream
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_stream(path: Path) -> bool:
    """``path`` is a character device or FIFO, or a link to one or to an open file descriptor
    (``/dev/stdout`` -> ``/proc/self/fd/1``, whatever the shell redirected it to): what the user wants
    written, never replaced (replacing ``/dev/stdout`` would turn it into a file for everyone)."""
    hop = path
    for _ in range(40):  # follow the chain by hand: a hop through /proc/<pid>/fd is a descriptor
        if not hop.is_symlink():
            break
        target = Path(os.readlink(hop))
        hop = target if target.is_absolute() else hop.parent / target
        if str(hop).startswith(("/proc/", "/dev/fd/")):
            return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def refuse_special(path: str | os.PathLike, what: str) -> None:
    """Refuse a FIFO, device or socket at ``path`` before it is read: opening a FIFO blocks until someone
    writes to it, so ``open`` would hang (issue 29). A missing path is left for the caller to report."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise NormlabError(f"{what} {str(path)!r} is not a regular file (a FIFO, device or socket)")


def atomic_write(path: str | os.PathLike, data: str | bytes, *, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` through :func:`atomic_open`; returns ``Path(path)``."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", encoding=encoding) as stream:
        stream.write(data)
    return Path(path)
