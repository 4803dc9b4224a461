"""Overrides for tests of the pipeline's plumbing (not of model quality): tiny random toy
models, with no teacher or student training, and the smallest batches that run every stage.
Also the tiny HF models (and their torch_dist checkpoints) that several test files build, a
toy run directory prepared up to training, and a local Ray cluster for a test module to
share."""

from contextlib import contextmanager
from pathlib import Path

import ray
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from opd_core.config import load_config
from opd_core.hf_utils import make_tiny_qwen3
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
