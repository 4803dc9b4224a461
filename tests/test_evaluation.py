"""opd_core.evaluation: pass@k, avg@n and greedy pass@1 arithmetic, groups, context caps,
chat-template kwargs, several benchmarks, and a real end-to-end eval."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from opd_core.config import EvalConfig, EvalSettings, ToyConfig
from opd_core.engine.generation import Generator
from opd_core.evaluation import (
    chat_prompt_ids,
    evaluate,
    evaluate_benchmarks,
    pass_at_k,
    write_eval,
)
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.io import read_arrow
from opd_core.schemas import EVAL_PROMPTS, EVAL_SAMPLES
from opd_core.toy.task import make_toy_splits
from opd_core.toy.tokenizer import CHAT_TEMPLATE, build_tokenizer


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


def thinking_tokenizer():
    """The toy tokenizer with Qwen3's `enable_thinking` switch in its template."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "'<|im_start|>assistant\\n' }}",
        "'<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and not enable_thinking %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}",
    )
    return tokenizer


def test_chat_template_kwargs_reach_the_template():
    tokenizer = thinking_tokenizer()
    messages = [[{"role": "user", "content": "What is 1 + 1?"}]]
    plain = tokenizer.decode(chat_prompt_ids(tokenizer, messages)[0])
    off = tokenizer.decode(chat_prompt_ids(tokenizer, messages, {"enable_thinking": False})[0])
    assert off == plain + "<think>\n\n</think>\n\n"


def scripted(prompt_ids, labels, calls, greedy_right, sample_right, lengths=None):
    """A generate function with known answers. `greedy_right(p)`, `sample_right(p, j)` say
    whether prompt p's greedy / j-th sampled answer is right; prompts 3+ answer nothing."""

    def generate(input_ids, params):
        calls.append((len(input_ids), params))
        out = []
        for position, ids in enumerate(input_ids):
            p = prompt_ids.index(ids)
            seq = params[position] if isinstance(params, list) else params
            if seq["temperature"] == 0:
                right = greedy_right(p)
            else:
                seed = seq["sampling_seed"] + (0 if isinstance(params, list) else position)
                right = sample_right(p, seed)
            text = f"Answer: \\boxed{{{labels[p] if right else -1}}}" if p < 3 else "I give up"
            finish = "length" if p == 3 else "stop"
            n_tokens = (lengths or {}).get(p, 5)
            meta = {"finish_reason": {"type": finish}, "completion_tokens": n_tokens}
            out.append({"text": text, "output_ids": [0] * n_tokens, "meta_info": meta})
        return out

    return generate


def test_summary_arithmetic_with_a_scripted_generator(tmp_path):
    """Known correctness gives exact avg@n, pass@k for every k, greedy pass@1, shares, groups."""
    tokenizer = build_tokenizer()
    _, prompts = make_toy_splits(ToyConfig(num_train=10, num_eval=4))
    tags = [[("level", "1")], [("level", "1")], [("level", "2")], [("level", "10")]]
    prompts = prompts.append_column("tags", pa.array(tags, pa.map_(pa.string(), pa.string())))
    labels = prompts.column("label").to_pylist()
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    calls = []
    # Sequence s of the call (seed 7 + s) is sample j = s % 3 of prompt s // 3; prompt p has
    # min(p, 3) right samples: c = [0, 1, 2, 0 (it gives no answer)].
    generate = scripted(
        prompt_ids, labels, calls, lambda p: p in (0, 1), lambda p, seed: (seed - 7) % 3 < p
    )
    cfg = EvalSettings(n_samples=3, pass_k=[1, 2, 3], temperature=1.0, max_new_tokens=8)
    samples, summary = evaluate(generate, tokenizer, prompts, cfg, seed=7, batch_size=5)
    assert summary["pass_at_1"] == summary["greedy_pass_at_1"] == 0.5
    assert summary["pass_at_1_kind"] == "greedy"
    assert summary["avg_at_n"] == summary["mean_sample_accuracy"] == (0 + 1 + 2 + 0) / 12
    # pass@k = mean over prompts of 1 - C(3-c, k)/C(3, k), c = [0, 1, 2, 0]
    assert summary["pass_at"]["1"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 0) / 4)
    assert summary["pass_at"]["2"] == pytest.approx((0 + 2 / 3 + 1 + 0) / 4)
    assert summary["pass_at"]["3"] == pytest.approx((0 + 1 + 1 + 0) / 4)
    assert (summary["k"], summary["pass_at_k"]) == (3, summary["pass_at"]["3"])
    assert summary["num_prompts"] == 4 and summary["n_samples"] == 3
    assert summary["truncated_share"] == summary["no_answer_share"] == 3 / 12  # prompt 3
    assert summary["response_tokens_mean"] == 5 and summary["capped_prompts"] == 0
    levels = summary["by_group"]["level"]
    assert list(levels) == ["1", "2", "10"]  # natural order
    assert levels["1"]["num_prompts"] == 2 and levels["1"]["pass_at_1"] == 1.0
    assert levels["2"]["avg_at_n"] == pytest.approx(2 / 3)
    assert samples.num_rows == 4 * (1 + 3) and samples.schema.equals(EVAL_SAMPLES)
    assert samples.column("finish_reason").to_pylist()[12:14] == ["length", "length"]
    # Sampled batches get distinct seeds (offset by batch start); greedy carries none.
    assert [p.get("sampling_seed") for _, p in calls] == [None, 7, 12, 17]
    assert all(p["max_new_tokens"] == 8 for _, p in calls)

    write_eval(tmp_path / "eval", samples, summary)
    assert read_arrow(tmp_path / "eval" / "samples.arrow", EVAL_SAMPLES).equals(samples)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["pass_at"]["2"] > 0
    assert "avg@3 (sampled accuracy" in (tmp_path / "eval" / "summary.md").read_text()


def test_without_greedy_pass_at_1_is_the_sampled_estimate():
    tokenizer = build_tokenizer()
    _, prompts = make_toy_splits(ToyConfig(num_train=10, num_eval=3))
    labels = prompts.column("label").to_pylist()
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    calls = []
    generate = scripted(prompt_ids, labels, calls, None, lambda p, seed: (seed % 4) < p)
    cfg = EvalSettings(n_samples=4, greedy=False, max_new_tokens=4)
    _, summary = evaluate(generate, tokenizer, prompts, cfg, seed=0)
    assert len(calls) == 1 and calls[0][1]["temperature"] == 1.0  # no greedy call
    assert summary["greedy_pass_at_1"] is None
    assert summary["pass_at_1"] == summary["avg_at_n"] == (0 + 1 + 2) / 12
    assert summary["pass_at_1_kind"] == "mean of 4 samples"
    assert list(summary["pass_at"]) == ["1", "2", "4"]  # default ks: powers of 2 up to n, n


def test_max_new_tokens_is_capped_to_the_context_per_prompt():
    """prompt + max_new_tokens must fit the context (SGLang answers 400 otherwise): a prompt
    near the limit gets its own, smaller cap; seeds stay seed + position."""
    tokenizer = build_tokenizer()
    _, prompts = make_toy_splits(ToyConfig(num_train=10, num_eval=3))
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    longest = max(len(ids) for ids in prompt_ids)
    calls = []
    generate = scripted(
        prompt_ids, prompts.column("label").to_pylist(), calls, bool, lambda p, s: True
    )
    cfg = EvalSettings(n_samples=2, max_new_tokens=50)
    _, summary = evaluate(generate, tokenizer, prompts, cfg, seed=3, context_length=longest + 10)
    (_, greedy), (_, sampled) = calls  # per-sequence params: each prompt its own cap
    caps = [min(50, longest + 10 - len(ids)) for ids in prompt_ids]
    assert [p["max_new_tokens"] for p in greedy] == caps
    assert [p["max_new_tokens"] for p in sampled] == [c for c in caps for _ in range(2)]
    assert [p["sampling_seed"] for p in sampled] == [3, 4, 5, 6, 7, 8]
    assert summary["capped_prompts"] == 3
    with pytest.raises(ValueError, match="no room for an answer in the model's context of"):
        evaluate(generate, tokenizer, prompts, cfg, context_length=longest)


def test_several_benchmarks_each_reported_the_first_on_top():
    tokenizer = build_tokenizer()
    _, toy = make_toy_splits(ToyConfig(num_train=10, num_eval=4))
    rows = toy.to_pylist()
    table = pa.Table.from_pylist(
        [{**r, "benchmark": "a" if i < 3 else "b", "tags": []} for i, r in enumerate(rows)],
        schema=EVAL_PROMPTS,
    )
    prompt_ids = chat_prompt_ids(tokenizer, table)
    calls = []
    generate = scripted(
        prompt_ids, table.column("label").to_pylist(), calls, lambda p: p == 0, lambda p, s: False
    )
    cfg = EvalConfig(
        n_samples=2,
        benchmarks=[
            {"name": "a", "source": "x.jsonl"},
            {"name": "b", "source": "y.jsonl", "n_samples": 1},
        ],
    )
    samples, summary = evaluate_benchmarks(generate, tokenizer, table, cfg)
    assert list(summary["benchmarks"]) == ["a", "b"]
    assert summary["benchmarks"]["a"]["num_prompts"] == 3 and summary["num_prompts"] == 3
    assert summary["pass_at_1"] == summary["benchmarks"]["a"]["pass_at_1"] == 1 / 3
    assert summary["benchmarks"]["b"]["n_samples"] == 1  # its own override
    assert samples.column("benchmark").to_pylist() == ["a"] * 9 + ["b"] * 2
    missing = EvalConfig(benchmarks=[{"name": "c", "source": "z.jsonl"}])
    with pytest.raises(ValueError, match="has no rows of benchmark 'c'"):
        evaluate_benchmarks(generate, tokenizer, table, missing)


def test_end_to_end_with_a_real_tiny_model(tmp_path):
    model_dir = make_tiny_qwen3(tmp_path / "tiny")
    generator = Generator(model_dir)
    _, prompts = make_toy_splits(ToyConfig(num_train=10, num_eval=6))
    cfg = EvalSettings(n_samples=2, temperature=1.0, max_new_tokens=6)
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
