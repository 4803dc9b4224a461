"""Run a server as a child that dies with the process that started it, even a SIGKILLed one.

    python -m opd_core.engine.parent_guard PARENT_PID -- python -m sglang.launch_server ...

The launcher starts every server (and the router) through this guard, as the leader of a
new process group. The guard polls its parent: once the parent is gone (the driver was
killed: the guard has been re-parented), it stops the server (SIGTERM, SIGKILL after a grace
period) and then kills the whole group, so SGLang's scheduler and detokenizer processes go
too. The kernel's parent-death signal (prctl PR_SET_PDEATHSIG) is not used because it fires
when the *thread* that forked the child exits: a server launched from a Prefect task's
worker thread would be killed when that thread ends, not when the driver does.

Signals sent to the group (`ServerProcess.stop`) reach the server directly; the guard waits
for it and exits with its exit code (128 + N for a signal N), so the launcher's errors say
how the server itself ended. The guard imports only the standard library.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

POLL_S = 0.2
GRACE_S = 5.0


def run(parent_pid: int, command: list[str]) -> int:
    child = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT):  # the group's signal reaches the child too
        signal.signal(signum, lambda *_: None)
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent_pid:
            print(
                f"parent_guard: parent process {parent_pid} is gone; stopping {command[:3]}",
                file=sys.stderr,
                flush=True,
            )
            child.terminate()
            try:
                child.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the server's own children; and us


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        raise SystemExit("usage: python -m opd_core.engine.parent_guard PARENT_PID -- COMMAND")
    sys.exit(run(int(argv[0]), argv[2:]))


if __name__ == "__main__":
    main()
