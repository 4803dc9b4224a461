"""The built-in toy task (data shape, determinism, disjoint splits) and the toy models.

The toy models are built once for this module (the real default build, about a minute on
2 cores) in a temporary cache dir; the second build call must be a cache hit.
"""

from __future__ import annotations

import re

import pytest

from opd_core.config import EvalConfig, ToyConfig
from opd_core.engine.generation import Generator
from opd_core.evaluation import evaluate
from opd_core.schemas import PROMPTS
from opd_core.toy.models import build_toy_models, toy_cache_dir
from opd_core.toy.task import make_toy_splits, target_response
from opd_core.toy.tokenizer import DAPO_INSTRUCTION
from opd_core.verifier import is_correct

PROBLEM = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def problems(table):
    return [PROBLEM.search(p[0]["content"]).groups() for p in table.column("prompt").to_pylist()]


def test_toy_rows_have_dapo_shape_and_correct_labels():
    train, evaluation = make_toy_splits(
        ToyConfig(num_train=300, num_eval=50, operations=["+", "-"])
    )
    assert train.schema.equals(PROMPTS) and (train.num_rows, evaluation.num_rows) == (300, 50)
    row = train.to_pylist()[0]
    assert row["prompt"][0]["role"] == "user" and len(row["prompt"]) == 1
    head, tail = DAPO_INSTRUCTION.split("{problem}")
    assert row["prompt"][0]["content"].startswith(head) and row["prompt"][0]["content"].endswith(
        tail
    )
    for table in (train, evaluation):
        for (a, op, b), label in zip(problems(table), table.column("label").to_pylist()):
            assert len(a) == len(b) == 2  # fixed-width operands
            assert int(label) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    assert {op for _, op, _ in problems(train)} == {"+", "-"}
    assert train.column("index").to_pylist() == list(range(300))
    assert evaluation.column("index").to_pylist() == list(range(300, 350))
    assert is_correct(target_response(row["label"]), row["label"])


def test_toy_splits_are_deterministic_and_disjoint():
    cfg = ToyConfig(num_train=2000, num_eval=200)
    train, evaluation = make_toy_splits(cfg)
    again_train, again_eval = make_toy_splits(cfg)
    assert train.equals(again_train) and evaluation.equals(again_eval)
    assert not make_toy_splits(cfg.model_copy(update={"seed": 1}))[0].equals(train)
    train_set, eval_set = set(problems(train)), set(problems(evaluation))
    assert len(train_set) == 2000 and len(eval_set) == 200 and not train_set & eval_set


def test_toy_rejects_more_problems_than_exist():
    with pytest.raises(ValueError, match="exceeds the 100 distinct 1-digit problems"):
        make_toy_splits(ToyConfig(digits=1, num_train=90, num_eval=20))


# ----------------------------------------------------------------------------- the models


@pytest.fixture(scope="module")
def toy_models():
    # The default cache (.cache/opd-toy): the end-to-end test and `make demo` reuse this build.
    cfg = ToyConfig()
    return cfg, build_toy_models(cfg, progress=False)


@pytest.mark.slow
def test_toy_models_meet_their_pass_at_1_targets(toy_models):
    cfg, models = toy_models
    assert models.teacher_pass_at_1 >= 0.95
    assert 0.0 < models.student_pass_at_1 <= 0.40
    for model_dir in (models.teacher_dir, models.student_dir):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (model_dir / name).is_file(), model_dir / name
    # The student is the smaller model.
    teacher_size = (models.teacher_dir / "model.safetensors").stat().st_size
    assert (models.student_dir / "model.safetensors").stat().st_size < teacher_size


@pytest.mark.slow
def test_second_build_is_a_cache_hit(toy_models):
    cfg, models = toy_models
    manifest = toy_cache_dir(cfg) / "toy_models.json"
    before = manifest.stat().st_mtime_ns
    assert build_toy_models(cfg, progress=False) == models
    assert manifest.stat().st_mtime_ns == before
    # A different toy section is a different cache entry.
    assert toy_cache_dir(cfg.model_copy(update={"seed": 1})) != toy_cache_dir(cfg)


@pytest.mark.slow
def test_engine_eval_agrees_with_the_recorded_pass_at_1(toy_models):
    """The saved checkpoints, loaded by the inference engine, score what the build measured."""
    cfg, models = toy_models
    _, evaluation = make_toy_splits(cfg)
    for model_dir, recorded in (
        (models.teacher_dir, models.teacher_pass_at_1),
        (models.student_dir, models.student_pass_at_1),
    ):
        generator = Generator(model_dir)
        _, summary = evaluate(
            generator.generate_ids,
            generator.tokenizer,
            evaluation,
            EvalConfig(n_samples=1, max_new_tokens=12),
        )
        assert summary["pass_at_1"] == pytest.approx(recorded, abs=0.02), model_dir
