"""Pool workers end with their parent: a killed ``compare`` (kill -9, a closed terminal) must not leave
its workers training for minutes, holding cores and writing ``running`` rows.

:func:`exit_with_parent` runs in each worker's initializer. It starts a daemon thread that polls
``os.getppid()``: when the parent dies the worker is re-parented (to init or a subreaper), its parent pid
changes, and the thread ends the worker with ``os._exit``. Polling works on every POSIX system and needs
no signal from the dying parent (which cannot send one after SIGKILL). The run the worker was training is
left ``running`` in the store; the next sweep on that store takes it over (its claim's owner is dead).
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5
EXIT_CODE = 70  # EX_SOFTWARE: distinguishable from a crash in a worker's exit status


def exit_with_parent(parent_pid: int, poll_s: float = POLL_S) -> None:
    """End this process (``os._exit``) as soon as its parent ``parent_pid`` is gone."""
    if os.name != "posix":  # Windows pools end their workers through the job object of the parent
        return
    if os.getppid() != parent_pid:
        os._exit(EXIT_CODE)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(EXIT_CODE)

    threading.Thread(target=watch, name="normlab-parent-watchdog", daemon=True).start()
