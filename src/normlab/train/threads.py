"""How many torch threads a training process uses: workers x threads never exceed the usable cores.

On a shared CPU, intra-op thread pools that together ask for more cores than the process may use spin
against each other: the study VGG dropped from 5.7 to 0.75 steps/s with 2 threads per process next to
another busy process (issue 12). So every entry point (``normlab train``, ``compare``, studies, pool
workers) picks ``max(1, cores // workers)`` threads, where cores are those of ``os.sched_getaffinity``
(a container's or ``taskset``'s limit, not the machine's count); ``--threads`` overrides.
"""

from __future__ import annotations

import os

from normlab.errors import NormlabError


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def fit_threads(workers: int = 1, requested: int | None = None) -> int:
    """Torch threads per process for ``workers`` processes: ``requested`` when given, else
    ``max(1, available_cores() // workers)``."""
    for name, value in (("workers", workers), ("threads", requested)):
        if value is None and name == "threads":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise NormlabError(f"{name} must be a positive int, got {value!r}")
    if requested is not None:
        return requested
    return max(1, available_cores() // workers)


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op torch threads here, and tell nested OpenMP/BLAS pools the same."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
