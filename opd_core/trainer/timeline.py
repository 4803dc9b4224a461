"""A round's timeline: when each phase ran and when each server was busy; drawn as a Gantt plot.

    timeline = RoundTimeline()
    with timeline("generate"): ...                    # a phase on this thread
    timeline.record("score", start, end)              # one that ran on other threads
    timeline.add_servers("rollout", client.request_spans())
    row = timeline.metrics()
    # {"time_generate": 0.41, "time_generate_start": 0.0, "time_generate_end": 0.41, ...,
    #  "time_servers": {"rollout": {"http://127.0.0.1:4100": [[0.01, 0.40]]}, "teacher": ...},
    #  "seconds": 1.37}
    plot_timeline(read_arrow(run_dir.train_metrics), "timeline.png", rounds=3)

Times are seconds from the round's start (perf_counter in the driver). `time_<phase>` is the
phase's length; phases may overlap (streamed scoring), so their sum can exceed `seconds`, the
round's wall time. A server's spans are the requests it answered (sent to answered, as the
driver saw them), overlapping ones merged: its busy time. Requests that went through
sglang-router are the router's (the driver cannot tell which engine took them); batches with
per-sequence params (seeded rollouts) go to the engines directly (see EngineClient). In
`metrics.arrow` `time_servers` is a JSON string; files written before it simply lack it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
from matplotlib.figure import Figure

from opd_core.io import atomic_path, read_arrow

__all__ = ["PHASES", "RoundTimeline", "plot_timeline"]

# A round's phases in the order they start (streamed scoring overlaps generate and reward;
# async rounds wait for the next round's rollouts after the step).
PHASES = ("generate", "reward", "score", "train", "wait_rollouts", "sync")
_COLORS = {
    "generate": "tab:blue",
    "reward": "tab:olive",
    "score": "tab:orange",
    "train": "tab:green",
    "wait_rollouts": "tab:gray",
    "sync": "tab:purple",
}
_SERVER_COLORS = {"rollout": "tab:blue", "teacher": "tab:orange"}


class RoundTimeline:
    """Phase spans and server busy spans of one round (module docstring)."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self.phases: dict[str, tuple[float, float]] = {}
        self.servers: dict[str, dict[str, list[list[float]]]] = {}

    def now(self) -> float:
        """Seconds since the round started."""
        return time.perf_counter() - self.origin

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self.now()
        try:
            yield
        finally:
            self.record(phase, start, self.now())

    def record(self, phase: str, start: float, end: float) -> None:
        self.phases[phase] = (start, end)

    def rebase(self) -> None:
        """Start the round now: phases recorded so far move to negative times (async rounds:
        rollouts made while the round before trained)."""
        shift = time.perf_counter() - self.origin
        self.origin += shift
        self.phases = {p: (start - shift, end - shift) for p, (start, end) in self.phases.items()}

    def add_servers(self, role: str, spans: Sequence[tuple[str, float, float]]) -> None:
        """`spans`: (url, sent, answered) in perf_counter seconds (EngineClient.request_spans)."""
        busy = self.servers.setdefault(role, {})
        for url, sent, answered in sorted(spans, key=lambda span: span[1]):
            merged = busy.setdefault(url, [])
            start, end = round(sent - self.origin, 4), round(answered - self.origin, 4)
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])

    def metrics(self) -> dict:
        """The round's `time_*` metrics and `seconds` (its wall time until now)."""
        row: dict = {}
        for phase, (start, end) in self.phases.items():
            row[f"time_{phase}"] = end - start
            row[f"time_{phase}_start"], row[f"time_{phase}_end"] = start, end
        return {**row, "time_servers": self.servers, "seconds": self.now()}


def _lanes(row: dict) -> list[tuple[str, list[tuple[float, float]], str, float]]:
    """(label, [(start, width)], color, alpha) per phase and per server of a metrics row."""
    lanes = []
    for phase in PHASES:
        start, end = row.get(f"time_{phase}_start"), row.get(f"time_{phase}_end")
        if start is not None and end is not None:
            lanes.append((phase, [(start, end - start)], _COLORS[phase], 0.9))
    servers = row.get("time_servers") or {}
    if isinstance(servers, str):  # metrics.arrow holds it as JSON, metrics.json as it is
        servers = json.loads(servers)
    for role, by_url in servers.items():
        for index, (url, spans) in enumerate(sorted(by_url.items())):
            label = f"{role} {index} ({url.rsplit(':', 1)[-1]})"
            color = _SERVER_COLORS.get(role, "gray")
            lanes.append((label, [(a, b - a) for a, b in spans], color, 0.45))
    return lanes


def plot_timeline(
    metrics_table: pa.Table | str | Path, out_png: str | Path, rounds: int = 3
) -> Path | None:
    """The last `rounds` rounds as Gantt charts (one per round, on a shared time axis): each
    phase's span and each server's busy spans. None, and nothing written, when the metrics
    hold no timeline (files from before it was recorded)."""
    table = read_arrow(metrics_table) if isinstance(metrics_table, (str, Path)) else metrics_table
    if "time_generate_start" not in table.column_names:
        return None
    rows = [r for r in table.to_pylist() if r.get("time_generate_start") is not None][-rounds:]
    if not rows:
        return None
    per_round = [_lanes(row) for row in rows]
    height = sum(len(lanes) for lanes in per_round) * 0.32 + 1.2 * len(rows)
    # A bare Figure, not pyplot: no GUI backend to select and no global state.
    figure = Figure(figsize=(10, max(3.0, height)))
    axes = figure.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    for axis, row, lanes in zip(axes, rows, per_round):
        for y, (_, spans, color, alpha) in enumerate(lanes):
            axis.broken_barh(spans, (y - 0.4, 0.8), color=color, alpha=alpha)
        axis.set_yticks(range(len(lanes)), [lane[0] for lane in lanes])
        axis.invert_yaxis()
        axis.set_title(f"round {row['round']}: {row['seconds']:.2f} s", loc="left", fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds from the round's start")
    figure.suptitle("Where a round's time goes (phases; servers busy)")
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return Path(out_png)
