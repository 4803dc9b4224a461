"""Stage `convert`: HF -> Megatron torch_dist, with an HF-vs-Megatron logits parity check.

Inputs: the student's HF dir (and the teacher's, in megatron teacher mode, which converts
the teacher too). The conversion runs in a spawned child process that exits when done:
megatron's dist_checkpointing starts a multiprocessing Manager that a killed driver would
leave behind, and the driver (the flow's process) should not keep an 8B model's tensors and
allocator arenas for the rest of the run. Errors, e.g. a failed parity check, are raised
here as in the child.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from opd_core.config import ConvertConfig
from opd_core.io import write_json
from opd_core.megatron.convert import check_parity, hf_to_torch_dist
from opd_core.rundir import RunDir
from opd_core.stages.base import CachedStage


class Convert(CachedStage):
    name = "convert"
    sections = ("convert",)

    def inputs(self) -> list[Path]:
        teacher = [self.run_dir.teacher_hf] if self.teacher_checkpoint is not None else []
        return [self.run_dir.student_hf, *teacher]

    def config_hash(self) -> str:
        # Where the teacher is converted to is part of what this stage produces.
        return super().config_hash() + str(self.teacher_checkpoint)

    def build(self) -> dict[str, Any]:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            job = pool.submit(
                convert_models,
                self.cfg.convert,
                self.run_dir,
                self.teacher_checkpoint,
                self.cfg.seed,
            )
            return job.result()


def convert_models(
    cfg: ConvertConfig, run_dir: RunDir, teacher_checkpoint: Path | None, seed: int
) -> dict[str, Any]:
    """The child process's work: convert, check parity, convert the teacher if asked."""
    started = time.time()
    hf_to_torch_dist(run_dir.student_hf, run_dir.student_torch_dist)
    parity = check_parity(
        run_dir.student_hf,
        run_dir.student_torch_dist,
        batch_size=cfg.parity_batch_size,
        seq_len=cfg.parity_seq_len,
        seed=seed,
    )
    parity["tolerance"] = cfg.parity_tolerance
    write_json(run_dir.parity, parity)
    if parity["max_abs_logits_diff"] > cfg.parity_tolerance:
        raise RuntimeError(
            f"HF vs Megatron logits differ by {parity['max_abs_logits_diff']:.3e} "
            f"(> convert.parity_tolerance={cfg.parity_tolerance}): the conversion is wrong, "
            f"see {run_dir.parity}"
        )
    result = {"student_torch_dist": str(run_dir.student_torch_dist), "parity": parity}
    if teacher_checkpoint is not None and not teacher_checkpoint.exists():
        hf_to_torch_dist(run_dir.teacher_hf, teacher_checkpoint)
        result["teacher_torch_dist"] = str(teacher_checkpoint)
    result["seconds"] = round(time.time() - started, 3)
    return result
