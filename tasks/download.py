"""Stage `download`: models and data into `download/` (`opd stage download --run-dir DIR`)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.download import run_download
from opd_core.rundir import RunDir
from tasks.common import cached_stage


@task(name="download", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def download(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    # Inputs are remote (hub ids) or the toy seed: the config sections are the whole key.
    return cached_stage(
        "download",
        run_dir,
        cfg.section_hash("models", "data", "toy"),
        [],
        lambda: run_download(cfg, run_dir),
    )
