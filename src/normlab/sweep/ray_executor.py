"""``RayExecutor``: sweep runs as Ray tasks, on this machine or a Ray cluster (``--executor ray``).

One Ray task per run, with ``num_cpus`` / ``num_gpus`` per task. Each task trains into a scratch SQLite
file on the worker's local disk (so callbacks that read ``ctx.store`` and probes that write artifacts behave
as in a local run) and sends back the run record, its metric rows and artifacts; the driver alone writes
the results store (SQLite must not be shared over a network file system), giving each run a row that
looks like one trained locally (the driver's clock stamps its start and end times).

A task whose worker dies (killed, out of memory, node lost) is retried by Ray up to ``max_retries`` times;
after that the run is recorded as ``failed`` with Ray's error, and the sweep goes on. A run that fails by
raising is recorded as failed at once (a deterministic failure would fail again). Resuming is
:func:`~normlab.sweep.run_sweep`'s: finished runs in the store are not submitted again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.sweep.worker import CallbacksFactory, failed_result, init_worker, run_config
from normlab.train import RunResult, TrainConfig

CONNECT_TIMEOUT_S = 5.0
RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install 'normlab[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a NormlabError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise NormlabError(RAY_MISSING) from None
    return ray


def check_address(address: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in one line, within ``timeout_s``, when a cluster address's host:port does not answer.

    ``None``, ``"local"`` and ``"auto"`` are not network addresses (a new local instance, or the one
    ``ray start`` left on this machine) and pass. ``ray://host:port`` (Ray Client) and ``host:port`` (the GCS)
    are probed with a TCP connection first: ``ray.init`` itself waits about a minute before giving up.
    """
    if address is None or address in ("local", "auto"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise NormlabError(f"--address {address!r} must be host:port, ray://host:port, auto or local")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise NormlabError(f"cannot reach a Ray cluster at --address {address} ({exc})") from None


class RayExecutor:
    """Runs each submitted config as one Ray task; see the module docstring.

    Args:
        address: Ray cluster to join (``host:port``, ``ray://host:port``, ``auto``); None starts a local
            instance (unless this process already joined one: then that one is used).
        cpus_per_run / gpus_per_run: Ray resources of each task; ``cpus_per_run`` is also the torch thread
            count in the task.
        max_retries: times Ray reruns a task whose worker died before the run is recorded as failed.
        init_options: more ``ray.init`` keyword arguments when this executor starts Ray.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_run: float = 1,
        gpus_per_run: float = 0,
        max_retries: int = 2,
        init_options: dict[str, Any] | None = None,
    ) -> None:
        for name, value, low in (("cpus_per_run", cpus_per_run, 0), ("gpus_per_run", gpus_per_run, 0),
                                 ("max_retries", max_retries, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise NormlabError(f"{name} must be a number >= {low}, got {value!r}")
        if cpus_per_run == 0 and gpus_per_run == 0:
            raise NormlabError("cpus_per_run and gpus_per_run are both 0; a run needs some resource")
        check_address(address)
        self.address = address
        self.cpus_per_run, self.gpus_per_run, self.max_retries = cpus_per_run, gpus_per_run, int(max_retries)
        self._started_ray = False
        with _quiet_connect(address):
            self.ray = import_ray()
            if not self.ray.is_initialized():
                options = {"include_dashboard": False, "log_to_driver": False, **(init_options or {})}
                init_ray(self.ray, address, options)
                self._started_ray = True
        self._task = self.ray.remote(_run_task).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=self.max_retries, retry_exceptions=False
        )
        self._pending: dict[Any, tuple[TrainConfig, Any]] = {}
        try:
            check_fits_cluster(self.ray, cpus_per_run, gpus_per_run)
        except NormlabError:
            self.shutdown()
            raise

    def submit(
        self, config: TrainConfig, callbacks_factory: CallbacksFactory | None = None, *, store: Any = None
    ) -> Any:
        threads = max(1, int(self.cpus_per_run))
        ref = self._task.remote(config.to_dict(), callbacks_factory, threads)
        self._pending[ref] = (config, store)
        return ref

    def results(self) -> Iterator[tuple[TrainConfig, RunResult]]:
        ray = self.ray
        try:
            while self._pending:
                ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=STALL_CHECK_S)
                if not ready:  # Ray waits silently for resources that may never come: say so
                    check_fits_cluster(ray, self.cpus_per_run, self.gpus_per_run)
                    continue
                ref = ready[0]
                config, store = self._pending.pop(ref)
                try:
                    payload = ray.get(ref)
                except Exception as exc:  # the worker died max_retries + 1 times, or the task was cancelled
                    error = f"{type(exc).__name__}: {_first_line(exc)}"
                    yield config, failed_result(config.to_dict(), error, store, None)
                    continue
                yield config, record_payload(payload, store)
        finally:
            for ref in self._pending:
                ray.cancel(ref, force=True)
            self._pending.clear()

    as_completed = results

    def shutdown(self) -> None:
        """Cancel runs not yet finished; stop Ray if this executor started it."""
        for ref in self._pending:
            self.ray.cancel(ref, force=True)
        self._pending.clear()
        if self._started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


STALL_CHECK_S = 30.0  # with no run done for this long, check that a node that fits a run is still alive


def check_fits_cluster(ray: Any, cpus_per_run: float, gpus_per_run: float) -> None:
    """Refuse resources no alive node of the cluster has (``--gpus-per-run 1`` on CPU nodes,
    ``--cpus-per-run 64`` on 2-core ones): Ray would queue such a task for ever, and with
    ``log_to_driver=False`` its "cannot be scheduled" warning never reaches the terminal."""
    try:
        listed = ray.nodes()
    except Exception:  # noqa: BLE001 - a Ray (Client) that cannot list its nodes: nothing to check against
        return
    nodes = [node.get("Resources", {}) for node in listed if node.get("Alive", True)]
    if any(r.get("CPU", 0) >= cpus_per_run and r.get("GPU", 0) >= gpus_per_run for r in nodes):
        return
    largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    raise NormlabError(
        f"no node of the Ray cluster can run a task of --cpus-per-run {cpus_per_run:g} --gpus-per-run "
        f"{gpus_per_run:g}: {len(nodes)} alive node(s), the largest with {largest.get('CPU', 0):g} CPUs and "
        f"{largest.get('GPU', 0):g} GPUs; lower them or add nodes"
    )


def init_ray(ray: Any, address: str | None, options: dict[str, Any]) -> None:
    """``ray.init``; a cluster that cannot be joined is a one-line NormlabError."""
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        raise NormlabError(f"cannot join a Ray cluster at --address {address}: {_first_line(exc)}") from None


@contextlib.contextmanager
def _quiet_connect(address: str | None) -> Iterator[None]:
    """While joining ``address``: give up on an endpoint that answers but is no Ray cluster after
    CONNECT_TIMEOUT_S tries, one a second (Ray's default is ~20; Ray's C++ client still logs a warning per
    try before normlab's one-line error). A user's own setting of the variable wins."""
    quiet = {"RAY_gcs_server_port_wait_time_s": str(int(CONNECT_TIMEOUT_S))}
    saved = {k: os.environ.get(k) for k in quiet}
    if address not in (None, "local"):
        for k, v in quiet.items():
            os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_task(config: dict[str, Any], callbacks_factory: CallbacksFactory | None, threads: int) -> dict:
    """In the Ray worker: train into a scratch store and return what the driver records (plain values)."""
    from normlab.store import Store

    init_worker(threads)
    _remove_orphans()
    folder = tempfile.mkdtemp(prefix=f"normlab-ray-{os.getpid()}-")
    try:
        path = f"{folder}/run.sqlite"
        result = run_config(config, path, callbacks_factory)
        with Store(path) as scratch:
            runs = scratch.runs()
            run = runs[-1].to_dict() if runs else None
            rows = scratch.metric_rows()
            artifacts = [(a.path, a.kind, a.payload) for a in scratch.artifacts(runs[-1].id)] if runs else []
        return {"result": result.to_dict(), "run": run, "metrics": [(s, n, v) for _, s, n, v in rows],
                "artifacts": artifacts}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_orphans() -> None:
    """Delete scratch folders of workers that died mid-run (killed tasks never reach their cleanup)."""
    for folder in Path(tempfile.gettempdir()).glob("normlab-ray-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_payload(payload: dict[str, Any], store: Any) -> RunResult:
    """Write a task's run, metrics and artifacts into the driver's ``store``; the RunResult with its id."""
    result = RunResult.from_dict(payload["result"])
    run = payload["run"]
    if store is None or run is None:
        result.run_id = None
        return result
    run_id = store.start_run(run["config"], key=run["config_key"], name=run["name"], group=run["group"],
                             environment=run["environment"])
    store.log_metric_rows((run_id, step, name, value) for step, name, value in payload["metrics"])
    for path, kind, data in payload["artifacts"]:
        store.add_artifact(run_id, path, kind, data)
    status = run["status"] if run["status"] != "running" else "failed"
    store.finish_run(run_id, status, summary=run["summary"], error=run["error"], wall_time=run["wall_time"])
    result.run_id = run_id
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
