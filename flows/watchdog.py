"""Everything a process starts is stopped when that process dies, even by SIGKILL.

    stop_with_this_process()      # returns at once; a watchdog process now watches this one

`opd run` and `opd stage` call it first thing (flows/cli.py). What such a driver starts
outlives a SIGKILL otherwise: Prefect's temporary server (Prefect stops it in an `atexit`
hook, which a killed process never runs), the teacher and rollout servers (each in its own
session), and the helpers of a local Ray cluster (Ray's dashboard and runtime-env agents
stay up after the driver, its raylet and its GCS are gone: measured, still there 40 s
later).

The watchdog is a small child process. It holds the read end of a pipe whose only write end
stays in the driver; the kernel closes that end when the driver exits, however it exits, so
the watchdog's wait on it ends at once (a pipe rather than polling the parent pid: nothing is
missed between polls and a reused pid cannot fool it). While it waits, it notes the driver's
descendants every POLL_S seconds; once the driver is gone it stops each noted process that
still runs, and its children (SIGTERM, SIGKILL after GRACE_S). Processes are held as
psutil.Process objects, whose signals check the start time, so a reused pid is never
signalled. The pipe's write end is not inherited by the driver's children (Python's fds are
non-inheritable), so they do not keep the watchdog waiting. It imports only the standard
library and psutil, and exits when it is done.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from pathlib import Path

import psutil

POLL_S = 0.5
GRACE_S = 5.0
_write_ends: list[int] = []  # open until this process exits: their closing is the signal


def stop_with_this_process() -> subprocess.Popen:
    """Start a watchdog that stops this process's descendants when this process exits."""
    read_end, write_end = os.pipe()
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "flows.watchdog", str(read_end), str(os.getpid())],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": path},
        start_new_session=True,  # a Ctrl-C to the terminal's group stops the driver, not this
    )
    os.close(read_end)
    _write_ends.append(write_end)
    return watchdog


def _note_descendants(parent: psutil.Process, noted: dict[int, psutil.Process]) -> None:
    """Add `parent`'s descendants to `noted`, and forget the ones that have ended."""
    with contextlib.suppress(psutil.Error):
        for child in parent.children(recursive=True):
            noted.setdefault(child.pid, child)
    for pid, process in list(noted.items()):
        if not process.is_running():
            del noted[pid]


def _stop(processes: list[psutil.Process]) -> None:
    """SIGTERM each process and its children, SIGKILL what is left after GRACE_S."""
    everything: dict[int, psutil.Process] = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            for child in [*process.children(recursive=True), process]:
                everything.setdefault(child.pid, child)
    for process in everything.values():
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(everything.values()), timeout=GRACE_S)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def main(argv: list[str]) -> None:
    read_end, parent = int(argv[0]), psutil.Process(int(argv[1]))
    me = os.getpid()
    noted: dict[int, psutil.Process] = {}
    while True:
        ready, _, _ = select.select([read_end], [], [], POLL_S)
        if ready and not os.read(read_end, 1):  # EOF: every write end closed, the driver is gone
            break
        _note_descendants(parent, noted)
    noted.pop(me, None)
    _stop(list(noted.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
