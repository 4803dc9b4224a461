"""Task `train` (opd_core.stages.Train): the rounds, with a progress artifact and a log line
per round."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.rundir import RunDir
from opd_core.stages import Train
from opd_core.trainer.loop import TeacherServers
from tasks.common import StageProgress, run_stage


@task(name="train", cache_policy=NO_CACHE)
def train(
    cfg: OPDRunConfig, run_dir: RunDir, teacher: TeacherServers, restart_train: bool = False
) -> dict:
    logger = get_run_logger()
    stage = Train(cfg, run_dir)
    rounds = cfg.rollout.rounds
    progress = StageProgress("train", rounds)

    def on_round(round_index: int, metrics: dict) -> None:
        progress.update(round_index + 1, f"round {round_index + 1}/{rounds}")
        logger.info(
            "round %d: reverse_kl=%.4f rollout_pass_rate=%.3f reward=%.3f loss=%.4f (%.1fs)",
            round_index,
            metrics["opd_reverse_kl"],
            metrics["rollout_pass_rate"],
            metrics["reward_mean"],
            metrics.get("loss", float("nan")),
            metrics["seconds"],
        )

    if not stage.is_cached() and stage.resumes():
        logger.info("train: resuming from %s if a round was checkpointed", stage.out_dir)
    return run_stage(stage, teacher=teacher, on_round=on_round, restart_train=restart_train)
