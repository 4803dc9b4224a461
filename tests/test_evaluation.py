"""opd_core.evaluation: the pass@k estimator, the summary arithmetic, and a real end-to-end eval."""

from __future__ import annotations

import json
import math

import pytest

from opd_core.config import EvalConfig, ToyConfig
from opd_core.engine.generation import Generator
from opd_core.evaluation import chat_prompt_ids, evaluate, pass_at_k, write_eval
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.io import read_arrow
from opd_core.schemas import EVAL_SAMPLES
from opd_core.toy.task import make_toy_splits
from opd_core.toy.tokenizer import build_tokenizer


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 0, 1, 0.0),
        (4, 1, 1, 0.25),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
        (4, 3, 2, 1.0),  # n - c < k: every pair holds a correct one
        (4, 4, 4, 1.0),
        (4, 1, 4, 1.0),
        (4, 0, 4, 0.0),
    ],
)
def test_pass_at_k_matches_hand_computed(n, c, k, expected):
    assert math.isclose(pass_at_k(n, c, k), expected)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="k=5 is larger than the 4 samples"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(4, 5, 1)


def test_chat_prompt_ids_is_the_chat_template():
    tokenizer = build_tokenizer()
    prompts, _ = make_toy_splits(ToyConfig(num_train=3, num_eval=1))
    ids = chat_prompt_ids(tokenizer, prompts)
    text = tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>user\nSolve the following math problem")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert ids == chat_prompt_ids(tokenizer, prompts.column("prompt").to_pylist())


def test_summary_arithmetic_with_a_scripted_generator(tmp_path):
    """A deterministic answer function with known correctness gives exact pass@1/pass@k."""
    tokenizer = build_tokenizer()
    _, prompts = make_toy_splits(ToyConfig(num_train=10, num_eval=4))
    labels = prompts.column("label").to_pylist()
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    calls = []

    def answer(input_ids, params):
        calls.append((len(input_ids), dict(params)))
        out = []
        for position, ids in enumerate(input_ids):
            prompt = prompt_ids.index(ids)
            if params["temperature"] == 0:
                right = prompt in (0, 1)  # greedy: prompts 0 and 1 correct
            else:
                # Batches hold k=3 copies per prompt in order; prompt p gets p correct samples.
                sample = (params["sampling_seed"] + position - 7) % 3
                right = sample < prompt
            text = f"Answer: \\boxed{{{labels[prompt] if right else -1}}}"
            out.append({"text": text, "output_ids": [], "meta_info": {}})
        return out

    cfg = EvalConfig(k=3, temperature=1.0, max_new_tokens=8)
    samples, summary = evaluate(answer, tokenizer, prompts, cfg, seed=7, batch_size=5)
    assert summary["pass_at_1"] == 0.5
    # prompt p has c=min(p,3) of n=3 correct: pass@3 = [0, 1, 1, 1]
    assert summary["pass_at_k"] == 0.75
    assert summary["mean_sample_accuracy"] == (0 + 1 + 2 + 3) / 12
    assert summary["k"] == 3 and summary["num_prompts"] == 4
    assert samples.num_rows == 4 * (1 + 3) and samples.schema.equals(EVAL_SAMPLES)
    # Sampled batches get distinct seeds (offset by batch start); greedy carries none.
    assert [p.get("sampling_seed") for _, p in calls] == [None, 7, 12, 17]
    assert all(p["max_new_tokens"] == 8 for _, p in calls)

    write_eval(tmp_path / "eval", samples, summary)
    assert read_arrow(tmp_path / "eval" / "samples.arrow", EVAL_SAMPLES).equals(samples)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["pass_at_k"] == 0.75


def test_end_to_end_with_a_real_tiny_model(tmp_path):
    model_dir = make_tiny_qwen3(tmp_path / "tiny")
    generator = Generator(model_dir)
    _, prompts = make_toy_splits(ToyConfig(num_train=10, num_eval=6))
    cfg = EvalConfig(k=2, temperature=1.0, max_new_tokens=6)
    samples, summary = evaluate(generator.generate_ids, generator.tokenizer, prompts, cfg, seed=3)

    rows = samples.to_pylist()
    assert len(rows) == 6 * 3
    assert [r["sample_index"] for r in rows[:3]] == [0, 1, 2] and [
        r["greedy"] for r in rows[:3]
    ] == [True, False, False]
    assert [r["prompt_index"] for r in rows[::3]] == prompts.column("index").to_pylist()
    assert all(
        r["label"] == label for r, label in zip(rows[::3], prompts.column("label").to_pylist())
    )
    # A random model answers nothing right; the summary agrees with the rows either way.
    greedy_correct = sum(r["correct"] for r in rows if r["greedy"])
    assert summary["pass_at_1"] == greedy_correct / 6
    assert 0 <= summary["pass_at_1"] <= summary["pass_at_k"] + 1 / 6 and summary["seconds"] > 0
    # Greedy is deterministic and sampling is seeded: the same call gives the same rows.
    again, _ = evaluate(generator.generate_ids, generator.tokenizer, prompts, cfg, seed=3)
    assert again.column("response_text").equals(samples.column("response_text"))
    with pytest.raises(ValueError, match="no prompts"):
        evaluate(generator.generate_ids, generator.tokenizer, prompts.slice(0, 0), cfg)
