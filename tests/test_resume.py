"""A training run killed mid-way resumes from its last checkpointed round, with the same result.

`opd run` (the CLI, a subprocess, with its own temporary Prefect server) is SIGKILLed while
round 1 trains (as soon as round 0's checkpoint is recorded in `train/state.json`). Within
seconds everything it started is gone (its Prefect server and model servers: the watchdog of
flows/watchdog.py stops them), and Ray has removed its actors. It is then run again on the
same run directory: the rerun must continue at round 1 (round 0's files untouched), every
round's metrics must equal those of an uninterrupted run with the same seed (to float
rounding), and every round's rows must be there exactly once. A copy of the killed run
directory, taken before the rerun and resumed after the original is deleted, must do the same
from its own files. A run directory whose newest checkpoint lost a shard resumes from the
checkpoint before it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from tiny_runs import SMALL_BATCHES, TINY_TOY, assert_same_metrics, round_metrics

from opd_core.io import read_arrow
from opd_core.schemas import ROLLOUTS, TEACHER_LOGPROBS

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 2
SMALL_RUN = (
    [
        f"rollout.num_rollout={ROUNDS}",
        "train.save_interval=1",
        "eval.num_prompts=4",
        "eval.n_samples=1",
    ]
    + SMALL_BATCHES
    + TINY_TOY
)  # tests/tiny_runs.py: plumbing, not quality
# Wall-clock timings differ between any two runs; everything else must match exactly.


def _opd_run(artifacts: Path, run_id: str, *extra: str) -> subprocess.Popen:
    """`opd run` in a subprocess, as a user runs it: no PREFECT_API_URL, so with its own
    temporary Prefect server (PREFECT_HOME under `artifacts`: the real home is not touched)."""
    env = {
        **os.environ,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RAY_AUTH_MODE": "disabled",
        "PREFECT_HOME": str(artifacts / "prefect-home"),
    }
    env.pop("PREFECT_API_URL", None)
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--config",
        "configs/toy.yaml",
        *SMALL_RUN,
        f"run.artifacts_dir={artifacts}",
        f"run.run_id={run_id}",
        *extra,
    ]
    log = open(artifacts / f"{run_id}.log", "ab")  # noqa: SIM115 - the child writes it
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _rows_exactly_once(run_dir: Path) -> None:
    """Every round has its rollout and teacher rows exactly once, and one metrics row."""
    per_round = 4 * 2  # SMALL_BATCHES: 4 prompts x 2 samples
    for index in range(ROUNDS):
        round_dir = run_dir / "train" / f"round_{index:04d}"
        rollouts = read_arrow(round_dir / "rollouts.arrow", ROLLOUTS)
        scores = read_arrow(round_dir / "teacher_logprobs.arrow", TEACHER_LOGPROBS)
        for table in (rollouts, scores):
            keys = list(zip(table["prompt_index"].to_pylist(), table["sample_index"].to_pylist()))
            assert len(keys) == len(set(keys)) == per_round, (round_dir, len(keys), len(set(keys)))
        assert set(rollouts["round"].to_pylist()) == {index}
    metrics_rounds = read_arrow(run_dir / "train" / "metrics.arrow")["round"].to_pylist()
    assert metrics_rounds == list(range(ROUNDS))


def _prefect_servers(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Prefect's temporary server (uvicorn running prefect's app) among `processes`."""
    found = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if "prefect.server.api.server:create_app" in " ".join(process.cmdline()):
                found.append(process)
    return found


def _checkpointed_round(run_dir: Path) -> int | None:
    state = run_dir / "train" / "state.json"
    try:
        return json.loads(state.read_text()).get("checkpoint_round")
    except (OSError, ValueError):
        return None  # not there yet, or being replaced


def _alive(processes: list[psutil.Process]) -> list[str]:
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.Error:
            continue
    return left


def _processes_naming(path: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(path) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module: the flows join it (as on a real cluster) instead
    of starting their own, and what is left on it (actors, placement groups) can be asked."""
    import ray

    ray.init(
        # The teacher, the training actor and the rollout engine each hold a bundle of >= 1 CPU
        # (opd_core/cluster.py); Ray's CPUs only schedule, so 4 on 2 cores is fine.
        num_cpus=max(4, os.cpu_count() or 2),
        include_dashboard=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _ray_leftovers(timeout: float = 0.0) -> list[str]:
    """Actors not dead and placement groups not removed on the cluster (polled up to `timeout`)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        actors = [
            f"actor {a['ActorClassName']} {a['State']}"
            for a in ray._private.state.actors().values()
            if a["State"] != "DEAD"
        ]
        groups = [
            f"placement group {g['placement_group_id']} {g['state']}"
            for g in ray.util.placement_group_table().values()
            if g["state"] != "REMOVED"
        ]
        if not (actors or groups) or time.monotonic() > deadline:
            return actors + groups
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference_run(prefect_harness, ray_cluster, tmp_path_factory) -> Path:
    """An uninterrupted run (in this process, on the module's cluster): the expected result."""
    from flows.opd import opd_flow

    artifacts = tmp_path_factory.mktemp("reference").resolve()
    cwd = os.getcwd()
    os.chdir(REPO)  # configs/ and the toy-model cache (.cache/) are repo-relative
    try:
        overrides = SMALL_RUN + [
            f"run.artifacts_dir={artifacts}",
            f"train.ray.address={ray_cluster}",
            "run.run_id=reference",
        ]
        result = opd_flow(config_path="configs/toy.yaml", overrides=overrides)
    finally:
        os.chdir(cwd)
    return Path(result["run_dir"])


@pytest.mark.slow
def test_killed_training_resumes_with_identical_metrics(
    prefect_harness, ray_cluster, reference_run, tmp_path, monkeypatch
):
    from flows.opd import opd_flow

    monkeypatch.chdir(REPO)
    artifacts = tmp_path.resolve()
    run_dir = artifacts / "killed"

    # 1. `opd run` (joining the cluster, with its own temporary Prefect server), SIGKILLed
    #    while round 1 trains (round 0 checkpointed).
    process = _opd_run(artifacts, "killed", f"train.ray.address={ray_cluster}")
    deadline = time.monotonic() + 600
    while _checkpointed_round(run_dir) is None:
        assert process.poll() is None, (
            "opd run ended before round 0 was checkpointed:\n"
            f"{(artifacts / 'killed.log').read_text()[-4000:]}"
        )
        assert time.monotonic() < deadline, "round 0 never checkpointed"
        time.sleep(0.2)
    started_by_killed_run = psutil.Process(process.pid).children(recursive=True)
    assert len(_prefect_servers(started_by_killed_run)) == 1, "no temporary Prefect server"
    assert len(_processes_naming(run_dir)) >= 2, "the teacher and rollout servers are not up"
    os.kill(process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    process.wait()
    assert _checkpointed_round(run_dir) == 0
    assert not (run_dir / "final_eval" / "summary.json").exists()
    round0 = run_dir / "train" / "round_0000" / "metrics.json"
    round0_mtime = round0.stat().st_mtime_ns
    # A copy of the killed run directory, to be resumed from its own files once the original
    # is gone (state.json and the stage markers hold paths relative to the run directory).
    copy_root = artifacts / "copies"
    copy_root.mkdir()
    shutil.copytree(run_dir, copy_root / "moved", symlinks=True)
    try:
        # Everything the driver started (its temporary Prefect server, the teacher and rollout
        # servers, the watchdog itself) dies with it: the watchdog stops them.
        _, alive = psutil.wait_procs(
            started_by_killed_run, timeout=max(0.0, 15 - (time.monotonic() - killed_at))
        )
        assert not _alive(alive), f"the killed run left running: {_alive(alive)}"
        # Ray removes a dead driver's training actors and placement group by itself.
        assert not _ray_leftovers(timeout=60), f"on the cluster after the kill: {_ray_leftovers()}"

        # 2. Rerun on the same run directory: resumes at round 1 and finishes.
        # The same config, on the same cluster.
        same = [f"run.artifacts_dir={artifacts}", f"train.ray.address={ray_cluster}"]
        opd_flow(config_path="configs/toy.yaml", overrides=SMALL_RUN + same + ["run.run_id=killed"])
        assert round0.stat().st_mtime_ns == round0_mtime, (
            "round 0 was redone: the rerun did not resume"
        )
        assert _checkpointed_round(run_dir) == ROUNDS - 1
        assert (run_dir / "final_eval" / "summary.json").exists()
        _rows_exactly_once(run_dir)

        # Nothing of the killed run is left: its model servers were stopped by the rerun.
        assert not _alive(started_by_killed_run), (
            f"left over from the killed run: {_alive(started_by_killed_run)}"
        )
        assert not _alive(_processes_naming(run_dir)), (
            f"still serving this run: {_alive(_processes_naming(run_dir))}"
        )
        assert not _ray_leftovers(), f"on the cluster after the rerun: {_ray_leftovers()}"

        # 3. Same seed, same metrics as the uninterrupted run, round by round.
        assert_same_metrics(round_metrics(run_dir, ROUNDS), round_metrics(reference_run, ROUNDS))

        # 4. The copy, with the original deleted, resumes from its own round-0 checkpoint.
        shutil.rmtree(run_dir)
        moved = copy_root / "moved"
        copied_round0_mtime = (moved / "train" / "round_0000" / "metrics.json").stat().st_mtime_ns
        opd_flow(
            config_path="configs/toy.yaml",
            overrides=SMALL_RUN
            + [f"run.artifacts_dir={copy_root}", f"train.ray.address={ray_cluster}"]
            + ["run.run_id=moved"],
        )
        assert (
            moved / "train" / "round_0000" / "metrics.json"
        ).stat().st_mtime_ns == copied_round0_mtime
        assert (moved / "final_eval" / "summary.json").exists()
        assert_same_metrics(round_metrics(moved, ROUNDS), round_metrics(reference_run, ROUNDS))
        _rows_exactly_once(moved)
    finally:
        for leftover in started_by_killed_run:  # leave no orphans on the machine if it failed
            with contextlib.suppress(psutil.Error):
                leftover.kill()


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_one_before(
    prefect_harness, ray_cluster, reference_run, tmp_path, monkeypatch, caplog
):
    from flows.opd import opd_flow

    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "damaged"
    shutil.copytree(reference_run, run_dir, symlinks=True)
    shard = sorted(
        (run_dir / "train" / "checkpoints" / "torch_dist" / "iter_0000002").glob("*.distcp")
    )[0]
    shard.unlink()
    round0 = run_dir / "train" / "round_0000" / "metrics.json"
    round0_mtime = round0.stat().st_mtime_ns

    overrides = SMALL_RUN + [
        f"run.artifacts_dir={tmp_path}",
        "run.run_id=damaged",
        f"train.ray.address={ray_cluster}",
    ]
    with caplog.at_level(logging.WARNING, logger="opd"):
        result = opd_flow(config_path="configs/toy.yaml", overrides=overrides)

    # Not a cache hit (an output is missing), and the resume says where it resumes and why.
    assert not result["train"]["cached"]
    assert f"train/checkpoints/torch_dist/iter_0000002/{shard.name} missing" in caplog.text
    assert (
        f"train: checkpoint of round 1 is damaged (train/checkpoints/torch_dist/iter_0000002/"
        f"{shard.name} missing)"
    ) in caplog.text
    assert "train: resuming from round 0's checkpoint, redoing round 1" in caplog.text
    assert round0.stat().st_mtime_ns == round0_mtime  # only round 1 was redone
    assert shard.is_file()
    assert_same_metrics(round_metrics(run_dir, ROUNDS), round_metrics(reference_run, ROUNDS))
    _rows_exactly_once(run_dir)


def test_teardown_hook_stops_only_the_runs_servers(tmp_path):
    """The on_cancellation/on_crashed hook stops the servers of its run directory, no others."""
    from types import SimpleNamespace

    from prefect.states import Cancelled

    from flows.teardown import run_servers, teardown_hook
    from opd_core.config import TeacherConfig
    from opd_core.engine.launcher import launch_server
    from opd_core.hf_utils import make_tiny_qwen3

    cancelled_run, other_run = tmp_path / "cancelled", tmp_path / "other"
    servers = []
    try:
        for run in (cancelled_run, other_run):
            model = make_tiny_qwen3(
                run / "download" / "models" / "teacher", hidden_size=32, num_hidden_layers=1
            )
            servers.append(
                launch_server("builtin", model, TeacherConfig(), run / "teacher" / "server.log")
            )
        cancelled_server, other_server = servers
        assert [p.pid for p in run_servers(cancelled_run)] == [cancelled_server.pid]

        # What Prefect calls after a cancellation killed the flow-run process.
        flow_run = SimpleNamespace(
            name="train:cancelled", parameters={"stage": "train", "run_dir": str(cancelled_run)}
        )
        teardown_hook(None, flow_run, Cancelled())

        assert cancelled_server.process.wait(timeout=15) is not None
        assert not run_servers(cancelled_run)
        assert other_server.alive(), "the hook stopped a server of another run"
    finally:
        for server in servers:
            server.stop()


FAILING_REWARD = '''
def reward(samples):
    """Fails in the middle of round 0: servers, Ray cluster and training actors are all up."""
    raise RuntimeError("reward function failed mid-training")
'''


@pytest.mark.slow
def test_run_failing_mid_training_leaves_no_servers_or_ray(
    prefect_harness, ray_cluster, reference_run, tmp_path, monkeypatch
):
    from flows.opd import opd_flow

    monkeypatch.chdir(REPO)
    # A copy of a finished run (download, convert, baseline_eval are cache hits) with a reward
    # function that raises: train starts the teacher, the rollout server and the actors, then fails.
    # (A new reward is another training setup: restart_train lets it replace the copied rounds.)
    shutil.copytree(reference_run, tmp_path / "failing", symlinks=True)
    (
        tmp_path / "failing" / "teacher" / "endpoint.json"
    ).unlink()  # written again once the teacher is up
    reward_file = tmp_path / "failing_reward.py"
    reward_file.write_text(FAILING_REWARD)
    overrides = SMALL_RUN + [
        f"run.artifacts_dir={tmp_path}",
        "run.run_id=failing",
        f"train.ray.address={ray_cluster}",
        f"reward.type={reward_file}:reward",
    ]

    with pytest.raises(Exception, match="reward function failed mid-training"):
        opd_flow(config_path="configs/toy.yaml", overrides=overrides, restart_train=True)

    run_dir = (tmp_path / "failing").resolve()
    # It failed while training: the teacher and the rollout server had been started.
    assert (run_dir / "teacher" / "endpoint.json").exists() and (
        run_dir / "train" / "rollout_server.log"
    ).exists()
    assert not _alive(_processes_naming(run_dir)), (
        "a model server of the failed run is still running"
    )
    # Its training actors and placement group were removed from the (shared) cluster.
    assert not _ray_leftovers(timeout=10), (
        f"left on the Ray cluster by the failed run: {_ray_leftovers()}"
    )
