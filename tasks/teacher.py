"""Task `teacher` (opd_core.stages.Teacher): start the teacher servers, retried once. The flow
owns their lifetime (flows/opd.py `teacher_server`)."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.engine.fleet import ServerFleet
from opd_core.rundir import RunDir
from opd_core.stages import Teacher


@task(name="teacher", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def start_teacher(cfg: OPDRunConfig, run_dir: RunDir) -> ServerFleet:
    fleet = Teacher(cfg, run_dir).start()
    get_run_logger().info("teacher (%s) ready at %s", fleet.backend, ", ".join(fleet.urls))
    return fleet
