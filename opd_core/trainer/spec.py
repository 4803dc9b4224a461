"""What a training rank is built from: one typed, validated object decided in the driver.

    spec = ActorSpec.from_config(cfg, hf_config_dir, checkpoint_dir, teacher_checkpoint_dir=...)
    actor.setup(rank, world_size, master_addr, master_port, spec)

The config sections travel as validated objects (Ray pickles them; nothing is re-validated on
the worker), with the lr schedule already resolved in optimizer steps (`cfg.lr_schedule`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from opd_core.config import AlgorithmConfig, LRSchedule, OPDRunConfig, ParallelConfig, TrainConfig

__all__ = ["ActorSpec"]


class ActorSpec(BaseModel):
    """Everything a training rank is built from, decided once in the driver.

    The config sections arrive as validated objects (Ray pickles them; nothing is
    re-validated), with the lr schedule already resolved in optimizer steps.
    """

    model_config = ConfigDict(frozen=True)

    hf_config_dir: Path  # the student's HF config (architecture, tokenizer side files)
    checkpoint_dir: Path | None = None  # torch_dist to start from (the converted student)
    checkpoint_step: int | None = None  # its iteration; None = the latest
    teacher_checkpoint_dir: Path | None = None  # opd_type=megatron: the frozen teacher
    teacher_step: int | None = None
    parallel: ParallelConfig
    train: TrainConfig
    schedule: LRSchedule
    algorithm: AlgorithmConfig
    seed: int = 0
    num_threads: int | None = None  # torch threads per rank on CPU

    @classmethod
    def from_config(
        cls,
        cfg: OPDRunConfig,
        hf_config_dir: str | Path,
        checkpoint_dir: str | Path | None = None,
        checkpoint_step: int | None = None,
        teacher_checkpoint_dir: str | Path | None = None,
        num_threads: int | None = None,
    ) -> ActorSpec:
        return cls(
            hf_config_dir=Path(hf_config_dir),
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
            checkpoint_step=checkpoint_step,
            teacher_checkpoint_dir=(
                None if teacher_checkpoint_dir is None else Path(teacher_checkpoint_dir)
            ),
            teacher_step=cfg.algorithm.opd_teacher_ckpt_step,
            parallel=cfg.train.parallel,
            train=cfg.train,
            schedule=cfg.lr_schedule,
            algorithm=cfg.algorithm,
            seed=cfg.seed,
            num_threads=num_threads,
        )
