"""flows/watchdog.py: what a process started is stopped when that process dies, SIGKILL too.

A "driver" subprocess starts the watchdog (as `opd run` does), then a server in its own
session (like the teacher and rollout servers) and a helper whose own child outlives it (like
the agents a local Ray cluster leaves when its raylet dies). Whether the driver is SIGKILLed
or ends normally, every one of them must be gone within seconds, and the watchdog with them.
tests/test_resume.py does the same with a real `opd run`, its temporary Prefect server and
its model servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent

SLEEPER = "import time; time.sleep(300)"
# Starts a long-lived child in its own session, says its pid, and ends 2 s later: the child is
# then re-parented away from the driver; only the watchdog's notes still tie it to the run.
HELPER = (
    "import subprocess, sys, time; "
    f"child = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], start_new_session=True); "
    "print(child.pid, flush=True); time.sleep(2)"
)
DRIVER = textwrap.dedent(
    f"""
    import subprocess, sys, time
    from flows.watchdog import stop_with_this_process
    watchdog = stop_with_this_process()
    server = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}], start_new_session=True)
    helper = subprocess.Popen([sys.executable, "-c", {HELPER!r}], stdout=subprocess.PIPE)
    orphan = int(helper.stdout.readline())
    helper.wait()
    print(watchdog.pid, server.pid, orphan, flush=True)
    if sys.argv[1] == "kill":
        time.sleep(300)
    """
)


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_a_killed_or_finished_driver_leaves_nothing_behind(how):
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, how],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    processes = [psutil.Process(int(pid)) for pid in driver.stdout.readline().split()]
    try:
        watchdog, server, orphan = processes
        assert orphan.ppid() != driver.pid  # not the driver's descendant any more
        if how == "kill":
            assert server.is_running() and orphan.is_running()
            os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    finally:
        for process in processes:
            if process.is_running():
                process.kill()
