"""Stage `teacher`: a running SGLang-protocol teacher server, described in `endpoint.json`.

Not cached: a server is a process, not a file. The flow stops it when it ends, also on
failure or cancellation (`ServerProcess.stop` kills the whole process group).
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.engine.launcher import ServerProcess, check_external, launch_server
from opd_core.io import write_json
from opd_core.rundir import RunDir


def needs_teacher_server(cfg: OPDRunConfig) -> bool:
    return cfg.algorithm.use_opd and cfg.algorithm.opd_type == "sglang"


@task(name="teacher", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def start_teacher(cfg: OPDRunConfig, run_dir: RunDir) -> tuple[list[str], ServerProcess | None]:
    """Returns (teacher urls, the server process this stage started or None)."""
    logger = get_run_logger()
    stage_dir = run_dir.stage("teacher")
    if cfg.teacher.backend == "external":
        urls = [u.strip() for u in cfg.teacher.url.split(",") if u.strip()]
        info = check_external(
            urls, api_key=cfg.teacher.api_key, timeout=cfg.teacher.startup_timeout
        )
        server = None
    else:
        server = launch_server(
            cfg.teacher.backend, run_dir.teacher_hf, cfg.teacher, stage_dir / "server.log"
        )
        urls, info = [server.url], server.model_info()
    write_json(
        stage_dir / "endpoint.json",
        {"urls": urls, "backend": cfg.teacher.backend, "model_info": info},
    )
    logger.info("teacher (%s) ready at %s", cfg.teacher.backend, ", ".join(urls))
    return urls, server
