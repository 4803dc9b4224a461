"""The pre-flight check on pairs of tiny models built to differ in one thing each: every
difference is caught with its message, a padded-but-compatible pair passes, `preflight.allow`
accepts a named difference, and prompts that cannot fit the context are named or dropped."""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import math500_rows, write_jsonl
from transformers import AutoTokenizer, Qwen3ForCausalLM

from opd_core.config import OPDRunConfig
from opd_core.data import load_prompts
from opd_core.download import run_download
from opd_core.evaluation import chat_prompt_ids
from opd_core.hf_utils import make_tiny_qwen3, qwen3_config, save_hf_model
from opd_core.preflight import ModelInfo, PreflightError, check_models, run_preflight
from opd_core.rundir import RunDir
from opd_core.toy.tokenizer import CHAT_TEMPLATE, build_tokenizer

PROBES = [[{"role": "user", "content": "What is 12 + 34?"}]]


def model_dir(root, name, tokenizer=None, vocab_rows=None, **overrides):
    """A tiny Qwen3 with `tokenizer` (the toy one by default) and `vocab_rows` embedding rows."""
    tokenizer = tokenizer or build_tokenizer()
    config = qwen3_config(tokenizer, **overrides)
    config.vocab_size = vocab_rows or len(tokenizer)
    torch.manual_seed(0)
    return save_hf_model(Qwen3ForCausalLM(config), tokenizer, root / name)


def info(role, path):
    return ModelInfo.load(role, str(path.name), path)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return info("student", model_dir(tmp_path_factory.mktemp("pair"), "student"))


def problems_with(student, teacher_dir, kwargs=None):
    return check_models(student, info("teacher", teacher_dir), PROBES, kwargs or {})


def test_the_same_family_padded_differently_passes(student, tmp_path):
    """Qwen2.5-7B vs 0.5B: one tokenizer, embedding rows padded to different sizes."""
    padded = model_dir(tmp_path, "teacher", vocab_rows=len(build_tokenizer()) + 64)
    problems, facts = problems_with(student, padded)
    assert problems == {}
    assert "every real token id (< 384) fits both" in facts["vocab_padding"]


def test_other_merges_are_a_tokenizer_difference(student, tmp_path):
    teacher = model_dir(tmp_path, "teacher", tokenizer=build_tokenizer(vocab_size=300))
    problems, _ = problems_with(student, teacher)
    assert "the same text gets different token ids" in problems["tokenizer"]
    assert "student [" in problems["tokenizer"] and "teacher [" in problems["tokenizer"]


def test_an_added_special_token_is_caught(student, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>"]})
    problems, _ = problems_with(student, model_dir(tmp_path, "teacher", tokenizer=tokenizer))
    assert (
        problems["special_tokens"]
        == "added special tokens differ: only the teacher has ['<think>']"
    )
    assert "tokenizer" in problems  # '<think>' is one token for one of them, six for the other


def test_another_chat_template_is_caught_and_can_be_allowed(student, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n\\n'"
    )
    teacher = model_dir(tmp_path, "teacher", tokenizer=tokenizer)
    problems, _ = problems_with(student, teacher)
    assert set(problems) == {"chat_template"}
    assert "render differently" in problems["chat_template"]
    assert "student '" in problems["chat_template"] and "teacher '" in problems["chat_template"]

    cfg = OPDRunConfig.model_validate({"preflight": {"allow": ["chat_template"]}})
    train = load_prompts("toy", cfg.toy, split="train", limit=4)
    _, _, report = run_preflight(cfg, student.path, teacher, train, {}, {"train": "toy"})
    assert "render differently" in report["allowed"]["chat_template"]
    cfg = OPDRunConfig()
    with pytest.raises(PreflightError, match="preflight.allow: \\['chat_template'\\]") as error:
        run_preflight(cfg, student.path, teacher, train, {}, {"train": "toy"})
    assert "student " in str(error.value) and "and teacher " in str(error.value)


def test_eos_and_pad_are_compared(student, tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    problems, _ = problems_with(student, model_dir(tmp_path, "teacher", tokenizer=tokenizer))
    assert "eos token differs: student '<|im_end|>'" in problems["eos_pad"]


def test_an_embedding_smaller_than_the_tokenizer_is_never_allowed(student, tmp_path):
    short = model_dir(tmp_path, "teacher", vocab_rows=len(build_tokenizer()) - 10)
    problems, _ = problems_with(student, short)
    assert "can emit token ids up to 383" in problems["embedding"]
    assert (
        "the tokenizer has 384 tokens but the embedding only 374 rows"
        in problems["embedding_teacher"]
    )
    cfg = OPDRunConfig.model_validate(
        {"preflight": {"allow": ["tokenizer", "special_tokens", "eos_pad", "chat_template"]}}
    )
    train = load_prompts("toy", cfg.toy, split="train", limit=4)
    with pytest.raises(PreflightError, match="embedding"):
        run_preflight(cfg, student.path, short, train, {}, {"train": "toy"})


def test_context_length_vs_prompt_plus_response(tmp_path):
    """The teacher's shorter context is caught in the download stage, naming the file and the
    1-based line of the prompt; dropping is an option, and counted."""
    student = make_tiny_qwen3(tmp_path / "student")
    teacher = model_dir(tmp_path, "teacher", max_position_embeddings=80)
    short, long = "What is 1 + 1?", "What is 1 + 1? " + "Think hard. " * 40
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": p, "label": "2"} for p in (short, short, long, short)],
    )
    tree = {
        "models": {"student": str(student), "teacher": str(teacher)},
        "data": {"train": str(data)},
        "eval": {"benchmarks": [{"name": "e", "source": str(data), "limit": 2}]},
        "rollout": {"rollout_max_response_len": 16},
    }
    run_dir = RunDir.create(tmp_path / "artifacts", "r")
    with pytest.raises(
        PreflightError, match=r"train.jsonl: 1 prompt\(s\) too long: line 3 \(\d+ tokens\)"
    ):
        run_download(OPDRunConfig.model_validate(tree), run_dir)
    assert not run_dir.train_data.exists()  # nothing half-written
    tree["preflight"] = {"drop_overlong_prompts": True}
    result = run_download(OPDRunConfig.model_validate(tree), run_dir)
    assert result["num_train"] == 3 and result["dropped"]["train"] == 1
    manifest = json.loads((run_dir.stage("download") / "manifest.json").read_text())
    prompts = manifest["preflight"]["prompts"]
    assert prompts["train"]["dropped_over_context"] == 1 and prompts["train_context"] == 80
    # SGLang scores prompt + response only below max_req_input_len (context - 6).
    assert prompts["prompt_budget"] == 80 - 7 - 16
    # slime's rollout_max_prompt_len drops by length alone (here: everything but the short ones).
    tree["rollout"]["rollout_max_prompt_len"] = 40
    tree["preflight"] = {}
    result = run_download(OPDRunConfig.model_validate(tree), run_dir)
    assert result["num_train"] == 3
    manifest = json.loads((run_dir.stage("download") / "manifest.json").read_text())
    assert manifest["preflight"]["prompts"]["train"]["dropped_over_rollout_max_prompt_len"] == 1
    tree["rollout"] = {"rollout_max_response_len": 80}
    with pytest.raises(PreflightError, match="leaves no room for a prompt"):
        run_download(OPDRunConfig.model_validate(tree), run_dir)


def test_a_prompt_with_less_room_than_a_full_response_trains_capped(tmp_path, caplog):
    """Between the budget (a full response fits) and SGLang's input limit (context - 6): kept,
    counted as capped (rollouts lower max_new_tokens for it), not an error."""
    student = make_tiny_qwen3(tmp_path / "student")
    teacher = model_dir(tmp_path, "teacher", max_position_embeddings=80)
    tokenizer = AutoTokenizer.from_pretrained(student)
    budget, input_limit = 80 - 7 - 16, 80 - 7

    def length(prompt):
        (ids,) = chat_prompt_ids(tokenizer, [[{"role": "user", "content": prompt}]])
        return len(ids)

    middle = next(
        p
        for k in range(60)
        if budget < length(p := "What is 1 + 1? " + "Think. " * k) < input_limit
    )
    data = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": p, "label": "2"} for p in ("1+1?", middle)]
    )
    tree = {
        "models": {"student": str(student), "teacher": str(teacher)},
        "data": {"train": str(data)},
        "eval": {"benchmarks": [{"name": "e", "source": str(data)}]},
        "rollout": {"rollout_max_response_len": 16},
    }
    run_dir = RunDir.create(tmp_path / "artifacts", "r")
    result = run_download(OPDRunConfig.model_validate(tree), run_dir)
    assert result["num_train"] == 2
    manifest = json.loads((run_dir.stage("download") / "manifest.json").read_text())
    train = manifest["preflight"]["prompts"]["train"]
    assert train["capped"] == 1 and train["dropped_over_context"] == 0
    assert "1 train prompt(s) longer than 57 tokens" in caplog.text


def test_eval_prompts_must_leave_room_for_an_answer(tmp_path):
    student = model_dir(tmp_path, "student", max_position_embeddings=64)
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1?", "label": 2}] * 3)
    rows = math500_rows()
    rows[1]["problem"] = "Let $x$ be a real number. " * 30  # line 2: longer than the context
    math500 = write_jsonl(tmp_path / "math500.jsonl", rows)
    tree = {
        "models": {"student": str(student), "teacher": str(student)},
        "data": {"train": str(train)},
        "eval": {
            "max_new_tokens": 48,
            "benchmarks": [
                {"preset": "HuggingFaceH4/MATH-500", "source": str(math500), "template": "none"}
            ],
        },
        "rollout": {"rollout_max_response_len": 8},
    }
    run_dir = RunDir.create(tmp_path / "artifacts", "r")
    with pytest.raises(
        PreflightError,
        match=r"math500.jsonl: 1 prompt\(s\) too long: line 2 .*no room for an answer",
    ):
        run_download(OPDRunConfig.model_validate(tree), run_dir)
    tree["preflight"] = {"drop_overlong_prompts": True}
    result = run_download(OPDRunConfig.model_validate(tree), run_dir)
    assert result["eval_benchmarks"] == {"math500": 5} and result["dropped"]["eval"] == {
        "math500": 1
    }
    report = json.loads((run_dir.stage("download") / "manifest.json").read_text())["preflight"]
    # The others fit, but leave less than 48 new tokens: evaluate() caps them (counted).
    assert report["prompts"]["eval"]["math500"]["capped"] == 5
    tree["rollout"]["rollout_max_prompt_len"] = 1
    with pytest.raises(PreflightError, match="every train prompt was dropped"):
        run_download(OPDRunConfig.model_validate(tree), run_dir)
