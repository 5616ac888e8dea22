"""RayExecutor on a local Ray instance started here (``ray.init(num_cpus=2)``): results and stored rows as a
local sweep's, resume from the store, a worker killed mid-run (retried, then recorded as failed), and the
CLI's bad input (Ray missing, unreachable address) as one line with exit 2."""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import pytest
from _cli import cli

from normlab.store import Store
from normlab.sweep import InlineExecutor, run_sweep
from normlab.train import TrainConfig

TINY = dict(subset=256, batch_size=32, steps=6, width=4, log_every=2, eval_train_samples=64)


def _configs() -> list[TrainConfig]:
    return [TrainConfig(norm=norm, seed=seed, **TINY) for norm, seed in (("bn", 0), ("gn", 1))]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    # The Ray workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 1024**2,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _rows(store: Store) -> dict:
    return {
        (r.config_key, r.status): (
            {k: v for k, v in r.summary.items() if k not in ("wall_time", "steps_per_s")},
            [(s, n, v) for _, s, n, v in store.metric_rows([r.id])],
        )
        for r in store.runs()
    }


def test_ray_sweep_stores_what_a_local_sweep_stores_and_resumes(ray_local, tmp_path):
    from normlab.sweep.ray_executor import RayExecutor

    executor = RayExecutor(cpus_per_run=1)
    with Store(tmp_path / "ray.sqlite") as ray_db, Store(tmp_path / "local.sqlite") as local_db:
        got = run_sweep(_configs(), ray_db, executor)
        # One run at a time, as Ray trains them: batched members equal their runs only to float tolerance.
        ref = run_sweep(_configs(), local_db, InlineExecutor(), batch=False)
        assert [r.status for r in got] == ["finished"] * 2
        # Same summaries (but timing) and the same metric rows, step by step, as training in this process.
        assert _rows(ray_db) == _rows(local_db)
        assert [r.final_test_loss for r in got] == [r.final_test_loss for r in ref]
        assert {r.run_id for r in got} == {r.id for r in ray_db.runs()}
        assert ray_db.runs()[0].environment["torch"] == local_db.runs()[0].environment["torch"]
        # Rerun: everything is read back from the store, nothing is submitted.
        again = run_sweep(_configs(), ray_db, executor)
        assert [r.run_id for r in again] == [r.run_id for r in got] and len(ray_db.runs()) == 2


def _kill_callbacks(folder: str, config: TrainConfig) -> list:
    """``kill-N``: the worker training this run SIGKILLs itself at step 2 on its first N attempts."""
    if not (config.name or "").startswith("kill-"):
        return []
    times = int(config.name.split("-")[1])

    def maybe_die(ctx) -> None:
        attempts = sorted(Path(folder).glob(f"{config.name}.*"))
        if len(attempts) < times:
            Path(folder, f"{config.name}.{len(attempts)}").touch()
            os.kill(os.getpid(), signal.SIGKILL)

    return [(maybe_die, 2)]


def test_killed_worker_is_retried_then_recorded_as_failed(ray_local, tmp_path):
    from normlab.sweep.ray_executor import RayExecutor

    configs = [TrainConfig(name="kill-1", **TINY), TrainConfig(name="kill-9", norm="gn", **TINY)]
    executor = RayExecutor(cpus_per_run=1, max_retries=1)
    factory = functools.partial(_kill_callbacks, str(tmp_path))
    with Store(tmp_path / "ray.sqlite") as db:
        once, always = run_sweep(configs, db, executor, callbacks_factory=factory)
        # Killed once, retried once: the second attempt finished, and only it was recorded.
        assert once.status == "finished" and once.steps == 6
        assert len(list(tmp_path.glob("kill-1.*"))) == 1
        # Killed on every attempt: 1 + max_retries attempts, then a failed run in the store.
        assert always.status == "failed" and "WorkerCrashedError" in always.error
        assert len(list(tmp_path.glob("kill-9.*"))) == 2
        runs = {r.name: r for r in db.runs()}
        assert len(runs) == 2 and runs["kill-1"].status == "finished" and runs["kill-9"].status == "failed"
        assert "WorkerCrashedError" in runs["kill-9"].error
        assert [n for _, _, n, _ in db.metric_rows([runs["kill-1"].id])].count("train/loss") == 3
    # The killed attempts' scratch folders were removed by the next task on this machine.
    import tempfile

    run_sweep([TrainConfig(seed=5, **TINY)], None, executor)
    assert not [f for f in Path(tempfile.gettempdir()).glob("normlab-ray-*-*") if not _pid_alive(f)]


def _pid_alive(folder: Path) -> bool:
    pid = folder.name.split("-")[2]
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    return True




COMPARE = ["compare", "--norms", "bn", "--batch-sizes", "32", "--lrs", "0.1", "--seeds", "1", "--epochs", "1",
           "--subset", "64", "--width", "4", "--lr-extensions", "0", "--no-report"]  # fmt: skip


def test_executor_ray_without_ray_installed_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    db = tmp_path / "r.sqlite"
    code, _, err = cli(capsys, *COMPARE, "--executor", "ray", "--store", str(db))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--executor ray needs Ray, which is not installed: pip install 'normlab[ray]'" in err
    assert not db.exists()
    code, _, err = cli(capsys, "study", "small-batch", "--scale", "tiny", "--executor", "ray",
                       "--out", str(tmp_path / "out"))
    assert code == 2 and "pip install 'normlab[ray]'" in err


@pytest.mark.parametrize(
    "address, message",
    [
        ("127.0.0.1:1", "cannot reach a Ray cluster at --address 127.0.0.1:1"),
        ("ray://127.0.0.1:1", "cannot reach a Ray cluster at --address ray://127.0.0.1:1"),
        ("nowhere", "--address 'nowhere' must be host:port, ray://host:port, auto or local"),
    ],
)
def test_unreachable_address_is_one_line_exit_2(capsys, tmp_path, address, message):
    pytest.importorskip("ray")
    db = tmp_path / "r.sqlite"
    code, _, err = cli(capsys, *COMPARE, "--executor", "ray", "--address", address, "--store", str(db))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not db.exists()


def test_address_without_ray_executor_is_refused(capsys, tmp_path):
    code, _, err = cli(capsys, *COMPARE, "--address", "127.0.0.1:6379", "--store", str(tmp_path / "r.sqlite"))
    assert code == 2 and "--address needs --executor ray" in err


def test_compare_cli_on_ray(ray_local, capsys, tmp_path):
    import json

    db = tmp_path / "r.sqlite"
    args = ["--executor", "ray", "--cpus-per-run", "1", "--store", str(db), "--json"]
    code, out, err = cli(capsys, *COMPARE, *args)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["statuses"] == {"finished": 1, "diverged": 0, "failed": 0}
    with Store(db) as store:
        (run,) = store.runs()
        assert run.status == "finished" and store.metric_names(run.id)
    assert ray_local.is_initialized()  # the CLI joined the running instance and left it running


def test_a_cluster_that_cannot_be_joined_is_one_line():
    from normlab.errors import NormlabError
    from normlab.sweep.ray_executor import init_ray

    class NoCluster:
        @staticmethod
        def init(address, **options):
            raise ConnectionError(f"Failed to connect to Ray cluster at {address}\nmore detail")

    with pytest.raises(NormlabError) as err:
        init_ray(NoCluster, "10.0.0.1:6379", {})
    assert str(err.value) == ("cannot join a Ray cluster at --address 10.0.0.1:6379: Failed to connect to "
                              "Ray cluster at 10.0.0.1:6379")
