"""The logic of each pipeline stage as a plain function of (config, run directory).

Prefect tasks in `tasks/` wrap these with caching, retries and UI artifacts; the functions
themselves know nothing about Prefect, so they run the same from a test or a notebook.
Each returns a small JSON-able dict that the stage marker stores (see rundir.run_cached).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from opd_core.config import OPDRunConfig
from opd_core.io import read_arrow, read_json, write_json
from opd_core.rundir import RunDir
from opd_core.schemas import EVAL_PROMPTS

# ----------------------------------------------------------------------------- convert


def teacher_checkpoint(cfg: OPDRunConfig, run_dir: RunDir) -> Path | None:
    """Where the Megatron teacher is (opd_type=megatron). A relative `opd_teacher_load` is
    resolved against the run directory, so `convert/teacher_torch_dist` names the convert
    stage's own output."""
    if not (cfg.algorithm.use_opd and cfg.algorithm.opd_type == "megatron"):
        return None
    path = Path(cfg.algorithm.opd_teacher_load)
    return path if path.is_absolute() else run_dir.root / path


def run_convert(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    """HF -> torch_dist for the student (and the teacher in megatron mode), with a parity check.

    Runs in a child process that exits when done: megatron's dist_checkpointing starts a
    multiprocessing Manager that a killed driver would leave behind, and the driver (the
    flow's process) should not keep an 8B model's tensors and allocator arenas for the rest
    of the run. Errors, e.g. a failed parity check, are raised here as in the child.
    """
    with ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        return pool.submit(_convert, cfg, run_dir).result()


def _convert(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    from opd_core.megatron.convert import check_parity, hf_to_torch_dist

    started = time.time()
    hf_to_torch_dist(run_dir.student_hf, run_dir.student_torch_dist)
    parity = check_parity(
        run_dir.student_hf,
        run_dir.student_torch_dist,
        batch_size=cfg.convert.parity_batch_size,
        seq_len=cfg.convert.parity_seq_len,
        seed=cfg.seed,
    )
    parity["tolerance"] = cfg.convert.parity_tolerance
    write_json(run_dir.stage("convert") / "parity.json", parity)
    if parity["max_abs_logits_diff"] > cfg.convert.parity_tolerance:
        raise RuntimeError(
            f"HF vs Megatron logits differ by {parity['max_abs_logits_diff']:.3e} "
            f"(> convert.parity_tolerance={cfg.convert.parity_tolerance}): the conversion is "
            "wrong, "
            f"see {run_dir.stage('convert') / 'parity.json'}"
        )
    result = {"student_torch_dist": str(run_dir.student_torch_dist), "parity": parity}
    teacher_ckpt = teacher_checkpoint(cfg, run_dir)
    if teacher_ckpt is not None and not teacher_ckpt.exists():
        hf_to_torch_dist(run_dir.teacher_hf, teacher_ckpt)
        result["teacher_torch_dist"] = str(teacher_ckpt)
    result["seconds"] = round(time.time() - started, 3)
    return result


# -------------------------------------------------------------------------------- eval


def run_eval(cfg: OPDRunConfig, run_dir: RunDir, stage: str, model_dir: Path) -> dict:
    """Every eval benchmark on the HF model in `model_dir` -> `<stage>/` (summary per benchmark
    under `benchmarks`, the first one's numbers at the top level)."""
    from opd_core.engine.generation import Generator
    from opd_core.evaluation import evaluate_benchmarks, write_eval

    prompts = read_arrow(run_dir.eval_data, EVAL_PROMPTS)
    generator = Generator(model_dir)
    samples, summary = evaluate_benchmarks(
        generator.generate_ids,
        generator.tokenizer,
        prompts,
        cfg.eval,
        seed=cfg.seed,
        context_length=generator.context_length,
        chat_template_kwargs=cfg.data.chat_template_kwargs,
    )
    summary["model_dir"] = str(model_dir)
    write_eval(run_dir.stage(stage), samples, summary)
    return summary


def run_final_eval(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    """The final eval plus the before/after report (report.md, curves.png)."""
    from opd_core.report import write_report

    summary = run_eval(cfg, run_dir, "final_eval", run_dir.final_student_hf)
    baseline = read_json(run_dir.stage("baseline_eval") / "summary.json")
    write_report(cfg, run_dir, baseline, summary)
    return summary
