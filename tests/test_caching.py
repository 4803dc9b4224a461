"""Stage caching on a fixed run directory: what a rerun of `opd` redoes, and what it skips.

Each stage's cache key is the content hash of its input files + its config sections + the
code version (opd_core/rundir.py). On one run directory (`run.run_id` fixed):
  - the same config again -> every cached stage is a hit (nothing recomputed);
  - `train.lr` changed     -> refused (train/ holds a finished round of the old setup), the
                              message says what changed and nothing is deleted; with
                              `restart_train` only `train` and `final_eval` rerun;
  - `eval.n_samples` changed -> only `baseline_eval` and `final_eval` rerun;
  - the directory copied   -> still all hits (keys hold contents, not absolute paths);
  - `rollout.num_rollout` 1 -> 2 -> `train` continues at round 1 (round 0 kept), and
                              `final_eval` reruns.
A stage's `_stage.json` marker is rewritten exactly when the stage ran, so comparing markers
before and after a run says which stages ran. Seconds are printed (see docs/prefect.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from tiny_runs import SMALL_BATCHES, TINY_TOY

from opd_core.stages.train import TrainingChanged

REPO = Path(__file__).resolve().parent.parent
CACHED_STAGES = ("download", "convert", "baseline_eval", "train", "final_eval")

SMALL_RUN = (
    [
        "rollout.num_rollout=1",
        "eval.num_prompts=8",
        "eval.n_samples=2",
    ]
    + SMALL_BATCHES
    + TINY_TOY
)  # tests/tiny_runs.py: plumbing, not quality


def _markers(run_dir: Path) -> dict[str, dict]:
    return {
        stage: json.loads((run_dir / stage / "_stage.json").read_text()) for stage in CACHED_STAGES
    }


def _rerun_stages(before: dict, after: dict) -> set[str]:
    """Stages whose marker was rewritten (they ran) between two snapshots."""
    return {
        stage
        for stage in CACHED_STAGES
        if before[stage]["finished_at"] != after[stage]["finished_at"]
    }


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster that every training run joins (saves a Ray start per run)."""
    import ray

    ray.init(
        # The teacher, the training actor and the rollout engine each hold a bundle of >= 1 CPU
        # (opd_core/cluster.py); Ray's CPUs only schedule, so 4 on 2 cores is fine.
        num_cpus=max(4, os.cpu_count() or 2),
        include_dashboard=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_reruns_redo_only_what_changed(prefect_harness, ray_cluster, tmp_path, monkeypatch):
    from flows.opd import opd_flow

    monkeypatch.chdir(REPO)  # configs/ and the toy-model cache (.cache/) are repo-relative
    base = SMALL_RUN + [f"run.artifacts_dir={tmp_path}", "run.run_id=cached"]
    run_dir = tmp_path / "cached"

    def run(*extra: str, restart_train: bool = False) -> tuple[dict, float]:
        started = time.perf_counter()
        result = opd_flow(
            config_path="configs/toy.yaml",
            overrides=base + list(extra),
            restart_train=restart_train,
        )
        return result, time.perf_counter() - started

    first, first_seconds = run()
    assert Path(first["run_dir"]) == run_dir.resolve()
    assert not first["train"]["cached"] and not first["final"]["cached"]
    markers = _markers(run_dir)

    # Same config, same run directory: all cache hits, and the same results come back.
    again, cached_seconds = run()
    assert again["train"]["cached"] and again["baseline"]["cached"] and again["final"]["cached"]
    assert _rerun_stages(markers, _markers(run_dir)) == set()
    assert again["final"]["pass_at_1"] == first["final"]["pass_at_1"]

    # A training parameter, on a train/ holding a finished round: refused, nothing deleted.
    round0 = run_dir / "train" / "round_0000" / "metrics.json"
    round0_mtime = round0.stat().st_mtime_ns
    with pytest.raises(TrainingChanged) as refused:
        run("train.lr=2e-3")
    assert "holds 1 finished round(s) (round 0)" in str(refused.value)
    assert "train.lr: 0.003 -> 0.002" in str(refused.value)
    assert round0.stat().st_mtime_ns == round0_mtime
    assert _rerun_stages(markers, _markers(run_dir)) == set()

    # Asked to: train and final_eval rerun, the rest is reused.
    lr_changed, train_seconds = run("train.lr=2e-3", restart_train=True)
    after_lr = _markers(run_dir)
    assert _rerun_stages(markers, after_lr) == {"train", "final_eval"}
    assert not lr_changed["train"]["cached"] and lr_changed["baseline"]["cached"]

    # An eval setting: both evals rerun, training is reused (lr stays at its new value).
    k_changed, eval_seconds = run("train.lr=2e-3", "eval.n_samples=3")
    assert _rerun_stages(after_lr, _markers(run_dir)) == {"baseline_eval", "final_eval"}
    assert k_changed["train"]["cached"] and k_changed["final"]["k"] == 3

    # The cache keys hold contents, not absolute paths: a copied run directory is still all hits.
    shutil.copytree(run_dir, tmp_path / "copied", symlinks=True)
    copied, _ = run("train.lr=2e-3", "eval.n_samples=3", "run.run_id=copied")
    assert copied["train"]["cached"] and copied["baseline"]["cached"] and copied["final"]["cached"]
    assert _rerun_stages(_markers(run_dir), _markers(tmp_path / "copied")) == set()

    # More rounds of the same setup: training continues after round 0 instead of starting over.
    round0_mtime = (run_dir / "train" / "round_0000" / "metrics.json").stat().st_mtime_ns
    before = _markers(run_dir)
    longer, longer_seconds = run("train.lr=2e-3", "eval.n_samples=3", "rollout.num_rollout=2")
    assert _rerun_stages(before, _markers(run_dir)) == {"train", "final_eval"}
    assert (run_dir / "train" / "round_0000" / "metrics.json").stat().st_mtime_ns == round0_mtime
    assert longer["train"]["rounds"] == 2
    # The lr schedule follows the current config from the restored step: toy.yaml's cosine
    # from 2e-3 to 3e-4 over the 2 steps of a 2-round run is at its midpoint for step 1 (the
    # 1-round schedule the checkpoint was written under would be at 3e-4 by then).
    round1 = json.loads((run_dir / "train" / "round_0001" / "metrics.json").read_text())
    assert round1["lr"] == pytest.approx(3e-4 + (2e-3 - 3e-4) * 0.5)

    print(
        f"\nfirst run {first_seconds:.1f} s | full cached rerun {cached_seconds:.1f} s | "
        f"train.lr changed (train + final_eval) {train_seconds:.1f} s | "
        f"eval.n_samples changed (evals) {eval_seconds:.1f} s | "
        f"num_rollout 1 -> 2 (one more round) {longer_seconds:.1f} s"
    )
