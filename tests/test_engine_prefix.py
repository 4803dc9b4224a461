"""The built-in engine's radix cache: shared prompt prefixes of a batch computed once."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_core.engine.generation import Generator
from opd_core.engine.prefix import PrefixPlan
from opd_core.engine.server import parse_args
from opd_core.hf_utils import make_tiny_qwen3

TOL = 1e-4
HEAD = [7, 8, 9, 10, 11, 12]  # what every prompt of a dataset template starts with
PROMPTS = [HEAD + [40, 41, 42], HEAD + [50, 51], HEAD + [60, 61, 62, 63]]


def test_plan_shares_the_head_and_each_prompts_samples():
    prompts = [p for p in PROMPTS for _ in range(3)]  # 3 samples per prompt, in groups
    plan = PrefixPlan.of(prompts, [len(p) - 1 for p in prompts])
    head, distinct, rest = plan.segments
    assert head.rows == [HEAD] and head.parents is None
    assert distinct.rows == [[40, 41], [50], [60, 61, 62]] and distinct.parents == [0, 0, 0]
    assert rest.rows == [[p[-1]] for p in prompts]  # the last prompt token, always computed
    assert rest.parents == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # The first sample computes the head and its prompt; the others of its prompt reuse it
    # all; the first sample of every later prompt reuses the head.
    assert plan.cached_tokens == [0, 8, 8, 6, 7, 7, 6, 9, 9]


def test_plan_without_sharing_is_one_plain_forward():
    prompts = [[1, 2, 3], [4, 5, 6]]
    plan = PrefixPlan.of(prompts, [2, 2])
    assert [s.rows for s in plan.segments] == [prompts] and plan.cached_tokens == [0, 0]
    # logprob_start_len 0 (cacheable 0) turns the cache off for a request, as in SGLang.
    plan = PrefixPlan.of([PROMPTS[0], PROMPTS[0]], [0, 0])
    assert len(plan.segments) == 1 and plan.cached_tokens == [0, 0]


def test_plan_caps_the_prefix_below_the_last_prompt_token():
    plan = PrefixPlan.of([[1, 2, 3], [1, 2, 3]], [3, 3])  # asks for more than it may share
    assert plan.segments[-1].rows == [[3], [3]] and plan.cached_tokens == [0, 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("prefix") / "model", max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _requests():
    """Rollout-shaped requests (seeded samples of each prompt), a teacher-scoring request per
    prompt + response (logprob_start_len = len(prompt) - 1, top-k), and one that turns the
    cache off (logprob_start_len 0)."""
    rollouts = [
        {
            "input_ids": prompt,
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": seed},
        }
        for prompt in PROMPTS
        for seed in range(3)
    ]
    scoring = [
        {
            "input_ids": prompt + [90, 91, 92, 93],
            "return_logprob": True,
            "logprob_start_len": len(prompt) - 1,
            "top_logprobs_num": 3,
            "sampling_params": {"max_new_tokens": 0},
        }
        for prompt in PROMPTS
        for _ in range(2)
    ]
    whole = {
        "input_ids": PROMPTS[1],
        "return_logprob": True,
        "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0},
    }
    return rollouts, scoring, whole


def test_the_cache_changes_no_token_and_no_logprob(model_dir, hf_model):
    rollouts, scoring, whole = _requests()
    for requests in (rollouts, scoring, [*rollouts[:4], whole]):
        plain = Generator(model_dir, sampling_seed_mode="honour", prefix_cache=False)
        cached = Generator(model_dir, sampling_seed_mode="honour")
        for a, b in zip(plain.generate(requests), cached.generate(requests)):
            assert a["output_ids"] == b["output_ids"]
            assert a["meta_info"]["cached_tokens"] == 0
            for key in ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs"):
                for x, y in zip(a["meta_info"].get(key, []), b["meta_info"].get(key, [])):
                    if key == "input_top_logprobs":
                        assert (x is None) == (y is None)
                        if x is not None:
                            assert [e[1] for e in x] == [e[1] for e in y]
                            assert max(abs(e[0] - f[0]) for e, f in zip(x, y)) < TOL
                        continue
                    assert x[1] == y[1] and (x[0] is None) == (y[0] is None)
                    if x[0] is not None:
                        assert abs(x[0] - y[0]) < TOL
    # And the scores are the model's own: a direct forward of each scored sequence.
    for request, out in zip(scoring, Generator(model_dir).generate(scoring)):
        ids = request["input_ids"]
        with torch.no_grad():
            reference = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], dim=-1)
        entries = out["meta_info"]["input_token_logprobs"]
        start = request["logprob_start_len"]
        assert [e[1] for e in entries] == ids[start:] and entries[0][0] is None
        for j, entry in enumerate(entries[1:], start=start + 1):
            assert abs(entry[0] - reference[j - 1, ids[j]].item()) < TOL


def test_cached_tokens_are_reported_as_sglang_does(model_dir):
    rollouts, scoring, whole = _requests()
    generator = Generator(model_dir, sampling_seed_mode="honour")
    cached = [o["meta_info"]["cached_tokens"] for o in generator.generate(rollouts)]
    assert cached == [0, 8, 8, 6, 7, 7, 6, 9, 9]
    # logprob_start_len 0: SGLang does not use the prefix cache for that request.
    assert generator.generate([whole, whole])[1]["meta_info"]["cached_tokens"] == 0


def test_disable_radix_cache_flag_turns_it_off():
    args, ignored = parse_args(["--model-path", "m", "--disable-radix-cache"])
    assert args.disable_radix_cache and ("--disable-radix-cache", None) not in ignored
    assert not parse_args(["--model-path", "m"])[0].disable_radix_cache
