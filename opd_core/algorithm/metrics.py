"""Per-round training metrics: computing them, storing them in `train/metrics.arrow`, plotting them.

    rollout = round_metrics(rewards, correct, response_lengths, advantage_result)
    row = {"round": r, **rollout, **train_metrics}
    with MetricsLog(train_dir / "metrics.arrow", loggers=cfg.algorithm.loggers) as log:
        log.append(row)
    plot_curves(read_arrow(train_dir / "metrics.arrow"), "curves.png")

`metrics.arrow` holds one row per round (keyed by `round`; a resumed run that redoes a round
replaces its row) and is rewritten atomically after each append, so it is always readable.
TensorBoard (`loggers: [tensorboard]`, needs the `tensorboard` package) writes under
`<dir of metrics.arrow>/tensorboard`; W&B (`loggers: [wandb]`, needs `wandb` and a login or
WANDB_MODE=offline) logs each row at step = round. A requested logger that is not installed
is skipped with a warning: live dashboards are optional, the Arrow file is the record.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Iterable, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from opd_core.algorithm.advantages import AdvantageResult
from opd_core.io import atomic_path, read_arrow, write_arrow

__all__ = ["MetricsLog", "plot_curves", "round_metrics"]

log = logging.getLogger(__name__)

# The three curves that tell whether distillation works, in plot order.
CURVES = (
    ("opd_reverse_kl", "reverse KL (student || teacher)"),
    ("rollout_pass_rate", "rollout pass rate"),
    ("reward_mean", "reward mean"),
    ("lr", "learning rate"),
)


def round_metrics(
    rewards: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray | None = None,
    response_lengths: Sequence[int] | None = None,
    advantage_result: AdvantageResult | None = None,
) -> dict[str, float]:
    """The rollout side of a round's row: reward, pass rate, length, OPD KL and teacher log-prob.

    `opd_reverse_kl` is the masked mean over response tokens of old - teacher log-probs (from
    `advantage_result`); NaN when the round had no teacher scores.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    nan = float("nan")
    row = {
        "num_samples": float(len(rewards)),
        "reward_mean": float(rewards.mean()) if len(rewards) else nan,
        "rollout_pass_rate": float(np.mean(correct))
        if correct is not None and len(correct)
        else nan,
        "response_length_mean": float(np.mean(response_lengths))
        if response_lengths is not None and len(response_lengths)
        else nan,
        "opd_reverse_kl": nan,
        "teacher_logprob_mean": nan,
    }
    if advantage_result is not None:
        row["opd_reverse_kl"] = advantage_result.opd_reverse_kl
        row["teacher_logprob_mean"] = advantage_result.teacher_logprob_mean
        row.update(advantage_result.metrics)
    return row


def _scalar(value: Any) -> float | int | str | None:
    """A plain Arrow-friendly value: numbers as float (NaN kept), text as text, else JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (Number, np.number)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.reshape(-1)[0])
    return json.dumps(value, default=str)


class MetricsLog:
    """Append-only per-round metrics table at `path`, plus optional live loggers."""

    def __init__(
        self,
        path: str | Path,
        loggers: Iterable[str] = (),
        wandb_project: str | None = None,
        run_name: str | None = None,
    ):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = (
            read_arrow(self.path).to_pylist() if self.path.is_file() else []
        )
        self._tensorboard = self._wandb = None
        for name in loggers:
            if name == "tensorboard":
                self._tensorboard = self._open_tensorboard()
            elif name == "wandb":
                self._wandb = self._open_wandb(wandb_project, run_name)
            else:
                raise ValueError(f"unknown logger {name!r} (expected tensorboard or wandb)")

    def _open_tensorboard(self):
        if importlib.util.find_spec("tensorboard") is None:
            log.warning(
                "logger tensorboard requested but the tensorboard package is not installed; "
                "skipping it"
            )
            return None
        # Optional extra: imported only when the tensorboard logger is asked for.
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def _open_wandb(self, project: str | None, run_name: str | None):
        if importlib.util.find_spec("wandb") is None:
            log.warning(
                "logger wandb requested but the wandb package is not installed; skipping it"
            )
            return None
        import wandb  # optional extra: imported only when the wandb logger is asked for

        return wandb.init(
            project=project or "opd", name=run_name, dir=str(self.path.parent), resume="allow"
        )

    def append(self, metrics: dict[str, Any]) -> None:
        """Add (or replace) the row of `metrics["round"]`, rewrite the file, forward to loggers."""
        if "round" not in metrics:
            raise ValueError(f"a metrics row needs a 'round' key; got keys {sorted(metrics)}")
        round_index = int(metrics["round"])
        row = {"round": round_index} | {k: _scalar(v) for k, v in metrics.items() if k != "round"}
        self.rows = [r for r in self.rows if r.get("round") != round_index] + [row]
        self.rows.sort(key=lambda r: r["round"])
        write_arrow(self.path, self.table())
        numeric = {k: v for k, v in row.items() if isinstance(v, float) and k != "round"}
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(f"train/{key}", value, global_step=round_index)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in numeric.items()}, step=round_index)

    def table(self) -> pa.Table:
        """All rows; columns are the union of keys in first-seen order, missing values null."""
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        data = {}
        for name in columns:
            values = [row.get(name) for row in self.rows]
            kind = (
                pa.int64()
                if name == "round"
                else (pa.string() if any(isinstance(v, str) for v in values) else pa.float64())
            )
            if kind == pa.string():
                values = [None if v is None else str(v) for v in values]
            data[name] = pa.array(values, type=kind)
        return pa.table(data) if data else pa.table({"round": pa.array([], type=pa.int64())})

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tensorboard = self._wandb = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot_curves(
    metrics_table: pa.Table | str | Path, out_png: str | Path, title: str | None = None
) -> Path:
    """Reverse KL, rollout pass rate, reward and lr per round, side by side, as a PNG."""
    table = read_arrow(metrics_table) if isinstance(metrics_table, (str, Path)) else metrics_table
    rounds = (
        table.column("round").to_pylist()
        if "round" in table.column_names
        else list(range(table.num_rows))
    )
    # A bare Figure, not pyplot: no GUI backend to select (servers, tests) and no global state.
    figure = Figure(figsize=(4.2 * len(CURVES), 3.4))
    axes = figure.subplots(1, len(CURVES))
    for axis, (column, label) in zip(axes, CURVES):
        values = table.column(column).to_pylist() if column in table.column_names else []
        points = [(r, v) for r, v in zip(rounds, values) if v is not None and not math.isnan(v)]
        if points:
            axis.plot(*zip(*points), marker="o")
        else:
            axis.text(
                0.5,
                0.5,
                "not recorded",
                ha="center",
                va="center",
                transform=axis.transAxes,
                color="gray",
            )
        axis.set_title(label)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return Path(out_png)
