"""Stages `baseline_eval` and `final_eval`: pass@1 / pass@k on the eval split.

The final eval also writes the before/after report and publishes the comparison table.
"""

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.report import comparison_rows
from opd_core.rundir import RunDir
from opd_core.stages import run_eval, run_final_eval
from tasks.common import cached_stage


@task(name="baseline_eval", cache_policy=NO_CACHE)
def baseline_eval(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    inputs = [run_dir.student_hf, run_dir.eval_data]
    build = lambda: run_eval(cfg, run_dir, "baseline_eval", run_dir.student_hf)
    summary = cached_stage(
        "baseline_eval", run_dir, cfg.section_hash("eval", "seed"), inputs, build
    )
    create_table_artifact(
        [_summary_row("baseline", summary)], key="baseline-eval", description="Baseline evaluation"
    )
    return summary


@task(name="final_eval", cache_policy=NO_CACHE)
def final_eval(cfg: OPDRunConfig, run_dir: RunDir, baseline: dict) -> dict:
    inputs = [
        run_dir.final_student_hf,
        run_dir.eval_data,
        run_dir.stage("baseline_eval") / "summary.json",
    ]
    build = lambda: run_final_eval(cfg, run_dir)
    summary = cached_stage("final_eval", run_dir, cfg.section_hash("eval", "seed"), inputs, build)
    rows = comparison_rows(baseline, summary)
    create_table_artifact(rows, key="before-after", description="Student before and after OPD")
    report = run_dir.stage("final_eval") / "report.md"
    create_markdown_artifact(report.read_text(), key="opd-report", description=f"Report ({report})")
    return summary


def _summary_row(name: str, summary: dict) -> dict:
    return {
        "model": name,
        **{k: summary.get(k) for k in ("pass_at_1", "pass_at_k", "k", "num_prompts")},
    }
