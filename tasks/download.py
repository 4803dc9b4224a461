"""Stage `download`: models and data into `download/` (`opd stage download --run-dir DIR`)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.download import download_config_hash, run_download
from opd_core.errors import NotRetryable
from opd_core.rundir import RunDir
from tasks.common import cached_stage


def worth_retrying(task, task_run, state) -> bool:
    """Hub hiccups are retried; bad data, a bad model source or a failed pre-flight check
    (NotRetryable) would fail the same way again, so it fails at once."""
    return not isinstance(state.data, NotRetryable)


@task(
    name="download",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def download(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    # Inputs are remote (hub ids) or the toy seed: the config is the whole key.
    return cached_stage(
        "download", run_dir, download_config_hash(cfg), [], lambda: run_download(cfg, run_dir)
    )
