"""Where sweep commands (``compare``, ``study``) run their training: the ``--executor`` options."""

from __future__ import annotations

from typing import Any

from normlab.errors import NormlabError

EXECUTORS = ("local", "ray")
EXECUTOR_HELP = "local (process pool on this machine) or ray (Ray tasks; pip install 'normlab[ray]')"
ADDRESS_HELP = "Ray cluster to join (host:port, ray://host:port or auto); default: start Ray locally"
CPUS_HELP = "Ray: CPUs per run (also its torch threads)"
GPUS_HELP = "Ray: GPUs per run"


def make_executor(kind: str, workers: int | None, *, address: str | None = None, cpus_per_run: float = 1,
                  gpus_per_run: float = 0, threads: int | None = None) -> Any:
    """A :class:`LocalPoolExecutor` (``local``; ``workers == 1`` gives None: in this process) with
    ``threads`` torch threads per worker (None: cores / workers), or a
    :class:`~normlab.sweep.ray_executor.RayExecutor`; bad values raise NormlabError."""
    if kind not in EXECUTORS:
        raise NormlabError(f"unknown --executor {kind!r}; valid: {', '.join(EXECUTORS)}")
    if kind == "local":
        if address is not None:
            raise NormlabError("--address needs --executor ray")
        if workers == 1:
            return None
        from normlab.sweep import LocalPoolExecutor

        return LocalPoolExecutor(workers, threads_per_worker=threads)
    from normlab.sweep.ray_executor import RayExecutor

    return RayExecutor(address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
