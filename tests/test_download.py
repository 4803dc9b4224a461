"""opd_core.download.run_download: toy and local sources into a run dir, with a true manifest."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import constants as hub_constants

from opd_core.config import OPDRunConfig, ToyConfig, ToyModelSpec
from opd_core.download import ModelSourceError, run_download, validate_model_dir
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.io import read_arrow, sha256_file
from opd_core.rundir import RunDir
from opd_core.schemas import PROMPTS


def check_manifest(run_dir: RunDir) -> dict:
    stage = run_dir.stage("download")
    manifest = json.loads((stage / "manifest.json").read_text())
    files = manifest["files"]
    for rel in (
        "models/student/config.json",
        "models/student/model.safetensors",
        "models/teacher/tokenizer.json",
        "data/train.arrow",
        "data/eval.arrow",
    ):
        assert rel in files, rel
    for rel, digest in files.items():
        assert sha256_file(stage / rel) == digest, rel
    on_disk = {str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file()} - {
        "manifest.json"
    }
    assert on_disk == set(
        files
    )  # every file written is in the manifest, nothing else (no temp dirs)
    return manifest


def test_toy_download(tmp_path):
    # A toy build cut to a few steps: this checks the wiring, test_toy.py checks the models.
    tiny = ToyModelSpec(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        train_steps=2,
        batch_size=4,
    )
    toy = ToyConfig(
        num_train=40,
        num_eval=8,
        teacher=tiny,
        student=tiny,
        teacher_min_pass_at_1=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    cfg = OPDRunConfig(toy=toy)
    run_dir = RunDir.create(tmp_path / "artifacts", "r1")
    result = run_download(cfg, run_dir)
    assert result["num_train"] == 40 and result["num_eval"] == 8
    manifest = check_manifest(run_dir)
    assert manifest["models"]["teacher"]["source"] == "toy"
    train, evaluation = (
        read_arrow(run_dir.train_data, PROMPTS),
        read_arrow(run_dir.eval_data, PROMPTS),
    )
    assert not set(train.column("index").to_pylist()) & set(evaluation.column("index").to_pylist())
    validate_model_dir(run_dir.student_hf)
    validate_model_dir(run_dir.teacher_hf)


def test_local_model_dirs_and_local_dataset(tmp_path):
    student = make_tiny_qwen3(tmp_path / "student", seed=1)
    teacher = make_tiny_qwen3(tmp_path / "teacher", seed=2, hidden_size=48)
    data = tmp_path / "math.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + 1?", "label": i + 1}) + "\n" for i in range(10)
        )
    )
    cfg = OPDRunConfig.model_validate(
        {
            "models": {"student": str(student), "teacher": str(teacher)},
            "data": {"train": str(data), "eval": str(data), "max_eval_prompts": 3},
        }
    )
    run_dir = RunDir.create(tmp_path / "artifacts", "r2")
    result = run_download(cfg, run_dir)
    assert (result["num_train"], result["num_eval"]) == (10, 3)
    check_manifest(run_dir)
    assert sha256_file(run_dir.teacher_hf / "model.safetensors") == sha256_file(
        teacher / "model.safetensors"
    )
    assert read_arrow(run_dir.eval_data, PROMPTS).column("label").to_pylist() == ["1", "2", "3"]
    # Running again replaces the files in place and the manifest still tells the truth.
    run_download(cfg, run_dir)
    check_manifest(run_dir)


@pytest.mark.parametrize(
    "remove, message",
    [
        ("config.json", r"config\.json is missing"),
        ("model.safetensors", r"model\.safetensors is missing"),
        ("tokenizer.json", None),
    ],
)
def test_local_model_dir_missing_files(tmp_path, remove, message):
    model = make_tiny_qwen3(tmp_path / "m")
    (model / remove).unlink()
    if remove == "tokenizer.json":
        (model / "tokenizer_config.json").unlink()
        message = r"tokenizer\.json is missing"
    cfg = OPDRunConfig.model_validate({"models": {"student": str(model)}})
    with pytest.raises(ModelSourceError, match=message) as info:
        run_download(cfg, RunDir.create(tmp_path / "artifacts", "r"))
    assert "models.student" in str(info.value) and str(model) in str(info.value)


def test_unknown_and_unreachable_model_sources(tmp_path, monkeypatch):
    cfg = OPDRunConfig.model_validate({"models": {"student": str(tmp_path / "nowhere")}})
    with pytest.raises(ModelSourceError, match="is not a directory"):
        run_download(cfg, RunDir.create(tmp_path / "artifacts", "r"))
    # No hub here: an hf: source must fail with the repo named, not hang or half-write.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg = OPDRunConfig.model_validate({"models": {"student": "hf:Qwen/Qwen3-8B"}})
    run_dir = RunDir.create(tmp_path / "artifacts", "r3")
    with pytest.raises(ModelSourceError, match="could not download Qwen/Qwen3-8B"):
        run_download(cfg, run_dir)
    assert not run_dir.student_hf.exists()
