"""Tasks `baseline_eval` and `final_eval` (opd_core.stages.BaselineEval / FinalEval), with the
summary and before/after tables and the report as UI artifacts."""

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from opd_core.config import OPDRunConfig
from opd_core.io import read_json
from opd_core.report import comparison_rows
from opd_core.rundir import RunDir
from opd_core.stages import BaselineEval, FinalEval
from tasks.common import run_stage


@task(name="baseline_eval", cache_policy=NO_CACHE)
def baseline_eval(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    summary = run_stage(BaselineEval(cfg, run_dir))
    create_table_artifact(
        [_summary_row("baseline", summary)], key="baseline-eval", description="Baseline evaluation"
    )
    return summary


@task(name="final_eval", cache_policy=NO_CACHE)
def final_eval(cfg: OPDRunConfig, run_dir: RunDir) -> dict:
    summary = run_stage(FinalEval(cfg, run_dir))
    baseline = read_json(run_dir.eval_summary("baseline_eval"))
    create_table_artifact(
        comparison_rows(baseline, summary),
        key="before-after",
        description="Student before and after OPD",
    )
    create_markdown_artifact(
        run_dir.report.read_text(), key="opd-report", description=f"Report ({run_dir.report})"
    )
    return summary


def _summary_row(name: str, summary: dict) -> dict:
    keys = ("pass_at_1", "pass_at_k", "k", "num_prompts")
    return {"model": name, **{k: summary.get(k) for k in keys}}
