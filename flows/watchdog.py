"""Stop processes when the process that started them dies, even by SIGKILL.

    stop_with_this_process([server_pid])      # returns at once; a watchdog process now waits

The watchdog is a small child process holding the read end of a pipe whose only write end
stays in this process. The kernel closes that end when this process exits, however it
exits, so the watchdog's blocking read returns (EOF) at once; it then stops each target
process and its children (SIGTERM, SIGKILL after a grace period). A pipe rather than polling
the parent pid: nothing is missed between polls and a reused pid cannot fool it; and
targets are named by (pid, start time), so a reused pid is never killed. The write end is
not inherited by the children this process starts (Python's fds are non-inheritable), so
they do not keep the watchdog waiting.

`opd run` / `opd stage` use it for Prefect's temporary server (flows/cli.py): Prefect
stops it at exit (atexit), which a killed driver never reaches. The watchdog imports only
the standard library and psutil, and exits once the targets are gone.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil

GRACE_S = 5.0
_write_ends: list[int] = []  # open until this process exits: their closing is the signal


def stop_with_this_process(pids: list[int]) -> subprocess.Popen:
    """Start a watchdog that stops `pids` (and their children) when this process exits."""
    targets = [f"{pid}:{psutil.Process(pid).create_time()!r}" for pid in pids]
    read_end, write_end = os.pipe()
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    }
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "flows.watchdog", str(read_end), *targets],
        pass_fds=(read_end,),
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # a Ctrl-C to the terminal's group stops the driver, not this
    )
    os.close(read_end)
    _write_ends.append(write_end)
    return watchdog


def _stop(targets: list[psutil.Process]) -> None:
    """SIGTERM each target's children and the target, SIGKILL what is left after GRACE_S."""
    processes = []
    for target in targets:
        try:
            processes += [*target.children(recursive=True), target]
        except psutil.Error:
            continue
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=GRACE_S)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _target(spec: str) -> psutil.Process | None:
    """The process `pid:create_time` names, if it is still that process."""
    pid, started = spec.split(":", 1)
    try:
        process = psutil.Process(int(pid))
        return process if repr(process.create_time()) == started else None
    except psutil.Error:
        return None


def main(argv: list[str]) -> None:
    read_end, specs = int(argv[0]), argv[1:]
    while os.read(read_end, 1):  # b"" once every write end is closed: the watched process is gone
        pass
    _stop([p for p in map(_target, specs) if p is not None])


if __name__ == "__main__":
    main(sys.argv[1:])
