"""flows/watchdog.py: what a process started is stopped when that process dies, SIGKILL too.

A "driver" subprocess starts a long-running child (standing in for Prefect's temporary
server) and a watchdog for it, then is SIGKILLed: the child must be gone within seconds, and
the watchdog with it. tests/test_resume.py does the same with a real `opd run` and its real
temporary Prefect server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent

DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from flows.watchdog import stop_with_this_process
    # Its own session, as a server would be: the group's signals do not reach it.
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                              start_new_session=True)
    watchdog = stop_with_this_process([server.pid])
    print(server.pid, watchdog.pid, flush=True)
    if sys.argv[1] == "wait":
        time.sleep(300)
    """
)


def _start_driver(how: str) -> tuple[subprocess.Popen, psutil.Process, psutil.Process]:
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, how],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    server_pid, watchdog_pid = map(int, driver.stdout.readline().split())
    return driver, psutil.Process(server_pid), psutil.Process(watchdog_pid)


@pytest.mark.parametrize("how", ["wait", "exit"])
def test_a_killed_or_finished_driver_leaves_nothing_behind(how):
    driver, server, watchdog = _start_driver(how)
    try:
        if how == "wait":
            time.sleep(0.5)
            assert server.is_running() and watchdog.is_running()
            os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        _, alive = psutil.wait_procs([server, watchdog], timeout=10)
        assert not alive, f"left behind: {[p.pid for p in alive]}"
    finally:
        for process in (server, watchdog):
            if process.is_running():
                process.kill()


def test_a_reused_pid_is_not_killed():
    """Targets are named by pid and start time: a process that merely got the pid is spared."""
    from flows import watchdog

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        impostor = f"{bystander.pid}:{psutil.Process(bystander.pid).create_time() - 100.0!r}"
        assert watchdog._target(impostor) is None
        assert watchdog._target(f"{bystander.pid}:{psutil.Process(bystander.pid).create_time()!r}")
    finally:
        bystander.kill()
        bystander.wait()
