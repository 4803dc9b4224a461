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
(`launcher.start_guarded`): it dies with the driver. Each router gets its own Prometheus
port (sglang-router binds 0.0.0.0:29000 by default, so a second router fails to start).
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import httpx

from opd_core.engine.launcher import (
    EngineLaunchError,
    ManagedProcess,
    free_port,
    start_guarded,
    wait_until_ready,
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
    if "--prometheus-port" not in command:  # its default, 29000, would clash between routers
        command += ["--prometheus-host", host, "--prometheus-port", str(free_port(host))]
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
    wanted = {url.rstrip("/") for url in router.worker_urls}
    with httpx.Client(timeout=5) as http:

        def probe() -> tuple[bool, str]:
            try:
                workers = http.get(f"{router.url}/workers").json().get("workers", [])
                healthy = {w["url"].rstrip("/") for w in workers if w.get("is_healthy")}
            except (httpx.TransportError, ValueError, KeyError, AttributeError) as err:
                return False, f"{type(err).__name__}: {err}"
            return wanted <= healthy, f"healthy workers {sorted(healthy)} of {sorted(wanted)}"

        wait_until_ready(router, "sglang-router", probe, timeout, poll=0.2)
