"""The final report: before/after tables per benchmark, and the training curves.

final_eval/report.md    per benchmark: baseline vs final accuracy (pass@1, avg@n, pass@k),
                        response length, truncated and no-answer shares, and per subject /
                        level where the benchmark has them; then the per-round training table
final_eval/curves.png   reverse KL to the teacher and rollout accuracy per round
final_eval/timeline.png the last rounds' timelines: each phase and each server's busy spans
<eval stage>/summary.md one eval's per-benchmark table (eval_markdown)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from opd_core.algorithm.metrics import plot_curves
from opd_core.config import OPDRunConfig
from opd_core.io import read_arrow, write_text
from opd_core.rundir import RunDir
from opd_core.trainer.timeline import plot_timeline

__all__ = [
    "benchmark_rows",
    "benchmarks_of",
    "comparison_rows",
    "eval_markdown",
    "group_rows",
    "markdown_table",
    "write_report",
]

COMPARED = (
    ("pass_at_1", "pass@1 (greedy)"),
    ("pass_at_k", "pass@k"),
    ("mean_sample_accuracy", "sampled accuracy"),
)
ROUND_COLUMNS = (
    "round",
    "opd_reverse_kl",
    "rollout_pass_rate",
    "reward_mean",
    "loss",
    "grad_norm",
    "seconds",
)


def _pass_at_1_label(summary: dict) -> str:
    kind = summary.get("pass_at_1_kind", "greedy")
    return f"pass@1 ({kind})"


def comparison_rows(baseline: dict, final: dict) -> list[dict]:
    """The headline rows (the first benchmark's top-level numbers): baseline, final, delta.
    What the CLI prints and the before/after table artifact shows."""
    rows = []
    for key, label in COMPARED:
        if key in baseline and key in final:
            if key == "pass_at_1":
                label = _pass_at_1_label(final)
            label = label.replace("pass@k", f"pass@{final.get('k', 'k')}")
            rows.append(_row(label, baseline[key], final[key]))
    return rows


def _row(metric: str, baseline: Any, final: Any) -> dict:
    numeric = isinstance(baseline, (int, float)) and isinstance(final, (int, float))
    return {
        "metric": metric,
        "baseline": baseline,
        "final": final,
        "delta": final - baseline if numeric else None,
    }


def benchmarks_of(summary: dict) -> dict[str, dict]:
    """{benchmark name: its summary}; a summary from before multi-benchmark evals is one."""
    if "benchmarks" in summary:
        return summary["benchmarks"]
    return {summary.get("benchmark", "eval"): summary}


def _metrics(summary: dict) -> list[tuple[str, Any]]:
    """(label, value) of one benchmark's numbers, in report order."""
    n = summary.get("n_samples", summary.get("k"))
    out = []
    if summary.get("greedy_pass_at_1") is not None:
        out.append(("pass@1 (greedy)", summary["greedy_pass_at_1"]))
    if "avg_at_n" in summary:
        out.append((f"avg@{n} (sampled accuracy = sampled pass@1)", summary["avg_at_n"]))
    for k, value in summary.get("pass_at", {}).items():
        if k != "1":  # pass@1 of the samples is avg@n, the row above
            out.append((f"pass@{k} (of {n} samples)", value))
    if "pass_at" not in summary:  # an older summary: the keys it had
        out += [(label, summary[key]) for key, label in COMPARED if key in summary]
    for key, label in (
        ("response_tokens_mean", "response tokens (mean)"),
        ("truncated_share", "cut at max_new_tokens"),
        ("no_answer_share", "no extractable answer"),
    ):
        if key in summary:
            out.append((label, summary[key]))
    return out


def benchmark_rows(baseline: dict, final: dict) -> list[dict]:
    """One benchmark before and after: metric, baseline, final, delta."""
    before = dict(_metrics(baseline))
    return [_row(label, before.get(label), value) for label, value in _metrics(final)]


def group_rows(baseline: dict | None, final: dict, key: str) -> list[dict]:
    """Per value of a group field (e.g. MATH-500's subject): prompts and the headline pass@1,
    before and after (or its one value when there is no baseline)."""
    before = (baseline or {}).get("by_group", {}).get(key, {})
    rows = []
    for value, numbers in final.get("by_group", {}).get(key, {}).items():
        row = {key: value, "prompts": numbers["num_prompts"]}
        if baseline is None:
            row["pass@1"] = numbers["pass_at_1"]
        else:
            row.update(_row("", before.get(value, {}).get("pass_at_1"), numbers["pass_at_1"]))
            del row["metric"]
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    headers = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(row.get(h)) for h in headers) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _heading(name: str, summary: dict) -> str:
    sampling = (
        f"{summary.get('n_samples', summary.get('k'))} samples per prompt at temperature "
        f"{summary.get('temperature')}, top-p {summary.get('top_p', 1.0)}, "
        f"max {summary.get('max_new_tokens')} new tokens"
    )
    return f"### {name} ({summary.get('num_prompts')} prompts; {sampling})\n\n"


def _benchmark_sections(baseline: dict | None, final: dict) -> str:
    before_all = benchmarks_of(baseline) if baseline is not None else {}
    text = ""
    for name, after in benchmarks_of(final).items():
        before = before_all.get(name)
        text += _heading(name, after)
        if baseline is None:
            rows = [{"metric": label, "value": value} for label, value in _metrics(after)]
        else:
            rows = benchmark_rows(before or {}, after)
        text += markdown_table(rows)
        for key in after.get("by_group", {}):
            text += f"\nBy {key} ({_pass_at_1_label(after)}):\n\n"
            group_baseline = None if baseline is None else before or {}
            text += markdown_table(group_rows(group_baseline, after, key))
        text += "\n"
    return text


def eval_markdown(summary: dict) -> str:
    """One eval stage's results, per benchmark (written as `<stage>/summary.md`)."""
    return "## Evaluation\n\n" + _benchmark_sections(None, summary)


def round_rows(run_dir: RunDir) -> list[dict]:
    path = run_dir.train_metrics
    if not path.is_file():
        return []
    table: pa.Table = read_arrow(path)
    keep = [c for c in ROUND_COLUMNS if c in table.column_names]
    return table.select(keep).to_pylist()


def write_report(cfg: OPDRunConfig, run_dir: RunDir, baseline: dict, final: dict) -> Path:
    out_dir = run_dir.stage("final_eval")
    metrics_path = run_dir.train_metrics
    curves = timeline = None
    if metrics_path.is_file():
        metrics = read_arrow(metrics_path)
        curves = plot_curves(metrics, out_dir / "curves.png")
        timeline = plot_timeline(metrics, out_dir / "timeline.png")
    a = cfg.algorithm
    opd = f"top-{a.opd_topk} OPD" if a.opd_topk else "OPD"
    method = f"{a.advantage_estimator}" + (
        f" + {opd} ({a.opd_type} teacher, opd_kl_coef={a.opd_kl_coef})" if a.use_opd else ""
    )
    text = (
        f"# OPD run `{run_dir.root.name}` ({cfg.name})\n\n"
        f"Student `{cfg.models.student}`, teacher `{cfg.models.teacher}`, {method}, "
        f"reward `{cfg.reward.type}`, {cfg.rollout.num_rollout} rounds x "
        f"{cfg.rollout.rollout_batch_size} prompts x {cfg.rollout.n_samples_per_prompt} "
        "samples.\n\n"
        f"## Before / after ({next(iter(benchmarks_of(final)))}, "
        f"{final.get('num_prompts')} eval prompts)\n\n"
        + markdown_table(comparison_rows(baseline, final))
        + "\n## Per benchmark\n\n"
        + _benchmark_sections(baseline, final)
        + "## Training rounds\n\n"
        + markdown_table(round_rows(run_dir))
        + (f"\n![curves]({Path(curves).name})\n" if curves else "")
        + (
            f"\n## Where a round's time goes\n\n![timeline]({Path(timeline).name})\n"
            if timeline
            else ""
        )
    )
    return write_text(run_dir.report, text)
