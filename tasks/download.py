"""Task `download` (opd_core.stages.Download): retried for hub hiccups, not for bad input."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.errors import NotRetryable
from opd_core.rundir import RunDir
from opd_core.stages import Download
from tasks.common import run_stage


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
    return run_stage(Download(cfg, run_dir))
