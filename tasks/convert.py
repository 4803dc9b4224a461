"""Task `convert` (opd_core.stages.Convert)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.rundir import RunDir
from opd_core.stages import Convert
from tasks.common import run_stage


@task(name="convert", cache_policy=NO_CACHE)
def convert(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    return run_stage(Convert(cfg, run_dir))
