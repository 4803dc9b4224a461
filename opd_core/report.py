"""The final report: a before/after table and the training curves.

final_eval/report.md    baseline vs final pass@1 / pass@k, per-round training table
final_eval/curves.png   reverse KL to the teacher and rollout accuracy per round
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from opd_core.algorithm.metrics import plot_curves
from opd_core.config import OPDRunConfig
from opd_core.io import read_arrow, write_text
from opd_core.rundir import RunDir

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


def comparison_rows(baseline: dict, final: dict) -> list[dict]:
    """One row per metric: baseline, final, delta (what the table artifact and the CLI show)."""
    rows = []
    for key, label in COMPARED:
        if key in baseline and key in final:
            label = label.replace("pass@k", f"pass@{final.get('k', 'k')}")
            rows.append(
                {
                    "metric": label,
                    "baseline": baseline[key],
                    "final": final[key],
                    "delta": final[key] - baseline[key],
                }
            )
    return rows


def round_rows(run_dir: RunDir) -> list[dict]:
    path = run_dir.train_metrics
    if not path.is_file():
        return []
    table: pa.Table = read_arrow(path)
    keep = [c for c in ROUND_COLUMNS if c in table.column_names]
    return table.select(keep).to_pylist()


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    headers = list(rows[0])
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(row.get(h)) for h in headers) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(cfg: OPDRunConfig, run_dir: RunDir, baseline: dict, final: dict) -> Path:
    out_dir = run_dir.stage("final_eval")
    metrics_path = run_dir.train_metrics
    curves = None
    if metrics_path.is_file():
        curves = plot_curves(read_arrow(metrics_path), out_dir / "curves.png")
    a = cfg.algorithm
    opd = f"top-{a.opd_topk} OPD" if a.opd_topk else "OPD"
    method = f"{a.advantage_estimator}" + (
        f" + {opd} ({a.opd_type} teacher, opd_kl_coef={a.opd_kl_coef})" if a.use_opd else ""
    )
    text = (
        f"# OPD run `{run_dir.root.name}` ({cfg.name})\n\n"
        f"Student `{cfg.models.student}`, teacher `{cfg.models.teacher}`, {method}, reward `{cfg.reward.type}`, "
        f"{cfg.rollout.num_rollout} rounds x {cfg.rollout.rollout_batch_size} prompts x "
        f"{cfg.rollout.n_samples_per_prompt} samples.\n\n"
        f"## Before / after ({final.get('num_prompts')} eval prompts)\n\n"
        + markdown_table(comparison_rows(baseline, final))
        + "\n## Training rounds\n\n"
        + markdown_table(round_rows(run_dir))
        + (f"\n![curves]({Path(curves).name})\n" if curves else "")
    )
    return write_text(run_dir.report, text)
