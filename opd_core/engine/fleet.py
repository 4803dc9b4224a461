"""The SGLang-protocol servers of one role, started from their config and stopped together.

    with start_servers("rollout", cfg.rollout, model_dir, run_dir.rollout_log,
                       count=cfg.rollout.num_engines) as fleet:
        client = EngineClient.from_config(fleet.urls, cfg.client, api_key=cfg.rollout.api_key)

A role is the student's rollout engines (`cfg.rollout`) or the teacher's replicas
(`cfg.teacher`), both `ServerConfig`s. backend builtin / sglang: `count` server processes
started by `opd_core.engine.launcher` (each with the same flags); external: the configured
URLs, checked to answer, never started or stopped here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_core.config import ServerConfig
from opd_core.engine.launcher import ServerProcess, check_external, launch_server

__all__ = ["ServerFleet", "start_servers"]


@dataclass
class ServerFleet:
    role: str  # "rollout" or "teacher": names the part in errors and logs
    backend: str
    urls: list[str]
    model_info: dict[str, Any]
    servers: list[ServerProcess] = field(default_factory=list)  # the ones this fleet started

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []

    def __enter__(self) -> ServerFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_servers(
    role: str, cfg: ServerConfig, model_path: str | Path, log_path: str | Path, count: int = 1
) -> ServerFleet:
    """Start `count` servers of `model_path` (or check the external ones) and wait until each
    generates. A failure stops whatever this call already started."""
    if cfg.backend == "external":
        info = check_external(cfg.urls, api_key=cfg.api_key, timeout=cfg.startup_timeout)
        return ServerFleet(role, cfg.backend, cfg.urls, info["model_info"])
    log_path = Path(log_path)
    servers: list[ServerProcess] = []
    try:
        for index in range(count):
            # A fixed port is the first of `count` consecutive ones.
            server_cfg = cfg.model_copy(update={"port": cfg.port + index if cfg.port else 0})
            log = log_path if count == 1 else log_path.with_stem(f"{log_path.stem}_{index}")
            servers.append(launch_server(cfg.backend, model_path, server_cfg, log))
        info = servers[0].model_info()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return ServerFleet(role, cfg.backend, [s.url for s in servers], info, servers)
