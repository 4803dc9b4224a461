"""Start a server that dies with the process that launched it, even a SIGKILLed one.

    python -m opd_core.engine.parent_guard DRIVER_PID -- python -m sglang.launch_server ...

The launcher starts every server (and the router) through this module, as the leader of a
new process group. It forks a small watcher, then `exec`s the server command in its own
place: the launcher's pid, the process group and the command line are the server's own, so
`ServerProcess.stop()` and the run-directory teardown (flows/teardown.py, which finds
servers by command line) see one process per server as before. The watcher
(`python -m opd_core.engine.parent_guard --watch DRIVER_PID SERVER_PID`) waits for the
driver to exit (a pidfd: woken at once, zombies included), then SIGTERMs the server's process
group and SIGKILLs it after a grace period, so SGLang's scheduler and detokenizer processes
go too. It exits by itself when the server does, and lives in a process group of its own:
where init does not reap orphans, an exited watcher is a zombie, and a zombie inside the
server's group would keep that group alive for `killpg`.

The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) is not used: it fires when the
*thread* that forked the child exits, so a server launched from a Prefect task's worker
thread would be killed when that thread ends rather than when the driver does. The module
imports only the standard library.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time

POLL_S = 0.5  # how often the watcher checks that the server is still there
GRACE_S = 10.0  # SIGTERM to SIGKILL


def _driver_exited(pidfd: int | None, driver: int, timeout: float) -> bool:
    """Wait up to `timeout` s; True once `driver` has exited."""
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    time.sleep(timeout)
    try:
        os.kill(driver, 0)
    except ProcessLookupError:
        return True
    return False


def watch(driver: int, server: int) -> None:
    """Until `server` (our parent) exits; if `driver` exits first, stop the server's group."""
    try:
        pidfd = os.pidfd_open(driver)
    except ProcessLookupError:  # the driver died before we started
        pidfd = -1
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll by pid
        pidfd = None
    while pidfd != -1 and not _driver_exited(pidfd, driver, POLL_S):
        if os.getppid() != server:  # the server is gone: nothing left to guard
            return
    print(
        f"parent_guard: parent process {driver} is gone; stopping server {server}",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server, signal.SIGTERM)  # the server leads its group (start_new_session)
    deadline = time.monotonic() + GRACE_S
    while os.getppid() == server and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server, signal.SIGKILL)  # whatever is left of it


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "--watch" and argv[1].isdigit() and argv[2].isdigit():
        watch(int(argv[1]), int(argv[2]))
        return
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        raise SystemExit(
            "usage: python -m opd_core.engine.parent_guard DRIVER_PID -- COMMAND [ARGS...]"
        )
    server = os.getpid()  # stays the same across the exec below
    if os.fork() == 0:
        os.setpgid(0, 0)  # out of the server's group (see the module docstring)
        module = [sys.executable, "-m", "opd_core.engine.parent_guard"]
        os.execv(sys.executable, [*module, "--watch", argv[0], str(server)])
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main()
