"""Start N training processes on this machine the way ``torchrun --standalone --nproc-per-node N`` does:
spawned (not forked) processes, each with ``MASTER_ADDR=127.0.0.1`` (loopback only), ``MASTER_PORT`` (a
free port), ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE`` in its environment, so
``torch.distributed.init_process_group("env://")`` works in each of them.

:func:`launch` returns every rank's return value; when a rank raises, the others are stopped and the error
comes back here in one line (a :class:`NormlabError` stays one, so the CLI exits 2).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from multiprocessing import get_context
from typing import Any

from normlab.errors import NormlabError

LOOPBACK = "127.0.0.1"
# Beyond this many processes per machine gloo's all-reduce costs more than the extra replicas give.
MAX_PROCS = 64


def free_port() -> int:
    """A TCP port on the loopback interface that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def max_procs(device: str = "cpu") -> int:
    """How many replicas ``--nproc`` may ask for: the GPUs for a CUDA device, else the usable cores."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.device_count()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return min(cores, MAX_PROCS)


def check_nproc(nproc: int, device: str = "cpu") -> int:
    """``nproc`` if this machine can run that many replicas, else a NormlabError naming the limit."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise NormlabError(f"--nproc must be a positive int, got {nproc!r}")
    cap = max_procs(device)
    if nproc > cap:
        what = "CUDA devices" if device.startswith("cuda") else "cores"
        raise NormlabError(f"--nproc {nproc} is more than the {cap} {what} available here (one process each)")
    return nproc


def launch(fn: Callable[..., Any], nproc: int, args: tuple = (), *, threads: int = 1,
           timeout_s: float | None = None) -> list[Any]:
    """Run ``fn(*args)`` in ``nproc`` spawned processes (torchrun's environment) and return the results in
    rank order. ``fn`` must be a module-level function; ``threads``: torch threads per process."""
    ctx = get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_bootstrap, args=(fn, args, rank, nproc, port, threads, results), daemon=True)
        for rank in range(nproc)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, Any] = {}
    try:
        waited = 0.0
        while len(outcome) < nproc:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                waited += 1.0
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in outcome]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}") from None
                if timeout_s is not None and waited > timeout_s:
                    raise RuntimeError(f"data-parallel run took more than {timeout_s:g} s") from None
                continue
            if not ok:
                kind, message = value
                if kind == "NormlabError":
                    raise NormlabError(message)
                raise RuntimeError(f"rank {rank}: {kind}: {message}")
            outcome[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10 if len(outcome) == nproc else 0.5)
            if p.is_alive():
                p.terminate()
                p.join()
    return [outcome[r] for r in range(nproc)]


def _bootstrap(fn, args, rank: int, world: int, port: int, threads: int, results) -> None:
    os.environ.update(
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads),
    )
    import torch

    torch.set_num_threads(threads)
    try:
        value = fn(*args)
    except BaseException as exc:  # reported to the launcher, which stops the other ranks
        message = str(exc) if isinstance(exc, NormlabError) else f"{exc}\n{traceback.format_exc()}"
        results.put((rank, False, (type(exc).__name__, message)))
        raise SystemExit(1) from None
    # Plain pickle: torch's queue reductions would pass tensors as shared memory owned by this process,
    # which exits now.
    results.put((rank, True, pickle.dumps(value)))
