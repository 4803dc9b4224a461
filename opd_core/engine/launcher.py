"""Start (and reliably stop) a teacher/rollout server process, or check an external one.

    with launch_server("builtin", model_dir, cfg.teacher, run_dir / "teacher/server.log") as server:
        client = EngineClient(server.url)                 # healthy by the time we get here
    check_external("http://gpu-node:30000", api_key=None)  # backend: external

`builtin` runs `python -m opd_core.engine.server` and `sglang` runs
`python -m sglang.launch_server`, with the SAME flag names (--model-path --host --port
--tp-size --mem-fraction-static --api-key [--enable-deterministic-inference] + `extra_args`),
so the CPU tests exercise the exact code path a GPU run takes. The server gets its own
process group (start_new_session) and `stop()` signals the whole group (SIGTERM, then
SIGKILL after a grace period): SGLang forks scheduler and detokenizer processes that must
not outlive the run. It runs under `parent_guard.py`, so it also dies when the driver is
killed (SIGKILL included). Startup waits on /health_generate up to `startup_timeout`; if the
process exits first (the built-in engine exits when its model cannot load), the error
names the reason from its log at once instead of waiting out the timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

import opd_core

MODULES = {"builtin": "opd_core.engine.server", "sglang": "sglang.launch_server"}
DETERMINISTIC_FLAG = "--enable-deterministic-inference"


class EngineLaunchError(RuntimeError):
    """The server did not come up (the message includes the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def log_tail(path: str | Path, lines: int = 40) -> str:
    path = Path(path)
    if not path.is_file():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def error_line(text: str) -> str | None:
    """The last line of a log that reports an error (the reason a server exited)."""
    for line in reversed(text.splitlines()):
        if re.search(r"\b(ERROR|CRITICAL|Error|error:)|exiting", line):
            return line.strip()
    return None


def server_command(
    backend: str,
    model_path: str | Path,
    host: str,
    port: int,
    cfg: Any,
    deterministic: bool | None = None,
) -> list[str]:
    """The command line of a server: sglang.launch_server's flags for both backends.

    `deterministic` (default: `cfg.enable_deterministic_inference`, False if the config has
    no such field)
    adds --enable-deterministic-inference, without which SGLang ignores `sampling_seed`.
    """
    if backend not in MODULES:
        raise ValueError(
            f"teacher.backend: {backend!r} cannot be launched "
            "(builtin or sglang; external is only checked)"
        )
    command = [
        sys.executable,
        "-m",
        MODULES[backend],
        "--model-path",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        # GPUs per server = its tensor-parallel size; a CPU server (0 GPUs) still has TP 1.
        str(max(1, cfg.num_gpus_per_engine)),
    ]
    if cfg.mem_fraction_static is not None:
        command += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.api_key:
        command += ["--api-key", cfg.api_key]
    extra = [str(a) for a in cfg.extra_args]
    if deterministic is None:
        deterministic = bool(getattr(cfg, "enable_deterministic_inference", False))
    if deterministic and DETERMINISTIC_FLAG not in extra:
        command.append(DETERMINISTIC_FLAG)
    return command + extra


def start_guarded(command: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `command` under `parent_guard` (it dies with this process), as the leader of a
    new process group, output appended to `log_path`, this checkout on its PYTHONPATH."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process_env = {**os.environ, **(env or {})}
    # `python -m opd_core...` must import this checkout even when it is not pip-installed.
    root = str(Path(opd_core.__file__).resolve().parent.parent)
    process_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, process_env.get("PYTHONPATH")) if p
    )
    guard = [sys.executable, "-m", "opd_core.engine.parent_guard", str(os.getpid()), "--"]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            guard + command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=process_env,
            start_new_session=True,
        )


class ManagedProcess:
    """A process group started by `start_guarded`; a context manager that stops it on exit."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, command: list[str]):
        self.process, self.url, self.log_path, self.command = process, url, log_path, command

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `grace` seconds."""
        group = self.process.pid  # start_new_session: the group id is the leader's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):  # the leader's children, if any survived
            os.killpg(group, signal.SIGKILL)
        self.process.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ManagedProcess):
    """A running teacher or rollout server."""

    def __init__(
        self,
        process: subprocess.Popen,
        url: str,
        backend: str,
        log_path: Path,
        command: list[str],
        api_key: str | None = None,
    ):
        super().__init__(process, url, log_path, command)
        self.backend, self.api_key = backend, api_key

    def model_info(self) -> dict[str, Any]:
        """The server's /model_info (/get_model_info on servers older than SGLang 0.5)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        response = httpx.get(f"{self.url}/model_info", headers=headers, timeout=30)
        if response.status_code == 404:
            response = httpx.get(f"{self.url}/get_model_info", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()

    def endpoint(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "backend": self.backend,
            "pid": self.pid,
            "log_path": str(self.log_path),
            "command": self.command,
        }


def launch_server(
    backend: str,
    model_path: str | Path,
    cfg: Any,
    log_path: str | Path,
    env: dict | None = None,
    deterministic: bool | None = None,
) -> ServerProcess:
    """Start a server from an `opd_core.config.TeacherConfig` and wait until it generates.

    `deterministic`: see `server_command` (default `cfg.enable_deterministic_inference`).
    """
    if backend == "sglang" and importlib.util.find_spec("sglang") is None:
        raise EngineLaunchError(
            "teacher.backend=sglang but sglang is not installed: "
            "`pip install .[sglang]` on a GPU machine"
        )
    port = cfg.port or free_port(cfg.host)
    command = server_command(backend, model_path, cfg.host, port, cfg, deterministic)
    log_path = Path(log_path)
    process = start_guarded(command, log_path, env)
    server = ServerProcess(
        process, f"http://{cfg.host}:{port}", backend, log_path, command, api_key=cfg.api_key
    )
    try:
        _wait_until_generating(server, cfg.startup_timeout, cfg.api_key)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_generating(server: ServerProcess, timeout: float, api_key: str | None) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=10) as http:

        def probe() -> tuple[bool, str]:
            try:
                response = http.get(f"{server.url}/health_generate")
            except httpx.TransportError as err:
                return False, type(err).__name__
            return (
                response.status_code == 200,
                f"HTTP {response.status_code}: {response.text[:200]}",
            )

        wait_until_ready(server, f"{server.backend} server", probe, timeout)


def wait_until_ready(
    managed: ManagedProcess,
    name: str,
    probe: Callable[[], tuple[bool, str]],
    timeout: float,
    poll: float = 0.25,
) -> None:
    """Poll `probe() -> (ready, what it saw)` until ready. EngineLaunchError if the process
    exits first (naming the reason from its log, at once) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        code = managed.process.poll()
        if code is not None:
            tail = log_tail(managed.log_path)
            raise EngineLaunchError(
                f"{name} exited with code {code} before becoming healthy: "
                f"{error_line(tail) or 'see its log'}\n"
                f"command: {' '.join(managed.command)}\n"
                f"last lines of {managed.log_path}:\n{tail}"
            )
        ready, last = probe()
        if ready:
            return
        if time.monotonic() > deadline:
            raise EngineLaunchError(
                f"{name} at {managed.url} not healthy after {timeout:.0f}s (last: {last}).\n"
                f"last lines of {managed.log_path}:\n{log_tail(managed.log_path)}"
            )
        time.sleep(poll)


def check_external(
    url: str | list[str], api_key: str | None = None, timeout: float = 60.0
) -> dict[str, Any]:
    """backend=external: check that the given server(s) answer; nothing is started or stopped.

    `url` may list several servers separated by commas (failover); at least one must be
    healthy. Returns {"urls", "healthy", "model_info"}.
    """
    from opd_core.engine.client import EngineClient

    with EngineClient(url, api_key=api_key, timeout=timeout, max_retries=0) as client:
        try:
            healthy = client.wait_until_healthy(timeout)
        except TimeoutError as err:
            raise EngineLaunchError(f"teacher.url: {err}") from None
        return {"urls": client.urls, "healthy": healthy, "model_info": client.model_info()}
