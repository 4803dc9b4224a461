"""Stage `train`: the OPD rounds (rollout -> teacher scoring -> Megatron update in Ray actors).

Cached on the converted student, the train data, the teacher and the training config
sections. A killed run resumes from `train/state.json` (the last checkpointed round).
"""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.rundir import RunDir, is_done, stage_key
from opd_core.stages import teacher_checkpoint
from opd_core.trainer.loop import run_training
from opd_core.trainer.state import claim_train_dir
from tasks.common import StageProgress, cached_stage

TRAIN_SECTIONS = ("seed", "rollout", "reward", "algorithm", "train")


def train_inputs(cfg: OPDRunConfig, run_dir: RunDir) -> list:
    teacher = teacher_checkpoint(cfg, run_dir) or run_dir.teacher_hf
    return [run_dir.student_torch_dist, run_dir.train_data, teacher]


def train_is_cached(cfg: OPDRunConfig, run_dir: RunDir) -> bool:
    """True when `train` would be a cache hit (then the flow need not start a teacher)."""
    try:
        return is_done(
            run_dir.stage("train"),
            stage_key(cfg.section_hash(*TRAIN_SECTIONS), train_inputs(cfg, run_dir)),
        )
    except FileNotFoundError:  # an input is missing: not cached, and train will say which
        return False


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: OPDRunConfig, run_dir: RunDir, teacher_urls: list[str] | None) -> dict:
    logger = get_run_logger()
    inputs = train_inputs(cfg, run_dir)
    progress = StageProgress("train", cfg.rollout.num_rollout)

    def on_round(round_index: int, metrics: dict) -> None:
        progress.update(round_index + 1, f"round {round_index + 1}/{cfg.rollout.num_rollout}")
        logger.info(
            "round %d: reverse_kl=%.4f rollout_pass_rate=%.3f reward=%.3f loss=%.4f (%.1fs)",
            round_index,
            metrics["opd_reverse_kl"],
            metrics["rollout_pass_rate"],
            metrics["reward_mean"],
            metrics.get("loss", float("nan")),
            metrics["seconds"],
        )

    config_hash = cfg.section_hash(*TRAIN_SECTIONS)
    key = stage_key(config_hash, inputs)

    def build() -> dict:
        # Resume only a run with the same key; a changed config or input starts over.
        if claim_train_dir(run_dir.stage("train"), key):
            logger.info(
                "train: resuming from %s if a round was checkpointed",
                run_dir.stage("train") / "state.json",
            )
        return run_training(cfg, run_dir, teacher_urls, on_round=on_round)

    return cached_stage("train", run_dir, config_hash, inputs, build, key=key)
