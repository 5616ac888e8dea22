"""``--log`` / ``--log-dir`` of ``train``, ``compare`` and ``study``: the trackers of :mod:`normlab.track`."""

from __future__ import annotations

from normlab.cli._common import check_folder_target, console

LOG_HELP = ("send the runs to an experiment tracker (repeatable): tensorboard, mlflow (a local SQLite "
            "store, or $MLFLOW_TRACKING_URI), wandb (offline unless $WANDB_MODE)")
LOG_DIR_HELP = "folder of the trackers' files: LOG_DIR/tensorboard, LOG_DIR/mlflow, LOG_DIR/wandb"
DEFAULT_LOG_DIR = "normlab-results/logs"

def check_trackers(kinds: list[str] | None, log_dir: str) -> None:
    """Before anything trains: each tracker is known and installed, ``log_dir`` can be written."""
    if not kinds:
        return
    from normlab.track.base import PACKAGES, require

    for kind in kinds:
        if kind not in PACKAGES:
            from normlab.errors import NormlabError

            raise NormlabError(f"--log {kind!r} is not a tracker; valid: {', '.join(PACKAGES)}")
        require(kind)
    check_folder_target(log_dir, "--log-dir")


def open_cli_trackers(kinds: list[str] | None, log_dir: str) -> list:
    """The trackers of ``--log`` (checked by :func:`check_trackers`), writing under ``log_dir``."""
    if not kinds:
        return []
    from normlab.track import open_trackers

    return open_trackers(kinds, log_dir)


def close_trackers(trackers: list) -> None:
    for tracker in trackers:
        tracker.close()


def print_trackers(trackers: list) -> None:
    """How to look at what each tracker wrote."""
    for tracker in trackers:
        console().print(f"{tracker.kind}: {tracker.view()}", soft_wrap=True, markup=False)
