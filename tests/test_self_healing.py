"""Rounds that heal themselves: a part of a running training run is SIGKILLed mid-round and
the run finishes by itself, every rollout row written and scored exactly once, with the same
metrics as an uninterrupted run of the same seed (to float rounding).

The kill comes from the reward function of round 1 (it runs between generation and scoring,
in the driver), on a helper thread that waits until the process is gone. That puts it at the
same point of the same round every time:
  - teacher replica: round 1's scoring then meets a dead replica (the client waits while the
    fleet relaunches it);
  - rollout engine: round 1's weight sync meets a dead engine (relaunched with the new
    weights), round 2 generates from it;
  - training actor: round 1's next actor call fails, the actors are rebuilt from round 0's
    checkpoint and round 1 is redone (the reward function kills once, so the redo runs).

The runs call the stages in this process (download and convert once, copied per run), on one
Ray cluster: the same code the flow runs, without Prefect's start-up per run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest
from tiny_runs import (
    KILLING_REWARD,
    SMALL_BATCHES,
    TINY_TOY,
    assert_same_metrics,
    local_ray,
    prepare_toy,
    round_metrics,
)

from opd_core.config import load_config
from opd_core.io import read_arrow, read_json
from opd_core.rundir import RunDir
from opd_core.schemas import ROLLOUTS, TEACHER_LOGPROBS

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 3
RUN = [f"rollout.num_rollout={ROUNDS}", "train.save_interval=1", *SMALL_BATCHES, *TINY_TOY]


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=8):
        yield


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """download + convert of the tiny toy, done once."""
    return prepare_toy(tmp_path_factory.mktemp("prepared"), RUN)


def _run(prepared: Path, tmp_path: Path, target: str, *extra: str) -> tuple[Path, float]:
    """A copy of the prepared run, trained with a reward function that kills `target` in
    round 1; returns the run directory and the train stage's seconds."""
    from opd_core.stages import Teacher, Train

    root = tmp_path / target
    shutil.copytree(prepared, root, symlinks=True)
    reward = tmp_path / f"reward_{target}.py"
    reward.write_text(
        KILLING_REWARD.format(
            target=target, root=str(root), marker=str(tmp_path / f"{target}.k"), call=2
        )
    )
    cfg = load_config(REPO / "configs" / "toy.yaml", [*RUN, f"reward.type={reward}:reward", *extra])
    run_dir = RunDir.open(root)
    with Teacher(cfg, run_dir).serve() as teacher:
        started = time.perf_counter()
        Train(cfg, run_dir).run(teacher=teacher)
        return root, time.perf_counter() - started


def _restarts(root: Path) -> dict[str, int]:
    totals: dict[str, int] = {}
    for r in range(ROUNDS):
        for key, value in read_json(root / "train" / f"round_{r:04d}" / "metrics.json").items():
            if key.endswith("_restarts"):
                totals[key] = totals.get(key, 0) + value
    return totals


def _rows(table: pa.Table) -> list[tuple[int, int]]:
    return list(
        zip(table.column("prompt_index").to_pylist(), table.column("sample_index").to_pylist())
    )


def _check_exactly_once(root: Path) -> None:
    """Every round: each (prompt_index, sample_index) once in rollouts.arrow, and the same
    rows, each once, in teacher_logprobs.arrow, aligned token for token."""
    per_round = 4 * 2  # SMALL_BATCHES: 4 prompts x 2 samples
    for r in range(ROUNDS):
        round_dir = root / "train" / f"round_{r:04d}"
        rollouts = read_arrow(round_dir / "rollouts.arrow", ROLLOUTS)
        scores = read_arrow(round_dir / "teacher_logprobs.arrow", TEACHER_LOGPROBS)
        rows = _rows(rollouts)
        assert len(rows) == len(set(rows)) == per_round, (r, rows)
        assert _rows(scores) == rows, (r, _rows(scores))
        lengths = pa.compute.list_value_length
        assert lengths(scores.column("teacher_logprobs")) == lengths(
            rollouts.column("response_ids")
        )
        assert set(rollouts.column("weight_version").to_pylist()) == {str(r)}


@pytest.fixture(scope="module")
def reference(ray_cluster, prepared, tmp_path_factory) -> tuple[list[dict], float]:
    root, seconds = _run(prepared, tmp_path_factory.mktemp("reference"), "none")
    assert _restarts(root) == {
        "rollout_engine_restarts": 0,
        "teacher_replica_restarts": 0,
        "trainer_restarts": 0,
    }
    return round_metrics(root, ROUNDS), seconds


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, counter",
    [
        ("teacher", "teacher_replica_restarts"),
        ("rollout", "rollout_engine_restarts"),
        ("actor", "trainer_restarts"),
    ],
)
def test_a_part_killed_mid_round_heals_with_exactly_once_rows(
    reference, prepared, tmp_path, target, counter
):
    root, seconds = _run(prepared, tmp_path, target)
    expected, reference_seconds = reference
    restarts = _restarts(root)
    print(
        f"\n{target} killed in round 1: restarts {restarts}; train stage {seconds:.1f} s, "
        f"uninterrupted {reference_seconds:.1f} s: the fault cost "
        f"{seconds - reference_seconds:+.1f} s"
    )
    assert restarts[counter] == 1 and sum(restarts.values()) == 1, restarts
    _check_exactly_once(root)
    assert_same_metrics(
        round_metrics(root, ROUNDS), expected
    )  # the same seed, the same run, fault or not
