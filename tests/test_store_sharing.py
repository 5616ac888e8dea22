"""One store, several jobs (issue 15, items 5-8): atomic claims of configs with owner and heartbeat,
take-over from a dead owner, two sweeps training each config once, pool workers ending with their parent,
unique checkpoint temp files, corrupt and read-only stores."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from normlab import files as files_module
from normlab.errors import NormlabError
from normlab.store import Owner, Store
from normlab.sweep import InlineExecutor, run_sweep
from normlab.train import TrainConfig
from normlab.train import checkpoint as checkpoint_module

TINY = dict(subset=128, batch_size=32, steps=4, width=4, log_every=4, eval_train_samples=32)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- claims -------------------------------------------------------------------------------------------


def test_a_claim_is_exclusive_while_its_owner_lives_and_released_on_request(tmp_path):
    with Store(tmp_path / "s.sqlite") as a, Store(tmp_path / "s.sqlite") as b:
        me, other = Owner.this_process(), Owner.this_process()  # same pid, distinct tokens: two holders
        assert a.claim_config("k", me) is True
        assert a.claim_config("k", me) is True  # idempotent for the holder
        assert b.claim_config("k", other) is False
        assert b.claim_holder("k") == me
        a.release_config("k", other)  # another owner's release leaves the claim alone
        assert b.claim_config("k", other) is False
        a.release_config("k", me)
        assert b.claim_holder("k") is None and b.claim_config("k", other) is True


def test_a_dead_owners_claim_is_taken_over_and_its_running_rows_closed(tmp_path):
    with Store(tmp_path / "s.sqlite") as db:
        dead = Owner(Owner.this_process().host, _dead_pid(), "dead")
        assert db.claim_config("k", dead) is True
        stale_run = db.start_run({"x": 1}, key="k", environment={})
        other_run = db.start_run({"x": 2}, key="other", environment={})
        me = Owner.this_process()
        assert db.claim_config("k", me) is True
        run = db.get_run(stale_run)
        assert run.status == "failed" and run.error == f"interrupted: its process {dead} died"
        assert db.get_run(other_run).status == "running"  # only the claimed config's rows
        # A live owner without a heartbeat for longer than stale_after counts as dead too.
        hung = Owner("another-host", 1, "hung")
        db.claim_config("k2", hung)
        assert db.claim_config("k2", me) is False
        assert db.claim_config("k2", me, stale_after=0.0) is True


def test_two_sweeps_on_one_store_train_each_config_once(tmp_path):
    path = tmp_path / "shared.sqlite"
    Store(path).close()
    configs = [TrainConfig(**TINY, seed=s) for s in range(4)]
    results: dict[int, list] = {}

    def sweep(tag: int) -> None:
        with Store(path) as db:
            results[tag] = run_sweep(configs, db, InlineExecutor())

    threads = [threading.Thread(target=sweep, args=(tag,)) for tag in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    with Store(path) as db:
        runs = db.runs()
        assert len(runs) == len(configs)  # 4 trained, not 8
        assert {r.status for r in runs} == {"finished"}
        assert db.claim_holder(configs[0].key()) is None  # claims released at the end
    assert [r.run_id for r in results[0]] == [r.run_id for r in results[1]]
    assert [r.final_test_acc for r in results[0]] == [r.final_test_acc for r in results[1]]


def test_a_sweep_takes_over_a_config_whose_owner_died(tmp_path):
    config = TrainConfig(**TINY)
    with Store(tmp_path / "s.sqlite") as db:
        dead = Owner(Owner.this_process().host, _dead_pid(), "dead")
        db.claim_config(config.key(), dead)
        orphan = db.start_run(config.to_dict(), key=config.key(), environment={})
        (result,) = run_sweep([config], db)
        assert result.status == "finished" and result.run_id != orphan
        assert db.get_run(orphan).status == "failed"
        assert [r.status for r in db.runs(status="running")] == []


@pytest.mark.slow
def test_two_compare_commands_on_one_store_train_each_run_once(tmp_path):
    store = tmp_path / "shared.sqlite"
    argv = [sys.executable, "-m", "normlab", "compare", "--norms", "bn,none", "--batch-sizes", "16",
            "--lrs", "0.1", "--lr-extensions", "0", "--seeds", "2", "--epochs", "1", "--subset", "64",
            "--workers", "1", "--store", str(store), "--no-report", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()
    with Store(store, readonly=True) as db:
        assert len(db.runs()) == 4 and {r.status for r in db.runs()} == {"finished"}


# -- workers end with their parent ----------------------------------------------------------------------

PARENT = textwrap.dedent("""
    import sys, time
    from normlab.sweep import LocalPoolExecutor
    from normlab.train import TrainConfig
    pool = LocalPoolExecutor(workers=2)
    for seed in (0, 1):  # runs for hours unless stopped
        pool.submit(TrainConfig(subset=64, batch_size=16, steps=10**8, width=4, seed=seed, log_every=10**7))
    while len(pool._pool._processes) < 2:
        time.sleep(0.05)
    print(" ".join(str(pid) for pid in pool._pool._processes), flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (exited, not yet reaped by its new parent).
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.slow  # ~10 s: two spawned workers import torch
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_killing_the_parent_ends_its_pool_workers(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "workers outlived their killed parent"
    finally:
        parent.kill()
        for pid in workers if "workers" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- checkpoints ----------------------------------------------------------------------------------------


def test_checkpoint_temp_files_are_unique_and_removed_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "run.pt"
    checkpoint_module.save_checkpoint(target, {"step": 1})
    seen: list[str] = []
    real_save, real_mkstemp = torch.save, files_module.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        seen.append(name)
        return fd, name

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # some bytes reach the temp file first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    for _ in range(2):
        with pytest.raises(NormlabError, match=f"cannot write checkpoint '{target}': No space left on dev"):
            checkpoint_module.save_checkpoint(target, {"step": 2})
    assert len(set(seen)) == 2 and all(Path(name).parent == tmp_path for name in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temp file left behind
    monkeypatch.undo()
    assert checkpoint_module.load_checkpoint(target)["step"] == 1  # the previous checkpoint is intact


def test_checkpoint_path_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "x.pt").mkdir()
    with pytest.raises(NormlabError, match="is a folder"):
        checkpoint_module.save_checkpoint(tmp_path / "x.pt", {})
    with pytest.raises(NormlabError, match="is a folder, not a checkpoint file"):
        checkpoint_module.load_checkpoint(tmp_path / "x.pt")


# -- damaged, read-only and foreign stores ---------------------------------------------------------------


def _filled_store(path: Path, runs: int = 300) -> None:
    with Store(path) as db:
        for i in range(runs):
            db.finish_run(db.start_run({"i": i, "pad": "x" * 300}, environment={}), "finished")
    with sqlite3.connect(path) as conn:  # fold the WAL into the main file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_a_store_with_damaged_pages_is_refused_for_writing_and_left_untouched(tmp_path):
    path = tmp_path / "damaged.sqlite"
    _filled_store(path)
    data = bytearray(path.read_bytes())
    page = 4096
    middle = (len(data) // page // 2) * page
    data[middle + 8 : middle + 200] = os.urandom(192)  # one table page's cells, header intact
    path.write_bytes(bytes(data))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1  # the header still reads
    with pytest.raises(NormlabError, match=f"store '{path}'.*(damaged|malformed)") as info:
        Store(path)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == bytes(data)


def _run_readonly(folder: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with ``folder`` mounted read-only (in a private mount namespace; chmod when not root)."""
    env = {**os.environ, "PYTHONPATH": SRC}
    if os.geteuid() != 0:
        folder.chmod(0o555)
        for f in folder.iterdir():
            f.chmod(0o444)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only folder")
    script = f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$0" -c "$1"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, sys.executable, code], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if "mount" in proc.stderr and proc.returncode != 0 and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount read-only here: {proc.stderr.strip()}")
    return proc


def test_a_store_on_a_read_only_file_system_opens_for_reading(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    _filled_store(folder / "s.sqlite", runs=3)
    before = (folder / "s.sqlite").read_bytes()
    code = textwrap.dedent(f"""
        import sys
        from normlab.cli import main
        from normlab.store import Store
        with Store({str(folder / "s.sqlite")!r}, readonly=True) as db:
            print("runs", len(db.runs()))
        try:
            Store({str(folder / "new.sqlite")!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
        main(["runs", "list", "--store", {str(folder / "s.sqlite")!r}, "--json"])
    """)
    proc = _run_readonly(folder, code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "runs 3"
    assert lines[1].startswith(f"NormlabError cannot open results store '{folder / 'new.sqlite'}'")
    assert '"status": "finished"' in proc.stdout
    assert (folder / "s.sqlite").read_bytes() == before


def test_readers_never_turn_a_file_into_a_store(tmp_path):
    for content in (b"", b"my notes\n"):
        notes = tmp_path / "notes.txt"
        notes.write_bytes(content)
        with pytest.raises(NormlabError, match="(not a normlab results store|not a sound normlab)"):
            Store(notes, readonly=True)
        assert notes.read_bytes() == content
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(NormlabError, match="no results store at"):
        Store(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_read_only_store_refuses_writes_in_one_line(tmp_path):
    _filled_store(tmp_path / "s.sqlite", runs=1)
    db = Store(tmp_path / "s.sqlite", readonly=True)
    with pytest.raises(NormlabError, match="was opened read-only; cannot write to it"):
        db.start_run({"a": 1}, environment={})
    db.close()


def test_a_store_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NormlabError, match="cannot create the folder of store"):
        Store(tmp_path / "afile" / "x.sqlite")


def test_read_only_targets_are_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    targets = [
        ["runs", "export", "-o", f"{folder}/x.csv", "--store", f"{tmp_path}/none.sqlite"],
        ["train", "--checkpoint-dir", f"{folder}/ck", "--steps", "1"],
        ["compare", "--out", f"{folder}/out", "--seeds", "1"],
        ["train", "--store", f"{folder}/s.sqlite", "--steps", "1"],
    ]
    code = textwrap.dedent(f"""
        from normlab.cli import main
        for argv in {targets!r}:
            try:
                main(argv)
            except SystemExit as exc:
                print("exit", exc.code, flush=True)
    """)
    proc = _run_readonly(folder, code)
    assert proc.stdout.splitlines() == ["exit 2"] * 4, proc.stderr
    lines = proc.stderr.splitlines()
    ending = f"cannot be written: '{folder}' is read-only"
    assert len(lines) == 4 and all(line.endswith(ending) for line in lines), lines
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
