"""What a run directory records about itself, and what it does with the records.

- every stage's marker records its outputs (size + sha256, paths relative to the run
  directory): a damaged output is not a cache hit, a damaged input is an error naming it;
- stored results and `train/state.json` hold relative paths (a copied directory uses its
  own files; an older state.json with absolute paths is mapped onto the directory it is in);
- resuming falls back to the newest intact checkpoint, and HF exports are pruned to the
  last N plus every resume point;
- `train/` is never cleared of finished rounds of another training setup unless asked, and
  the refusal says what changed; `rollout.num_rollout` alone changes nothing about ownership.

Fast: files on disk, no model is trained (the end-to-end versions are in test_resume.py and
test_caching.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from opd_core.config import load_config
from opd_core.io import ArtifactError, read_json, write_json
from opd_core.rundir import RunDir, is_done, run_cached, stage_key, verify_inputs
from opd_core.stages.train import OWNER_FILE, Train, TrainingChanged
from opd_core.trainer.state import STATE_FILE, TrainState, rollout_weight_version

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------ stage records


def test_marker_records_outputs_and_a_damaged_output_is_not_a_cache_hit(tmp_path, caplog):
    run = RunDir.create(tmp_path, "r")
    stage_dir = run.stage("baseline_eval")
    calls = []

    def build():
        calls.append(1)
        _write(stage_dir / "samples.arrow", b"rows" * 100)
        _write(stage_dir / "server.log", b"diagnostics, not an output")
        return {"summary": str(stage_dir / "summary.json"), "elsewhere": "/opt/models/x"}

    result, cached = run_cached(stage_dir, "k", build, root=run.root)
    assert not cached and result == {
        "summary": "baseline_eval/summary.json",
        "elsewhere": "/opt/models/x",
    }
    marker = read_json(stage_dir / "_stage.json")
    assert marker["outputs"] == {
        "baseline_eval/samples.arrow": {
            "size": 400,
            "sha256": marker["outputs"]["baseline_eval/samples.arrow"]["sha256"],
        }
    }
    assert run_cached(stage_dir, "k", build, root=run.root) == (result, True)
    assert is_done(stage_dir, "k", run.root)

    (stage_dir / "samples.arrow").write_bytes(b"garbage")  # damaged after the stage ran
    assert not is_done(stage_dir, "k", run.root)
    with caplog.at_level(logging.WARNING, logger="opd.rundir"):
        assert run_cached(stage_dir, "k", build, root=run.root) == (result, False)
    assert len(calls) == 2
    assert "baseline_eval: not a cache hit" in caplog.text
    assert "baseline_eval/samples.arrow: 7 bytes, expected 400" in caplog.text


def test_damaged_inputs_are_named_with_what_was_expected(tmp_path):
    run = RunDir.create(tmp_path, "r")
    model = run.student_hf

    def download():
        _write(model / "config.json", b"{}")
        _write(model / "model.safetensors", b"w" * 1000)
        _write(run.train_data, b"arrow-rows")
        return {}

    run_cached(run.stage("download"), "k", download, root=run.root)
    verify_inputs(run.root, [model, run.train_data, tmp_path / "outside.bin"], "convert")

    # Truncated weights, a deleted file, a same-size edit: each named, with what was expected.
    with open(model / "model.safetensors", "r+b") as handle:
        handle.truncate(10)
    (model / "config.json").unlink()
    run.train_data.write_bytes(b"arrow-ROWS")
    with pytest.raises(ArtifactError) as err:
        verify_inputs(run.root, [model, run.train_data], "convert")
    message = str(err.value)
    assert "convert: input file(s)" in message
    assert "download/models/student/model.safetensors: 10 bytes, expected 1000" in message
    assert "download/models/student/config.json missing (recorded by download)" in message
    assert "download/data/train.arrow: sha256" in message and "(same size)" in message


def test_a_copied_run_directory_keeps_its_cache_hits_and_checks_its_own_files(tmp_path):
    run = RunDir.create(tmp_path, "a")
    build = lambda: {"data": str(_write(run.train_data, b"rows"))}
    key = stage_key("cfg", [])
    run_cached(run.stage("download"), key, build, root=run.root)
    copy = RunDir(shutil.copytree(run.root, tmp_path / "b", symlinks=True).resolve())
    shutil.rmtree(run.root)
    result, cached = run_cached(copy.stage("download"), key, build, root=copy.root)
    assert cached and result == {"data": "download/data/train.arrow"}
    verify_inputs(copy.root, [copy.train_data], "train")


# --------------------------------------------------------------- train/state.json


def _checkpoint(
    run: RunDir, round_index: int, weights: bytes = b"w", async_rounds: bool = False
) -> TrainState:
    """What one round and its checkpoint leave on disk, recorded as the loop records it."""
    for name in ("rollouts.arrow", "teacher_logprobs.arrow", "metrics.json"):
        _write(run.round_dir(round_index) / name, f"{name} {round_index}".encode())
    iteration = run.torch_dist_checkpoints / f"iter_{round_index + 1:07d}"
    _write(iteration / "__0_0.distcp", weights * 64)
    _write(iteration / "metadata.json", b"{}")
    _write(run.hf_export(round_index) / "model.safetensors", weights * 32)
    _write(run.hf_export(round_index) / "config.json", b"{}")
    state = TrainState.load(run.stage("train"))
    state.record_checkpoint(
        round_index,
        run.torch_dist_checkpoints,
        run.hf_export(round_index),
        {"round": round_index},
        async_rounds=async_rounds,
    )
    return state


def test_state_is_relative_and_a_moved_run_directory_resumes_from_its_own_files(tmp_path):
    run = RunDir.create(tmp_path, "a")
    _checkpoint(run, 0)
    saved = read_json(run.stage("train") / STATE_FILE)
    assert saved["checkpoint_dir"] == "train/checkpoints/torch_dist"
    assert saved["hf_export"] == "train/checkpoints/hf/round_0000"
    assert str(tmp_path) not in json.dumps(saved)

    moved = RunDir((tmp_path / "moved").resolve())
    shutil.move(run.root, moved.root)
    state = TrainState.load(moved.stage("train"))
    assert state.checkpoint_dir == str(moved.torch_dist_checkpoints)
    assert state.hf_export == str(moved.hf_export(0))
    assert state.rewind_to_intact(rounds=2) == [] and state.next_round == 1


def test_an_older_state_with_absolute_paths_loads_onto_this_directory(tmp_path):
    run = RunDir.create(tmp_path, "copy")
    write_json(
        run.stage("train") / STATE_FILE,
        {
            "checkpoint_round": 0,
            "checkpoint_dir": "/elsewhere/artifacts/orig/train/checkpoints/torch_dist",
            "hf_export": "/elsewhere/artifacts/orig/train/checkpoints/hf/round_0000",
            "metrics": {"round": 0},
        },
    )
    state = TrainState.load(run.stage("train"))
    assert state.checkpoint_dir == str(run.torch_dist_checkpoints)
    assert state.hf_export == str(run.hf_export(0))
    # No file records: only the checkpoint's metadata and the export's config are checked.
    notes = state.rewind_to_intact(rounds=2)
    assert notes[0].startswith("checkpoint of round 0 is damaged (train/checkpoints/torch_dist/")
    assert state.next_round == 0


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    run = RunDir.create(tmp_path, "r")
    for round_index in range(3):
        _checkpoint(run, round_index)
    (run.torch_dist_checkpoints / "iter_0000003" / "__0_0.distcp").unlink()
    state = TrainState.load(run.stage("train"))
    assert state.rewind_to_intact(rounds=3) == [
        "checkpoint of round 2 is damaged (train/checkpoints/torch_dist/iter_0000003/__0_0.distcp "
        "missing)",
        "resuming from round 1's checkpoint, redoing round 2",
    ]
    assert state.next_round == 2 and state.hf_export == str(run.hf_export(1))
    # What was decided is in state.json: a second look finds nothing more to do.
    again = TrainState.load(run.stage("train"))
    assert again.checkpoint_round == 1 and again.resume_rounds == [0, 1]
    assert again.rewind_to_intact(rounds=3) == []


def test_a_damaged_round_is_redone_from_the_checkpoint_before_it(tmp_path):
    run = RunDir.create(tmp_path, "r")
    for round_index in range(3):
        _checkpoint(run, round_index)
    (run.round_dir(1) / "rollouts.arrow").write_bytes(b"garbage")
    state = TrainState.load(run.stage("train"))
    notes = state.rewind_to_intact(rounds=3)
    assert notes[0].startswith(
        "rounds up to 2 have damaged files (train/round_0001/rollouts.arrow:"
    )
    assert notes[-1] == "resuming from round 0's checkpoint, redoing rounds 1-2"
    assert state.next_round == 1


def test_a_shortened_run_ends_at_a_checkpoint_it_reached(tmp_path):
    run = RunDir.create(tmp_path, "r")
    for round_index in range(3):
        _checkpoint(run, round_index)
    state = TrainState.load(run.stage("train"))
    assert (
        state.rewind_to_intact(rounds=2)[-1]
        == "resuming from round 1's checkpoint, nothing to redo"
    )
    assert state.next_round == 2


def test_old_hf_exports_are_pruned_but_resume_points_and_final_are_kept(tmp_path):
    run = RunDir.create(tmp_path, "r")
    for round_index in range(6):  # checkpoints at rounds 1 and 3 (save_interval 2, say)
        _write(run.hf_export(round_index) / "model.safetensors", b"w")
        if round_index in (1, 3):
            _checkpoint(run, round_index)
    _write(run.final_student_hf / "model.safetensors", b"w")
    state = TrainState.load(run.stage("train"))
    deleted = state.prune_hf_exports(keep=2, current_round=5)
    assert sorted(p.name for p in deleted) == ["round_0000", "round_0002"]
    kept = sorted(p.name for p in run.final_student_hf.parent.iterdir())
    assert kept == ["final", "round_0001", "round_0003", "round_0004", "round_0005"]
    assert state.prune_hf_exports(keep=0, current_round=5) == []  # 0 = keep all


def test_async_resume_points_keep_the_export_their_rollouts_come_from(tmp_path):
    """rollout.async_rounds: resuming after round c's checkpoint, round c+1's rollouts come from
    round c-1's export (the converted student for c = 0); it is recorded, kept by pruning, and
    checked: damaged, the resume falls back to the checkpoint before."""
    run = RunDir.create(tmp_path, "r")
    state = _checkpoint(run, 0, async_rounds=True)
    assert state.rollout_export is None  # round 1's rollouts: the converted student
    assert rollout_weight_version(state.next_round, async_rounds=True) == 0
    for round_index in range(1, 6):  # checkpoints at rounds 0, 3 and 5
        _write(run.hf_export(round_index) / "model.safetensors", b"w")
        if round_index in (3, 5):
            state = _checkpoint(run, round_index, async_rounds=True)
    assert state.rollout_export == str(run.hf_export(4))
    assert read_json(run.stage("train") / STATE_FILE)["rollout_export"] == (
        "train/checkpoints/hf/round_0004"
    )
    assert rollout_weight_version(state.next_round, async_rounds=True) == 5
    assert rollout_weight_version(state.next_round, async_rounds=False) == 6

    deleted = TrainState.load(run.stage("train")).prune_hf_exports(keep=1, current_round=5)
    assert [p.name for p in deleted] == ["round_0001"]  # 0 and 3 are resume points
    kept = sorted(p.name for p in run.final_student_hf.parent.iterdir())
    assert kept == ["round_0000", "round_0002", "round_0003", "round_0004", "round_0005"]

    (run.hf_export(4) / "model.safetensors").unlink()
    state = TrainState.load(run.stage("train"))
    notes = state.rewind_to_intact(rounds=6)
    assert notes == [
        "checkpoint of round 5 is damaged (train/checkpoints/hf/round_0004/model.safetensors "
        "missing)",
        "resuming from round 3's checkpoint, redoing rounds 4-5",
    ]
    assert state.rollout_export == str(run.hf_export(2))
    assert TrainState.load(run.stage("train")).rollout_export == str(run.hf_export(2))


def test_serial_resume_points_roll_out_from_their_own_export(tmp_path):
    run = RunDir.create(tmp_path, "r")
    state = _checkpoint(run, 0)
    assert state.rollout_export == state.hf_export == str(run.hf_export(0))
    saved = read_json(run.stage("train") / STATE_FILE)
    del saved["rollout_export"]  # a state.json of an older version
    write_json(run.stage("train") / STATE_FILE, saved)
    assert TrainState.load(run.stage("train")).rollout_export == str(run.hf_export(0))


# ------------------------------------------------------------------ who owns train/


@pytest.fixture
def train_inputs(tmp_path) -> RunDir:
    """A run directory holding the files the train stage's key hashes (contents only)."""
    run = RunDir.create(tmp_path, "r")
    _write(run.student_torch_dist / "release" / "__0_0.distcp", b"student")
    _write(run.train_data, b"prompts")
    _write(run.teacher_hf / "model.safetensors", b"teacher")
    return run


def _train(run: RunDir, *overrides: str) -> Train:
    return Train(load_config(CONFIG, list(overrides)), run)


def test_a_changed_setup_refuses_to_delete_finished_rounds_and_says_what_changed(train_inputs):
    run = train_inputs
    assert _train(run).claim() is False
    metrics = _write(run.round_dir(0) / "metrics.json", b"{}")

    changed = _train(run, "train.lr=5e-4")
    assert not changed.resumes()
    run.train_data.write_bytes(b"other prompts")
    changed = _train(run, "train.lr=5e-4")
    with pytest.raises(TrainingChanged) as err:
        changed.claim()
    message = str(err.value)
    assert "holds 1 finished round(s) (round 0)" in message
    assert "train.lr: 0.003 -> 0.0005; inputs: download/data/train.arrow changed" in message
    assert "--restart-train" in message and "restart_train=true" in message
    assert metrics.is_file()  # nothing deleted

    assert changed.claim(restart=True) is False
    assert (
        not metrics.exists()
        and read_json(run.stage("train") / OWNER_FILE)["key"] == changed.owner["key"]
    )


def test_without_finished_rounds_a_changed_setup_starts_over(train_inputs, caplog):
    run = train_inputs
    _train(run).claim()
    _write(run.stage("train") / "rollout_server.log", b"a round that never finished")
    with caplog.at_level(logging.WARNING, logger="opd.stages.train"):
        assert _train(run, "train.lr=5e-4").claim() is False
    assert "starting over, train/ holds no finished round; train.lr: 0.003 -> 0.0005" in caplog.text
    assert not (run.stage("train") / "rollout_server.log").exists()


def test_more_rounds_continue_the_same_run(train_inputs):
    run = train_inputs
    short = _train(run, "rollout.num_rollout=30")
    short.claim()
    _write(run.round_dir(0) / "metrics.json", b"{}")
    longer = _train(run, "rollout.num_rollout=32")
    assert longer.key != short.key  # not a cache hit: the two new rounds must run
    assert longer.claim() is True  # but the 30 finished rounds are its own
    assert (run.round_dir(0) / "metrics.json").is_file()


def test_an_owner_file_of_an_older_version_still_resumes_its_own_run(train_inputs):
    run = train_inputs
    stage = _train(run)
    write_json(run.stage("train") / OWNER_FILE, {"key": stage.key})  # what older versions wrote
    _write(run.round_dir(0) / "metrics.json", b"{}")
    assert stage.claim() is True
    assert read_json(run.stage("train") / OWNER_FILE)["config"]["train.lr"] == 0.003
    write_json(run.stage("train") / OWNER_FILE, {"key": "from-another-setup"})
    with pytest.raises(
        TrainingChanged, match=r"written by an older opd \(run_key.json holds no config\)"
    ):
        _train(run).claim()


def test_restart_train_is_a_parameter_of_both_flows():
    """So a deployment run (UI form, `prefect deployment run ... --param restart_train=true`)
    can ask for it, as `opd run --restart-train` does."""
    from flows.opd import opd_flow, stage_flow

    for flow in (opd_flow, stage_flow):
        assert flow.parameters.properties["restart_train"]["type"] == "boolean"
        assert flow.parameters.properties["restart_train"]["default"] is False
