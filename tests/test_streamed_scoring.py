"""Streamed scoring writes what the serial loop writes, and each round records its timeline.

Two train stages of the same seed on one prepared tiny toy run: serial (score after the whole
round is generated, one rollout engine) and streamed (the teacher scores each generated
client batch while the others generate, two rollout engines behind sglang-router). Checked:
every round's rollouts.arrow and teacher_logprobs.arrow are equal row for row (every column
exact, the log-prob columns to float rounding: an engine's batched forward rounds differently
depending on which requests it batches together, which even two serial runs do not control),
each (prompt, sample) once; the metrics hold the timeline (phases ordered,
inside the round; streamed scoring starts before generation ends) and each engine's busy
spans; the report's Gantt plot is written from them.

The stages are called in this process (download and convert once, copied per run), as in
tests/test_self_healing.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from tiny_runs import SMALL_BATCHES, TINY_TOY, assert_same_rows, local_ray, prepare_toy

from opd_core.config import load_config
from opd_core.io import read_arrow, read_json
from opd_core.rundir import RunDir
from opd_core.schemas import ROLLOUTS, TEACHER_LOGPROBS
from opd_core.trainer.pieces import Pieces
from opd_core.trainer.timeline import plot_timeline

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3
# 4 prompts x 2 samples in client batches of 2: four batches a round to stream.
RUN = [
    f"rollout.num_rollout={ROUNDS}",
    "train.save_interval=100",
    "client.batch_size=2",
    *SMALL_BATCHES,
    *TINY_TOY,
]
PHASES = ("generate", "reward", "score", "train", "sync")


def _train(prepared: Path, root: Path, *extra: str) -> Path:
    from opd_core.stages import Teacher, Train

    shutil.copytree(prepared, root, symlinks=True)
    cfg = load_config(REPO / "configs" / "toy.yaml", [*RUN, *extra])
    run_dir = RunDir.open(root)
    with Teacher(cfg, run_dir).serve() as teacher:
        Train(cfg, run_dir).run(teacher=teacher)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """The serial and the streamed run of one prepared toy run (download + convert once)."""
    base = tmp_path_factory.mktemp("runs")
    with local_ray(num_cpus=8):
        prepared = prepare_toy(base / "prepared", RUN)
        yield {
            "serial": _train(prepared, base / "serial", "rollout.stream_scoring=false"),
            "streamed": _train(
                prepared,
                base / "streamed",
                "rollout.stream_scoring=true",
                "rollout.num_engines=2",
                "rollout.router_policy=round_robin",
            ),
        }


def _round(root: Path, r: int) -> Path:
    return root / "train" / f"round_{r:04d}"


@pytest.mark.slow
def test_streamed_rows_equal_the_serial_rows(runs):
    for r in range(ROUNDS):
        tables = {}
        for mode, root in runs.items():
            rollouts = read_arrow(_round(root, r) / "rollouts.arrow", ROLLOUTS)
            scores = read_arrow(_round(root, r) / "teacher_logprobs.arrow", TEACHER_LOGPROBS)
            rows = list(
                zip(*(rollouts.column(c).to_pylist() for c in ("prompt_index", "sample_index")))
            )
            assert len(rows) == len(set(rows)) == 4 * 2, (mode, r, rows)  # each sample once
            assert (
                list(zip(*(scores.column(c).to_pylist() for c in ("prompt_index", "sample_index"))))
                == rows
            )
            tables[mode] = rollouts, scores
        for i, name in enumerate(("rollouts", "teacher_logprobs")):
            serial, streamed = tables["serial"][i], tables["streamed"][i]
            assert_same_rows(streamed, serial, f"round {r} {name}")


@pytest.mark.slow
def test_each_round_records_its_timeline(runs):
    for mode, root in runs.items():
        metrics = read_arrow(root / "train" / "metrics.arrow")
        for row in metrics.to_pylist():
            seconds = row["seconds"]
            for phase in PHASES:
                start, end = row[f"time_{phase}_start"], row[f"time_{phase}_end"]
                assert 0 <= start <= end <= seconds, (mode, phase, start, end, seconds)
                assert row[f"time_{phase}"] == pytest.approx(end - start)
            # generate -> reward -> train -> sync one after the other; score before train.
            order = [row[f"time_{p}_start"] for p in ("generate", "reward", "train", "sync")]
            assert order == sorted(order)
            assert row["time_reward_start"] >= row["time_generate_end"]
            assert row["time_score_end"] <= row["time_train_start"]
            if mode == "streamed":  # the teacher started while the rollouts were generating
                assert row["time_score_start"] < row["time_generate_end"], row
            else:
                assert row["time_score_start"] >= row["time_reward_end"]
            servers = json.loads(row["time_servers"])
            engines = read_json(root / "train" / "placement.json")
            rollout_urls = {p["url"] for p in engines if p["role"] == "rollout"}
            # Seeded samples go to the engines directly (sglang-router takes no per-sequence
            # params), so each engine's busy spans are known, both engines used.
            assert set(servers["rollout"]) == rollout_urls, (mode, servers["rollout"])
            assert len(servers["teacher"]) == 1
            for role, by_url in servers.items():
                for url, spans in by_url.items():
                    flat = [t for span in spans for t in span]
                    assert flat == sorted(flat), (role, url, spans)  # merged, in order
                    assert row["time_generate_start"] <= flat[0] and flat[-1] <= seconds
            rollout_spans = [s for spans in servers["rollout"].values() for s in spans]
            assert max(end for _, end in rollout_spans) <= row["time_generate_end"] + 1e-3
        assert len(rollout_urls) == (2 if mode == "streamed" else 1)


@pytest.mark.slow
def test_the_report_draws_the_timeline(runs, tmp_path):
    metrics = read_arrow(runs["streamed"] / "train" / "metrics.arrow")
    png = plot_timeline(metrics, tmp_path / "timeline.png", rounds=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_old_metrics_without_a_timeline_draw_nothing(tmp_path):
    old = pa.table({"round": [0, 1], "seconds": [1.0, 1.2], "time_generate": [0.3, 0.4]})
    assert plot_timeline(old, tmp_path / "timeline.png") is None
    assert not (tmp_path / "timeline.png").exists()


def test_pieces_take_each_row_exactly_once():
    pieces: Pieces[str] = Pieces("round 0 rollouts")
    pieces.add(2, 2, "b")
    pieces.add(0, 2, "a")
    with pytest.raises(RuntimeError, match=r"rows 2\.\.3 came twice"):
        pieces.add(2, 2, "b again")  # e.g. a resent batch delivered a second time
    with pytest.raises(RuntimeError, match="4 of 6 rows arrived"):
        pieces.ordered(6)
    pieces.add(4, 2, "c")
    assert pieces.ordered(6) == ["a", "b", "c"]
    gap: Pieces[str] = Pieces("scores")
    gap.add(0, 1, "a")
    gap.add(2, 2, "c")
    with pytest.raises(RuntimeError, match="rows from 1 are missing"):
        gap.ordered(4)
