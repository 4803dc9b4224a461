"""Stage `convert`: HF -> Megatron torch_dist, with an HF-vs-Megatron logits parity check."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.rundir import RunDir
from opd_core.stages import run_convert, teacher_checkpoint
from tasks.common import cached_stage


@task(name="convert", cache_policy=NO_CACHE)
def convert(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    inputs = [run_dir.student_hf]
    if teacher_checkpoint(cfg, run_dir) is not None:
        inputs.append(run_dir.teacher_hf)
    config_hash = cfg.section_hash("convert") + str(teacher_checkpoint(cfg, run_dir))
    return cached_stage("convert", run_dir, config_hash, inputs, lambda: run_convert(cfg, run_dir))
