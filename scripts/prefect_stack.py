"""Start and stop a local Prefect stack for the OPD deployments: what `make up` / `make down` run.

    python scripts/prefect_stack.py up      # server (SQLite, 127.0.0.1), worker, deployments
    python scripts/prefect_stack.py down    # stops exactly what `up` started
    python scripts/prefect_stack.py status

`up` starts, each in its own session (process group) and in the background:
  1. `prefect server start --host 127.0.0.1 --port PORT`, with PREFECT_HOME (the SQLite
     database, profiles) in the project-local `.prefect/`; waits for /api/health;
  2. the process work pool `opd-pool` (created if missing);
  3. `prefect worker start --pool opd-pool --type process`;
  4. `prefect --no-prompt deploy --all` from the repository root (prefect.yaml).
It records `<home>/server.pid` and `<home>/worker.pid` (pid and process start time, so a
reused pid is never mistaken for ours), logs in `<home>/*.log`, and `<home>/env.sh` to point
a shell's `prefect` CLI at this server (`source .prefect/env.sh`).

`down` reads those pid files and stops each recorded process with everything it started
(its process group and its descendants, e.g. flow runs the worker launched and their
servers): SIGTERM, a grace period so flow runs can run their `finally:` cleanup, then
SIGKILL. Nothing else is touched.

Settings (environment): OPD_PREFECT_HOME (default `<repo>/.prefect`), OPD_PREFECT_PORT
(default 4200). Offline-safe: analytics are disabled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
WORK_POOL = "opd-pool"  # the pool prefect.yaml's deployments name
SERVICES = ("worker", "server")  # stop order: the worker (and its flow runs) before the server


def stack_settings(home: str | Path | None = None, port: int | None = None) -> dict:
    home = Path(home or os.environ.get("OPD_PREFECT_HOME") or REPO / ".prefect").resolve()
    port = int(port or os.environ.get("OPD_PREFECT_PORT") or 4200)
    return {
        "home": home,
        "port": port,
        "pool": WORK_POOL,
        "api_url": f"http://127.0.0.1:{port}/api",
    }


def prefect_env(settings: dict) -> dict[str, str]:
    """The environment of every process the stack starts (and of `prefect` CLI calls)."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(settings["home"]),
        PREFECT_API_URL=settings["api_url"],
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(settings["port"]),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        RAY_AUTH_MODE=env.get("RAY_AUTH_MODE", "disabled"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    # Poll for new flow runs every few seconds instead of the default 10-15 s.
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "3")
    env.pop("PREFECT_PROFILE", None)
    # Every child runs in the repository root; prefect.yaml's `{{ $PWD }}` must say so too.
    env["PWD"] = str(REPO)
    return env


def _prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


# ----------------------------------------------------------------------------- pid files


def _pid_file(settings: dict, service: str) -> Path:
    return settings["home"] / f"{service}.pid"


def _write_pid(settings: dict, service: str, process: subprocess.Popen) -> None:
    started = psutil.Process(process.pid).create_time()
    _pid_file(settings, service).write_text(
        json.dumps({"pid": process.pid, "create_time": started})
    )


def recorded_process(settings: dict, service: str) -> psutil.Process | None:
    """The live process a pid file names, or None (no file, dead, or the pid was reused)."""
    path = _pid_file(settings, service)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        process = psutil.Process(saved["pid"])
        if abs(process.create_time() - saved["create_time"]) > 0.01:
            return None
        return process
    except (ValueError, KeyError, psutil.Error):
        return None


def _spawn(settings: dict, service: str, command: list[str]) -> subprocess.Popen:
    log = open(settings["home"] / f"{service}.log", "ab")  # noqa: SIM115 - the child writes it
    # start_new_session: its own process group, so `down` can stop it and its children
    # together, and a Ctrl-C in the shell that ran `make up` does not reach it.
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=prefect_env(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    _write_pid(settings, service, process)
    return process


# ---------------------------------------------------------------------------------- up


def wait_healthy(
    api_url: str,
    timeout: float = 180.0,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.is_file() else ""
            raise RuntimeError(
                f"prefect server exited with code {process.returncode} while starting; "
                f"log {log}:\n{tail}"
            )
        try:
            if httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout:.0f} s (see {log})")


def _run_cli(settings: dict, args: list[str], log_name: str) -> None:
    with open(settings["home"] / log_name, "ab") as log:
        done = subprocess.run(
            _prefect_cli() + args,
            cwd=REPO,
            env=prefect_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        tail = (settings["home"] / log_name).read_text()[-3000:]
        raise RuntimeError(
            f"`prefect {' '.join(args)}` failed (exit {done.returncode}); "
            f"{settings['home'] / log_name}:\n{tail}"
        )


def up(settings: dict, deploy: bool = True) -> None:
    settings["home"].mkdir(parents=True, exist_ok=True)
    server = recorded_process(settings, "server")
    if server is None:
        if _port_in_use(settings["port"]):
            raise RuntimeError(
                f"port {settings['port']} on 127.0.0.1 is in use; "
                "set OPD_PREFECT_PORT to a free port"
            )
        process = _spawn(
            settings,
            "server",
            _prefect_cli()
            + ["server", "start", "--host", "127.0.0.1", "--port", str(settings["port"])],
        )
        print(
            f"prefect server: pid {process.pid}, log {settings['home'] / 'server.log'}", flush=True
        )
        wait_healthy(settings["api_url"], process=process, log=settings["home"] / "server.log")
    else:
        print(f"prefect server already running (pid {server.pid})", flush=True)
        wait_healthy(settings["api_url"])

    _run_cli(
        settings,
        ["work-pool", "create", settings["pool"], "--type", "process", "--overwrite"],
        "setup.log",
    )

    if recorded_process(settings, "worker") is None:
        process = _spawn(
            settings,
            "worker",
            _prefect_cli()
            + [
                "worker",
                "start",
                "--pool",
                settings["pool"],
                "--type",
                "process",
                "--name",
                f"opd-worker-{settings['port']}",
                "--install-policy",
                "never",
            ],
        )
        print(
            f"prefect worker: pid {process.pid}, log {settings['home'] / 'worker.log'}", flush=True
        )
    else:
        print("prefect worker already running", flush=True)

    if deploy:
        _run_cli(settings, ["--no-prompt", "deploy", "--all"], "deploy.log")
        print(
            "deployments registered: opd/full, "
            "opd-stage/{download,convert,teacher,baseline_eval,train,final_eval}",
            flush=True,
        )

    env_file = settings["home"] / "env.sh"
    env_file.write_text(
        f"export PREFECT_API_URL={settings['api_url']}\n"
        "export PREFECT_SERVER_ANALYTICS_ENABLED=false\n"
    )
    print(f"UI: http://127.0.0.1:{settings['port']}   CLI: source {env_file}", flush=True)


def _port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -------------------------------------------------------------------------------- down


def _process_tree(root: psutil.Process) -> list[psutil.Process]:
    """The root, its descendants, and anything still in its process group."""
    found = {root.pid: root}
    try:
        for child in root.children(recursive=True):
            found[child.pid] = child
    except psutil.Error:
        pass
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == root.pid:
                found.setdefault(process.pid, process)
        except (OSError, psutil.Error):
            continue
    return list(found.values())


def stop_tree(root: psutil.Process, grace: float = 20.0) -> list[int]:
    """SIGTERM the tree, wait up to `grace` seconds, SIGKILL what is left; returns the pids."""
    tree = _process_tree(root)
    for process in tree:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in tree]


def down(settings: dict) -> None:
    for service in SERVICES:
        process = recorded_process(settings, service)
        if process is not None:
            pids = stop_tree(process)
            print(f"stopped prefect {service} (pids {', '.join(map(str, pids))})", flush=True)
        else:
            print(f"prefect {service}: not running", flush=True)
        _pid_file(settings, service).unlink(missing_ok=True)


def status(settings: dict) -> int:
    running = 0
    for service in reversed(SERVICES):
        process = recorded_process(settings, service)
        print(f"{service}: {'running, pid ' + str(process.pid) if process else 'not running'}")
        running += process is not None
    print(f"UI: http://127.0.0.1:{settings['port']}")
    return 0 if running == len(SERVICES) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument(
        "--home", help="PREFECT_HOME for the stack (default .prefect/ or $OPD_PREFECT_HOME)"
    )
    parser.add_argument("--port", type=int, help="server port (default 4200 or $OPD_PREFECT_PORT)")
    parser.add_argument(
        "--no-deploy", action="store_true", help="up: do not register the deployments"
    )
    args = parser.parse_args(argv)
    settings = stack_settings(args.home, args.port)
    if args.command == "up":
        try:
            up(settings, deploy=not args.no_deploy)
        except Exception as err:
            print(f"make up failed: {err}\nstopping what was started", file=sys.stderr, flush=True)
            down(settings)
            return 1
        return 0
    if args.command == "down":
        down(settings)
        return 0
    return status(settings)


if __name__ == "__main__":
    sys.exit(main())
