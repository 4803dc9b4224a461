"""Overrides for tests of the pipeline's plumbing (not of model quality): tiny random toy
models, with no teacher or student training, and the smallest batches that run every stage.
Also the tiny HF models (and their torch_dist checkpoints) that several test files build, a
toy run directory prepared up to training, a local Ray cluster for a test module to share,
and the comparisons of two runs of one seed (their metrics, their rows)."""

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd_core.config import load_config
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.io import read_json
from opd_core.megatron.convert import hf_to_torch_dist
from opd_core.rundir import RunDir
from opd_core.stages import Convert, Download

TINY_TOY = [
    "toy.num_train=64",
    "toy.num_eval=16",
    "toy.teacher.train_steps=0",
    "toy.student.train_steps=0",
    "toy.teacher_min_pass_at_1=0",
    "toy.student_pass_at_1_window=[0,1]",
]

SMALL_BATCHES = [
    "rollout.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=2",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.lr_warmup_iters=0",  # the toy's 10 warmup steps need a run longer than 10 rounds
]


# A reward function (its source, to .format(target=, root=, marker=, call=)) that SIGKILLs
# one part of the run of `root` at its `call`-th call (1 = round 0's reward), once (a marker
# file): target "teacher" (its server), "rollout" (the student's engine), "actor" (a training
# actor), or "none"; it returns zero rewards. It runs in the driver, between a round's
# generation and its scoring (with async rounds, on the thread that makes the next round).
KILLING_REWARD = """
import os, signal, threading, time
from pathlib import Path

import psutil

TARGET, ROOT, MARKER, CALL = {target!r}, Path({root!r}), Path({marker!r}), {call!r}
calls = 0


def _victim():
    # Only this run's processes: descendants of this driver (its Ray cluster, its servers).
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if TARGET == "actor":
            if any(part.startswith("ray::TrainActor") for part in cmdline):
                return process, False
            continue
        if "opd_core.engine.server" not in cmdline or "--model-path" not in cmdline:
            continue
        model = cmdline[cmdline.index("--model-path") + 1]
        role = "teacher" if TARGET == "teacher" else "student"
        if model == str(ROOT / "download" / "models" / role):
            return process, True
    raise RuntimeError(f"no {{TARGET}} process to kill")


def _kill():
    process, group = _victim()
    if group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()
    process.wait(30)


def reward(samples):
    global calls
    calls += 1
    if calls == CALL and TARGET != "none" and not MARKER.exists():  # once
        MARKER.write_text(str(time.time()))
        killer = threading.Thread(target=_kill)
        killer.start()
        killer.join()
    return [0.0] * len(samples)
"""


def prepare_toy(root: Path, overrides: list[str]) -> Path:
    """A run directory under `root` with the toy's download and convert stages done (of
    configs/toy.yaml + `overrides`): copy it per run to train it several ways."""
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "toy.yaml", overrides)
    run_dir = RunDir.create(root, "base")
    Download(cfg, run_dir).run()
    Convert(cfg, run_dir).run()
    return run_dir.root


def student_and_teacher(root, teacher_step: int | None = None) -> dict:
    """A tiny student and a bigger, untied teacher of the same family and vocabulary, as in real
    OPD (8B student, 32B teacher): HF dirs and torch_dist checkpoints. 2 and 4 layers, so PP=2
    splits both."""
    student = make_tiny_qwen3(root / "student", initializer_range=0.1)
    teacher = make_tiny_qwen3(
        root / "teacher",
        seed=1,
        initializer_range=0.1,
        hidden_size=48,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return {
        "root": root,
        "student": student,
        "teacher": teacher,
        "student_ckpt": hf_to_torch_dist(student, root / "student_torch_dist"),
        "teacher_ckpt": hf_to_torch_dist(teacher, root / "teacher_torch_dist", step=teacher_step),
    }


def make_tiny_qwen2(out_dir: Path) -> Path:
    """A tiny random Qwen2 HF dir (untied, q/k/v biases): the other supported family."""
    config = Qwen2Config(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # HF initialises biases to zero; random ones test their mapping
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


@contextmanager
def local_ray(**resources):
    """A local Ray cluster (e.g. num_cpus=8, num_gpus=4 logical GPUs) for a test module: the
    runs and fleets join it instead of starting their own. Yields its address."""
    ray.init(include_dashboard=False, **resources)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def round_metrics(root: Path, rounds: int) -> list[dict]:
    """The metrics.json of rounds 0..rounds-1 of the run directory `root`, without what
    differs between two runs of one seed by design: wall-clock times and the *_restarts
    counts (the tests of faults check those apart)."""
    out = []
    for r in range(rounds):
        metrics = read_json(root / "train" / f"round_{r:04d}" / "metrics.json")
        out.append(
            {
                k: v
                for k, v in metrics.items()
                if k != "seconds" and not k.startswith("time_") and not k.endswith("_restarts")
            }
        )
    return out


def assert_same_metrics(got: list[dict], expected: list[dict]) -> None:
    """Two runs of one seed, round by round (`round_metrics`): the same keys, every count and
    non-float equal, every float equal to 1e-5 relative. Not bit for bit: an engine
    relaunched (or started again by a resumed run) begins with an empty prefix cache, so it
    computes a prompt's keys and values in matmuls of other shapes than the warm engine did,
    and its log-probs round differently (seen: 6e-8 on a reverse KL of 0.55). A row lost,
    doubled, read from another sample or scored by stale weights moves these metrics by
    orders of magnitude more."""
    assert len(got) == len(expected), (len(got), len(expected))
    for index, (round_got, round_expected) in enumerate(zip(got, expected, strict=True)):
        assert round_got.keys() == round_expected.keys(), f"round {index}"
        for key, value in round_expected.items():
            if isinstance(value, float):
                close = pytest.approx(value, rel=1e-5, abs=1e-7)
                assert round_got[key] == close, (index, key)
            else:
                assert round_got[key] == value, (index, key)


LOGPROBS = {"rollout_logprobs", "teacher_logprobs", "teacher_topk_logprobs"}


def assert_same_rows(got: pa.Table, expected: pa.Table, where: str) -> None:
    """Two Arrow tables of one seed's rows (rollouts, teacher log-probs): the same schema,
    token ids, rows, versions and rewards equal, the log-prob columns to 1e-5 (see
    `assert_same_metrics` for why not bit for bit: a log-prob of -6.4 moved by 2e-5, 3e-6
    relative, in one CI run; a row read from another sample is off by far more)."""
    assert got.schema == expected.schema, where
    for column in expected.column_names:
        want, have = (t.column(column).to_pylist() for t in (expected, got))
        if column in LOGPROBS:  # ragged lists (of lists): compare the flattened values
            assert [np.shape(r) for r in have] == [np.shape(r) for r in want], (where, column)
            np.testing.assert_allclose(
                _flat(have), _flat(want), rtol=1e-5, atol=1e-5, err_msg=f"{where}.{column}"
            )
        else:
            assert have == want, f"{where}.{column} differ"


def _flat(rows: list) -> np.ndarray:
    return np.asarray(np.hstack([np.ravel(r) for r in rows] or [[]]), np.float64)
