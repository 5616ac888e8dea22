"""Checkpoints: everything a run needs to continue bit-for-bit, written atomically.

A checkpoint is written to a temporary file of its own (``.<file>.<random>.tmp`` in the same folder, so two
processes saving the same checkpoint never write into one temp file) and moved over ``<file>`` with
``os.replace`` (:func:`normlab.files.atomic_open`: atomic on POSIX and Windows, a link at ``<file>`` is
replaced, never written through): a crash while saving leaves the previous checkpoint intact, and
a failed write (a full disk) removes its temp file before the error is raised. It is read with
``torch.load(weights_only=True)``: only tensors and plain containers, no arbitrary pickled code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.errors import NormlabError
from normlab.files import atomic_open, refuse_special

FORMAT = "normlab-checkpoint"
VERSION = 1


def checkpoint_file(config: Any) -> Path | None:
    """``<checkpoint_dir>/<config key>.pt``: one file per distinct run, so sweeps can share a folder."""
    if config.checkpoint_dir is None:
        return None
    return Path(config.checkpoint_dir) / f"{config.key()}.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (plus format tag and version) to ``path`` atomically."""
    path = Path(path)
    if path.is_dir():
        raise NormlabError(f"checkpoint path {str(path)!r} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    except OSError as exc:
        raise NormlabError(f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else raises NormlabError naming it."""
    path = Path(path)
    if path.is_dir():
        raise NormlabError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file")
    refuse_special(path, "checkpoint")
    if not path.is_file():
        raise NormlabError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (pickle, zip, runtime) for a damaged file
        # torch's messages run over many lines of advice; one line is enough to say what went wrong.
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        raise NormlabError(
            f"checkpoint {str(path)!r} is corrupt or not a checkpoint ({type(exc).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise NormlabError(f"checkpoint {str(path)!r} is not a normlab checkpoint")
    if state.get("version") != VERSION:
        raise NormlabError(
            f"checkpoint {str(path)!r} has format version {state.get('version')!r}; normlab reads {VERSION}"
        )
    return state


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
