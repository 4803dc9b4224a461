"""opd_core.download.run_download: toy, local and real-layout sources into a run dir with a true
manifest; every eval benchmark through baseline_eval and the report; errors that name the row."""

from __future__ import annotations

import json
import shutil

import pytest
from data_fixtures import MATH500_ROWS, write_fixtures
from huggingface_hub import constants as hub_constants

from opd_core.config import OPDRunConfig, ToyConfig, ToyModelSpec
from opd_core.data import DataError
from opd_core.datasets import DAPO_TEMPLATE
from opd_core.download import (
    ModelSourceError,
    download_config_hash,
    run_download,
    validate_model_dir,
)
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.io import read_arrow, read_json, sha256_file
from opd_core.rundir import RunDir
from opd_core.schemas import EVAL_PROMPTS, EVAL_SAMPLES, PROMPTS
from opd_core.stages import BaselineEval, FinalEval


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
            "data": {"train": str(data)},
            "eval": {"benchmarks": [{"name": "math", "source": str(data), "limit": 3}]},
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


def fixture_config(tmp_path, **extra) -> OPDRunConfig:
    """Tiny random student and teacher (one tokenizer), train on slime's dapo layout, and an
    eval benchmark for every other real layout, each through its preset."""
    paths = write_fixtures(tmp_path / "data")
    student = make_tiny_qwen3(tmp_path / "student", seed=1)
    teacher = make_tiny_qwen3(tmp_path / "teacher", seed=2, hidden_size=48)
    local = lambda preset, layout: {"preset": preset, "source": str(paths[layout])}
    tree = {
        "models": {"student": str(student), "teacher": str(teacher)},
        "data": {"train": local("zhuzilin/dapo-math-17k", "dapo_slime")},
        "eval": {
            "n_samples": 2,
            "max_new_tokens": 4,
            "benchmarks": [
                local("HuggingFaceH4/MATH-500", "math500"),
                local("HuggingFaceH4/aime_2024", "aime2024"),
                local("openai/gsm8k", "gsm8k"),
                {**local("BytedTsinghua-SIA/DAPO-Math-17k", "dapo_verl"), "name": "dapo-verl"},
            ],
        },
        **extra,
    }
    return OPDRunConfig.model_validate(tree)


def test_every_real_layout_loads_is_templated_graded_and_reported(tmp_path):
    cfg = fixture_config(tmp_path)
    run_dir = RunDir.create(tmp_path / "artifacts", "layouts")
    result = run_download(cfg, run_dir)
    names = ["math500", "aime2024", "gsm8k", "dapo-verl"]
    assert result["eval_benchmarks"] == dict(zip(names, [6, 2, 2, 3]))
    manifest = check_manifest(run_dir)
    assert manifest["data"]["eval"]["math500"]["template_text"] == DAPO_TEMPLATE
    assert manifest["data"]["eval"]["gsm8k"]["label_format"] == "gsm8k"
    eval_rows = read_arrow(run_dir.eval_data, EVAL_PROMPTS).to_pylist()
    assert [r["benchmark"] for r in eval_rows] == [
        n for n, k in zip(names, [6, 2, 2, 3]) for _ in range(k)
    ]
    first = eval_rows[0]
    assert first["prompt"][0]["content"] == DAPO_TEMPLATE.replace("{problem}", MATH500_ROWS[0][0])
    assert dict(first["tags"]) == {"subject": "Prealgebra", "level": "2"}
    assert {r["label"] for r in eval_rows if r["benchmark"] == "gsm8k"} == {"7", "120"}

    summary = BaselineEval(cfg, run_dir).build()
    assert list(summary["benchmarks"]) == names
    assert summary["num_prompts"] == 6 and summary["benchmark"] == "math500"  # the first on top
    math = summary["benchmarks"]["math500"]
    assert set(math["by_group"]) == {"subject", "level"}
    assert math["by_group"]["subject"]["Algebra"]["num_prompts"] == 2
    for name in names:
        bench = summary["benchmarks"][name]
        assert set(bench["pass_at"]) == {"1", "2"} and bench["response_tokens_mean"] <= 4
    samples = read_arrow(run_dir.stage("baseline_eval") / "samples.arrow", EVAL_SAMPLES)
    assert samples.num_rows == (6 + 2 + 2 + 3) * (1 + 2)
    # Graded: the rows agree with the summary (a random model: whatever it got right).
    rows = [r for r in samples.to_pylist() if r["benchmark"] == "aime2024" and not r["greedy"]]
    assert summary["benchmarks"]["aime2024"]["avg_at_n"] == sum(r["correct"] for r in rows) / len(
        rows
    )

    # The report: a section per benchmark, before/after, and MATH-500 by subject and level.
    # The teacher stands in for a trained student (no training ran).
    shutil.copytree(run_dir.teacher_hf, run_dir.final_student_hf)
    FinalEval(cfg, run_dir).build()
    report = run_dir.report.read_text()
    for name in names:
        assert f"### {name} (" in report
    assert "By subject (pass@1 (greedy))" in report and "| Precalculus | 1 |" in report
    assert "By level" in report and "avg@2 (sampled accuracy" in report
    assert "## Evaluation" in (run_dir.stage("baseline_eval") / "summary.md").read_text()


def test_a_broken_row_stops_the_download_naming_file_line_and_field(tmp_path):
    cfg = fixture_config(tmp_path)
    bad = tmp_path / "data" / "math500.jsonl"
    lines = bad.read_text().splitlines()
    row = json.loads(lines[3])
    row["answer"] = "\\frac{1}{"  # a label cut mid-brace
    bad.write_text("\n".join([*lines[:3], json.dumps(row), *lines[4:]]) + "\n")
    run_dir = RunDir.create(tmp_path / "artifacts", "bad")
    with pytest.raises(DataError, match=rf"{bad}: line 4: field 'answer' has unbalanced braces"):
        run_download(cfg, run_dir)
    assert not run_dir.eval_data.exists()
    bad.write_text("\n".join(lines[:2]) + "\n" + lines[2][:30])  # truncated third line
    with pytest.raises(DataError, match=rf"{bad}: line 3: not valid JSON"):
        run_download(cfg, run_dir)


def test_chat_template_kwargs_travel_with_the_data(tmp_path):
    """A changed chat_template_kwargs changes the data files (their hashes are the later
    stages' cache inputs) and the download stage's config key; eval sampling does not."""
    run_dir = RunDir.create(tmp_path / "artifacts", "kw")
    cfg = fixture_config(tmp_path)
    run_download(cfg, run_dir)
    before = sha256_file(run_dir.train_data)
    thinking = fixture_config(
        tmp_path, data={**cfg.data.model_dump(), "chat_template_kwargs": {"enable_thinking": True}}
    )
    run_download(thinking, run_dir)
    assert sha256_file(run_dir.train_data) != before
    assert read_json(run_dir.stage("download") / "manifest.json")["data"][
        "chat_template_kwargs"
    ] == {"enable_thinking": True}
    assert download_config_hash(thinking) != download_config_hash(cfg)
    resampled = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"n_samples": 8})})
    assert download_config_hash(resampled) == download_config_hash(cfg)
    fewer = cfg.model_dump()
    fewer["eval"]["benchmarks"][0]["limit"] = 2
    assert download_config_hash(OPDRunConfig.model_validate(fewer)) != download_config_hash(cfg)


def test_bad_input_is_not_retried_but_a_hiccup_is(prefect_harness):
    """The download task's retry condition, through Prefect's own retry machinery."""
    from prefect import task

    from tasks.download import worth_retrying

    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=worth_retrying)
    def flaky(error: Exception) -> None:
        calls.append(type(error).__name__)
        raise error

    with pytest.raises(DataError):
        flaky(DataError("data/x.jsonl: line 3: not valid JSON"))
    assert calls == ["DataError"]
    with pytest.raises(ModelSourceError):
        flaky(ModelSourceError("models.student: no such dir"))
    assert calls == ["DataError", "ModelSourceError"]
    calls.clear()
    with pytest.raises(ConnectionError):
        flaky(ConnectionError("hub hiccup"))
    assert calls == ["ConnectionError"] * 3
