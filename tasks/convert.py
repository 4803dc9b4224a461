"""Stage `convert`: HF -> Megatron torch_dist, with an HF-vs-Megatron logits parity check."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.rundir import RunDir
from opd_core.stages import run_convert, teacher_checkpoint
from tasks.common import cached_stage


@task(name="convert", cache_policy=NO_CACHE)
def convert(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    teacher_ckpt = teacher_checkpoint(cfg, run_dir)  # megatron mode: the teacher is converted too
    inputs = [run_dir.student_hf] + ([run_dir.teacher_hf] if teacher_ckpt is not None else [])
    config_hash = cfg.section_hash("convert") + str(teacher_ckpt)
    return cached_stage("convert", run_dir, config_hash, inputs, lambda: run_convert(cfg, run_dir))
