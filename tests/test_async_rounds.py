"""Asynchronous rounds (rollout.async_rounds): round k+1's rollouts are made while round k
trains, so round k's come from the policy after max(k-1, 0) steps.

On the tiny toy (tests/tiny_runs.py), with seeded rollouts and a constant lr (the schedule
then does not depend on num_rollout):
  - every round's rows carry the weight version they were sampled from, one step behind;
  - the old log-probs the step uses (the actor's `opd_reverse_kl` = old - teacher, token
    mean) are the engine's rollout log-probs, not a recomputation by the current policy;
  - a run of 2 rounds continued to 4 (checkpoints every 2 rounds, one HF export kept) ends
    exactly as an uninterrupted 4-round run: rounds 2-3 the same rows and metrics;
  - a training actor killed while the next round's rollouts are being made: the run rebuilds
    the actors, redoes the round, and ends as the uninterrupted run.

The runs call the stages in this process (download and convert once, copied per run), on one
Ray cluster.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import (
    KILLING_REWARD,
    SMALL_BATCHES,
    TINY_TOY,
    assert_same_metrics,
    assert_same_rows,
    local_ray,
    prepare_toy,
    round_metrics,
)

from opd_core.config import load_config
from opd_core.io import read_arrow, read_json
from opd_core.rundir import RunDir
from opd_core.schemas import ROLLOUTS, TEACHER_LOGPROBS

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 4
RUN = [
    *TINY_TOY,
    *SMALL_BATCHES,
    "rollout.async_rounds=true",
    "train.lr_decay_style=constant",
    "train.save_interval=2",
    "train.keep_hf_exports=1",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_toy(tmp_path_factory.mktemp("prepared"), RUN)


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=8):
        yield


def _train(root: Path, *extra: str) -> None:
    from opd_core.stages import Teacher, Train

    cfg = load_config(REPO / "configs" / "toy.yaml", [*RUN, *extra])
    run_dir = RunDir.open(root)
    with Teacher(cfg, run_dir).serve() as teacher:
        Train(cfg, run_dir).run(teacher=teacher)


def _copy(prepared: Path, root: Path) -> Path:
    shutil.copytree(prepared, root, symlinks=True)
    return root


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, prepared, tmp_path_factory) -> Path:
    root = _copy(prepared, tmp_path_factory.mktemp("uninterrupted") / "run")
    _train(root, f"rollout.num_rollout={ROUNDS}")
    return root


@pytest.mark.slow
def test_rollouts_are_one_step_behind_and_train_on_the_engine_logprobs(uninterrupted):
    for r in range(ROUNDS):
        round_dir = uninterrupted / "train" / f"round_{r:04d}"
        rollouts = read_arrow(round_dir / "rollouts.arrow", ROLLOUTS)
        assert set(rollouts.column("weight_version").to_pylist()) == {str(max(r - 1, 0))}, r
        # The step's old log-probs are the engine's (behaviour policy's): the actor's
        # reverse-KL metric is their token mean minus the teacher's.
        scores = read_arrow(round_dir / "teacher_logprobs.arrow", TEACHER_LOGPROBS)
        engine = np.concatenate(rollouts.column("rollout_logprobs").to_pylist())
        teacher = np.concatenate(scores.column("teacher_logprobs").to_pylist())
        metrics = read_json(round_dir / "metrics.json")
        assert metrics["opd_reverse_kl"] == pytest.approx(np.mean(engine - teacher), abs=1e-5)
        # The PPO ratio: 1 where the rows are on-policy (round 0), off it from round 1 on
        # (measured: ppo_kl -2e-8, then 0.26, 0.05, 0.05).
        if r == 0:
            assert abs(metrics["ppo_kl"]) < 1e-5
        else:
            assert abs(metrics["ppo_kl"]) > 1e-3, (r, metrics["ppo_kl"])


@pytest.mark.slow
def test_a_continued_async_run_ends_as_an_uninterrupted_one(
    ray_cluster, prepared, uninterrupted, tmp_path
):
    root = _copy(prepared, tmp_path / "run")
    _train(root, "rollout.num_rollout=2")
    first = {
        r: (root / "train" / f"round_{r:04d}" / "metrics.json").stat().st_mtime_ns for r in (0, 1)
    }
    _train(root, f"rollout.num_rollout={ROUNDS}")
    assert {
        r: (root / "train" / f"round_{r:04d}" / "metrics.json").stat().st_mtime_ns for r in (0, 1)
    } == first, "rounds 0-1 were redone: the run did not continue"
    assert_same_metrics(round_metrics(root, ROUNDS), round_metrics(uninterrupted, ROUNDS))
    for r in range(ROUNDS):
        rollouts = [
            read_arrow(d / "train" / f"round_{r:04d}" / "rollouts.arrow")
            for d in (root, uninterrupted)
        ]
        assert_same_rows(*rollouts, where=f"round {r}")


@pytest.mark.slow
def test_a_killed_training_actor_ends_as_the_uninterrupted_run(
    ray_cluster, prepared, uninterrupted, tmp_path, caplog
):
    root = _copy(prepared, tmp_path / "run")
    reward = tmp_path / "kill_actor.py"
    # Round 3's reward, on the background thread while round 2 trains.
    reward.write_text(
        KILLING_REWARD.format(target="actor", root=str(root), marker=str(tmp_path / "k"), call=4)
    )
    with caplog.at_level(logging.WARNING, logger="opd"):
        _train(root, f"rollout.num_rollout={ROUNDS}", f"reward.type={reward}:reward")
    assert (tmp_path / "k").exists()
    # Round 2 fails; round 1's checkpoint holds v2, the rollouts of round 2 come from v1 again.
    assert "rebuilding the training actors from round 1's checkpoint and redoing from round 2" in (
        caplog.text
    )
    restarts = sum(
        read_json(root / "train" / f"round_{r:04d}" / "metrics.json")["trainer_restarts"]
        for r in range(ROUNDS)
    )
    assert restarts == 1
    assert_same_metrics(round_metrics(root, ROUNDS), round_metrics(uninterrupted, ROUNDS))
