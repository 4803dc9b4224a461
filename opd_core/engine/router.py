"""Start (and reliably stop) sglang-router in front of several SGLang-protocol engines.

    with launch_router(["http://127.0.0.1:30001", "http://127.0.0.1:30002"]) as router:
        EngineClient(router.url, engine_urls=router.worker_urls).generate(...)

sglang-router (PyPI `sglang-router`, a Rust binary that runs on CPU) is what slime puts in
front of its rollout engines; the built-in engine answers every endpoint it calls. Measured
with sglang-router 0.3.2 (tests/test_engine_router.py, benchmarks/router_overhead.py):
- on registration it probes each worker's /health, /server_info, /get_server_info,
  /model_info and /get_model_info, then health-checks /health periodically;
- /generate (single and batch) is forwarded with extra top-level fields (`model`,
  `log_metrics`, `return_hidden_states`, `background`, `no_logs`, `return_bytes`,
  `return_entropy`), which SGLang and the built-in engine ignore;
- /flush_cache is fanned out to every worker by the router itself;
- /get_server_info and /health are answered by the router, about the router;
- /update_weights_from_disk is NOT routed (404): weight updates go to each engine directly
  (`EngineClient(..., engine_urls=...)` does that).

The router runs under the same process-group and parent-guard rules as the servers
(`launcher.start_guarded`): it dies with the driver.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import httpx

from opd_core.engine.launcher import (
    EngineLaunchError,
    ManagedProcess,
    free_port,
    log_tail,
    start_guarded,
)

POLICIES = ("random", "round_robin", "cache_aware", "power_of_two")


class RouterProcess(ManagedProcess):
    """A running sglang-router; `url` takes requests, `worker_urls` are the engines."""

    def __init__(self, process, url: str, log_path: Path, command: list[str], worker_urls):
        super().__init__(process, url, log_path, command)
        self.worker_urls = list(worker_urls)


def launch_router(
    worker_urls: list[str],
    host: str = "127.0.0.1",
    port: int = 0,
    policy: str = "round_robin",
    log_path: str | Path | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
    startup_timeout: float = 60.0,
) -> RouterProcess:
    """Start sglang-router on `host:port` (0 = a free port) with `policy`, and wait until it
    has registered every worker as healthy."""
    if importlib.util.find_spec("sglang_router") is None:
        raise EngineLaunchError("sglang-router is not installed: `pip install sglang-router`")
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {POLICIES}")
    if not worker_urls:
        raise ValueError("worker_urls: give at least one engine URL")
    port = port or free_port(host)
    command = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--policy",
        policy,
        "--worker-urls",
        *worker_urls,
        *map(str, extra_args),
    ]
    log_path = Path(log_path or Path(tempfile.gettempdir()) / f"opd-router-{port}.log")
    router = RouterProcess(
        start_guarded(command, log_path), f"http://{host}:{port}", log_path, command, worker_urls
    )
    try:
        _wait_until_routing(router, startup_timeout)
    except BaseException:
        router.stop()
        raise
    return router


def _wait_until_routing(router: RouterProcess, timeout: float) -> None:
    """Until GET /workers lists every worker as healthy."""
    deadline, last = time.monotonic() + timeout, "no answer yet"
    wanted = {url.rstrip("/") for url in router.worker_urls}
    with httpx.Client(timeout=5) as http:
        while True:
            code = router.process.poll()
            if code is not None:
                raise EngineLaunchError(
                    f"sglang-router exited with code {code}.\n"
                    f"last lines of {router.log_path}:\n{log_tail(router.log_path)}"
                )
            try:
                workers = http.get(f"{router.url}/workers").json().get("workers", [])
                healthy = {w["url"].rstrip("/") for w in workers if w.get("is_healthy")}
                if wanted <= healthy:
                    return
                last = f"healthy workers: {sorted(healthy)}"
            except (httpx.TransportError, ValueError, KeyError, AttributeError) as err:
                last = f"{type(err).__name__}: {err}"
            if time.monotonic() > deadline:
                raise EngineLaunchError(
                    f"sglang-router at {router.url} did not register {sorted(wanted)} within "
                    f"{timeout:.0f}s (last: {last}).\n"
                    f"last lines of {router.log_path}:\n{log_tail(router.log_path)}"
                )
            time.sleep(0.2)
