"""Task `download` (opd_core.stages.Download): retried for hub hiccups."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.rundir import RunDir
from opd_core.stages import Download
from tasks.common import run_stage


@task(name="download", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def download(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    return run_stage(Download(cfg, run_dir))
