"""Generator (the built-in engine's compute) against direct transformers forwards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_core.engine.generation import Generator, RequestError
from opd_core.engine.protocol import PromptTooLongError
from opd_core.hf_utils import make_tiny_qwen3

TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(
        tmp_path_factory.mktemp("engine_gen") / "model", max_position_embeddings=64
    )


@pytest.fixture(scope="module")
def generator(model_dir):
    return Generator(model_dir, seed=0)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def full_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


PROMPTS = [
    [5, 17, 200, 33, 9, 41, 7],
    [3, 4],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110],
]


def test_input_logprobs_match_direct_forward(generator, hf_model):
    requests = [
        {
            "input_ids": p,
            "return_logprob": True,
            "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 0},
        }
        for p in PROMPTS
    ]
    for prompt, out in zip(PROMPTS, generator.generate(requests)):
        entries = out["meta_info"]["input_token_logprobs"]
        assert [e[1] for e in entries] == prompt
        assert entries[0][0] is None and all(e[2] is None for e in entries)
        reference = full_logprobs(hf_model, prompt)
        expected = [reference[j - 1, prompt[j]].item() for j in range(1, len(prompt))]
        assert max(abs(a[0] - b) for a, b in zip(entries[1:], expected)) <= TOL
        assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {
            "type": "length",
            "length": 0,
        }
        assert out["meta_info"]["output_token_logprobs"] == []


def test_logprob_start_len_and_outputs_only(generator, hf_model):
    prompt = PROMPTS[0]
    mid, last = generator.generate(
        [
            {
                "input_ids": prompt,
                "return_logprob": True,
                "logprob_start_len": 3,
                "sampling_params": {"max_new_tokens": 0},
            },
            {
                "input_ids": prompt,
                "return_logprob": True,
                "logprob_start_len": -1,
                "sampling_params": {"max_new_tokens": 0},
            },
        ]
    )
    reference = full_logprobs(hf_model, prompt)
    entries = mid["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == prompt[3:] and entries[0][
        0
    ] is None  # SGLang pads the first with None
    assert abs(entries[1][0] - reference[3, prompt[4]].item()) <= TOL
    assert last["meta_info"]["input_token_logprobs"] == [[None, prompt[-1], None]]


def test_greedy_equals_stepwise_argmax_without_cache(generator, hf_model):
    prompt, steps = PROMPTS[0], 6
    [out] = generator.generate(
        [
            {
                "input_ids": prompt,
                "return_logprob": True,
                "sampling_params": {"max_new_tokens": steps, "temperature": 0, "ignore_eos": True},
            }
        ]
    )
    ids, expected_tokens, expected_logprobs = list(prompt), [], []
    for _ in range(steps):
        logprobs = full_logprobs(hf_model, ids)[-1]
        token = int(logprobs.argmax())
        expected_tokens.append(token)
        expected_logprobs.append(logprobs[token].item())
        ids.append(token)
    assert out["output_ids"] == expected_tokens
    got = [e[0] for e in out["meta_info"]["output_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(got, expected_logprobs)) <= TOL
    assert out["meta_info"]["completion_tokens"] == steps


def test_output_logprobs_are_temperature_scaled(generator, hf_model):
    prompt, temperature = PROMPTS[1], 0.7
    [out] = generator.generate(
        [
            {
                "input_ids": prompt,
                "return_logprob": True,
                "top_logprobs_num": 3,
                "sampling_params": {
                    "max_new_tokens": 3,
                    "temperature": temperature,
                    "sampling_seed": 3,
                    "ignore_eos": True,
                },
            }
        ]
    )
    ids = list(prompt)
    for entry, top in zip(
        out["meta_info"]["output_token_logprobs"], out["meta_info"]["output_top_logprobs"]
    ):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1]
        expected = torch.log_softmax(logits / temperature, dim=-1)
        assert abs(entry[0] - expected[entry[1]].item()) <= TOL
        assert [t[1] for t in top] == expected.topk(3).indices.tolist()
        ids.append(entry[1])


def test_batch_equals_single(generator):
    def request(p):
        return {
            "input_ids": p,
            "return_logprob": True,
            "logprob_start_len": 0,
            "sampling_params": {
                "max_new_tokens": 5,
                "temperature": 0.9,
                "sampling_seed": 11,
                "ignore_eos": True,
            },
        }

    batched = generator.generate([request(p) for p in PROMPTS])
    for prompt, together in zip(PROMPTS, batched):
        [alone] = generator.generate([request(prompt)])
        assert (
            alone["output_ids"] == together["output_ids"]
        )  # same seed -> same draw, whatever the batch
        for key in ("input_token_logprobs", "output_token_logprobs"):
            a, b = alone["meta_info"][key], together["meta_info"][key]
            assert [e[1] for e in a] == [e[1] for e in b]
            assert max(abs((x[0] or 0) - (y[0] or 0)) for x, y in zip(a, b)) <= TOL


def test_stop_conditions(generator):
    prompt = PROMPTS[0]
    seeded = {
        "max_new_tokens": 12,
        "temperature": 1.0,
        "sampling_seed": 7,
    }  # seeded: same draws each run
    [free] = generator.generate(
        [{"input_ids": prompt, "sampling_params": {**seeded, "ignore_eos": True}}]
    )
    ids = free["output_ids"]
    # The first token that did not occur before it: stopping on it ends exactly there.
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])
    stop_text = generator.decode([ids[k]])
    stop_token, stop_str = generator.generate(
        [
            {"input_ids": prompt, "sampling_params": {**seeded, "stop_token_ids": [ids[k]]}},
            {"input_ids": prompt, "sampling_params": {**seeded, "stop": [stop_text]}},
        ]
    )
    assert stop_token["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert stop_token["output_ids"] == ids[: k + 1]  # the stop token stays in output_ids
    assert stop_token["text"] == generator.decode(ids[:k])  # ... but not in the text
    assert stop_str["meta_info"]["finish_reason"]["type"] == "stop"
    assert stop_str["meta_info"]["finish_reason"]["matched"] == stop_text
    assert (
        stop_text not in stop_str["text"]
        and stop_str["output_ids"] == ids[: len(stop_str["output_ids"])]
    )
    # A stop on the last allowed token is a stop, not `length` (SGLang checks stops first).
    last = {**seeded, "max_new_tokens": k + 1}
    token_last, string_last = generator.generate(
        [
            {"input_ids": prompt, "sampling_params": {**last, "stop_token_ids": [ids[k]]}},
            {"input_ids": prompt, "sampling_params": {**last, "stop": [stop_text]}},
        ]
    )
    assert token_last["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert string_last["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_text}


def test_eos_stops_generation_unless_ignore_eos(generator):
    assert (
        generator.tokenizer.eos_token_id in generator.eos_ids
    )  # <|im_end|>, also generation_config's
    prompt = PROMPTS[2]
    greedy = {"max_new_tokens": 5, "temperature": 0}
    [free] = generator.generate(
        [{"input_ids": prompt, "sampling_params": {**greedy, "ignore_eos": True}}]
    )
    token = free["output_ids"][1]
    saved = generator.eos_ids
    generator.eos_ids = frozenset({token})  # pretend the model's eos is the 2nd greedy token
    try:
        stopped, ignored = generator.generate(
            [
                {"input_ids": prompt, "sampling_params": greedy},
                {"input_ids": prompt, "sampling_params": {**greedy, "ignore_eos": True}},
            ]
        )
    finally:
        generator.eos_ids = saved
    end = free["output_ids"].index(token) + 1
    assert stopped["output_ids"] == free["output_ids"][:end]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
    assert ignored["output_ids"] == free["output_ids"]
    assert ignored["meta_info"]["finish_reason"] == {"type": "length", "length": 5}


def test_text_input_and_seeded_reproducibility(generator):
    request = {
        "text": "What is 1 + 2?",
        "sampling_params": {
            "max_new_tokens": 6,
            "temperature": 1.0,
            "sampling_seed": 5,
            "ignore_eos": True,
        },
    }
    a, b = generator.generate([request, request])
    assert a["output_ids"] == b["output_ids"] and a["meta_info"]["prompt_tokens"] == len(
        generator.tokenizer.encode("What is 1 + 2?")
    )
    other = generator.generate(
        [{**request, "sampling_params": {**request["sampling_params"], "sampling_seed": 6}}]
    )[0]
    assert isinstance(other["text"], str)


def test_context_limits_follow_sglang(generator):
    """SGLang's rules (protocol.ContextLimits): 400 when prompt + max_new_tokens > context or
    the prompt reaches max_req_input_len = context - 6; then max_new_tokens is lowered to
    context - 2 - prompt. `generate_ids(context_length=...)` caps max_new_tokens to fit."""
    context = generator.context_length
    greedy = {"temperature": 0, "ignore_eos": True}
    prompt = list(range(10, 10 + context - 8))
    with pytest.raises(RequestError, match="Requested token count exceeds"):
        generator.prepare({"input_ids": prompt, "sampling_params": {"max_new_tokens": 9}})
    [out] = generator.generate(
        [{"input_ids": prompt, "sampling_params": {**greedy, "max_new_tokens": 8}}]
    )
    assert out["meta_info"]["completion_tokens"] == 6  # the scheduler's silent clip
    with pytest.raises(RequestError, match=r"Input length \(58 tokens\) exceeds"):
        generator.prepare({"input_ids": prompt + [1, 2], "sampling_params": {"max_new_tokens": 0}})
    with pytest.raises(RequestError, match=r"The input \(64 tokens\) is longer"):
        generator.prepare({"input_ids": [1] * context, "sampling_params": {"max_new_tokens": 0}})
    # null is "the default" (SGLang); max_new_tokens null is "up to the context".
    nulls = {"temperature": None, "top_k": None, "max_new_tokens": None, "n": None}
    seq = generator.prepare({"input_ids": [5], "sampling_params": nulls})
    assert seq.max_new_tokens == context - 3 and seq.params.temperature == 1.0
    [capped] = generator.generate_ids(
        [prompt], {**greedy, "max_new_tokens": 50}, context_length=context
    )
    assert capped["output_ids"] == out["output_ids"]
    with pytest.raises(PromptTooLongError, match="sequence 1 \\(58 tokens\\)"):
        generator.generate_ids([prompt, prompt + [1, 2]], greedy, context_length=context)


@pytest.mark.parametrize(
    "request_, field",
    [
        ({"input_ids": [1, 999]}, "input_ids[1]"),
        ({"input_ids": [-1]}, "input_ids[0]"),
        ({"input_ids": list(range(65))}, "context length"),
        ({"input_ids": []}, "empty"),
        (
            {"input_ids": [1], "sampling_params": {"max_new_tokens": -1}},
            "sampling_params.max_new_tokens",
        ),
        ({"input_ids": [1], "sampling_params": {"temprature": 1}}, "temprature"),
        ({"input_ids": ["1"]}, "input_ids"),
        ({"input_ids": [1], "text": "x"}, "exactly one"),
        (
            {
                "input_ids": [1, 2],
                "return_logprob": True,
                "logprob_start_len": 2,
                "sampling_params": {"max_new_tokens": 0},
            },
            "logprob_start_len",
        ),
        ({"input_ids": [1], "sampling_params": {"seed": 1}}, "sampling_params.seed"),
        ({"input_ids": [1], "sampling_params": {"top_k": 2**63}}, "top_k must be -1"),
        ({"input_ids": [1], "sampling_params": {"n": 2}}, "sampling_params.n"),
        (
            {"input_ids": [1], "return_logprob": True, "top_logprobs_num": 385},
            "more than the vocabulary",
        ),
        ({"input_ids": [1], "sampling_params": {"stop_token_ids": [384]}}, "stop_token_ids[0]"),
        ({"input_ids": [1], "sampling_params": {"frequency_penalty": 0.5}}, "supports only 0.0"),
    ],
)
def test_bad_requests_name_the_field(generator, request_, field):
    with pytest.raises(RequestError, match=field.replace("[", r"\[").replace("]", r"\]")):
        generator.prepare(request_)


def test_load_weights_swaps_in_place(generator, model_dir, tmp_path):
    other = make_tiny_qwen3(tmp_path / "other", seed=1, max_position_embeddings=64)
    request = {
        "input_ids": PROMPTS[0],
        "return_logprob": True,
        "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 0},
    }
    before = generator.generate([request])[0]["meta_info"]["input_token_logprobs"]
    try:
        generator.load_weights(other)
        after = generator.generate([request])[0]["meta_info"]["input_token_logprobs"]
        assert after[1][0] != pytest.approx(before[1][0])
        info = generator.model_info()  # like SGLang: the path moves, the version only if named
        assert info["model_path"] == str(other) and info["weight_version"] == "default"
        assert "weights_fingerprint" not in info
        wide = make_tiny_qwen3(tmp_path / "wide", hidden_size=48, max_position_embeddings=64)
        with pytest.raises(RequestError, match="shape"):
            generator.load_weights(wide)
        broken = make_tiny_qwen3(tmp_path / "broken", max_position_embeddings=64)
        [weights] = broken.glob("*.safetensors")
        weights.write_bytes(weights.read_bytes()[:1000])
        with pytest.raises(RequestError, match=f"{weights}.*unreadable"):
            generator.load_weights(broken)
        assert generator.generate([request])[0]["meta_info"]["input_token_logprobs"] == after
    finally:
        generator.load_weights(model_dir, weight_version="v2")
    assert generator.weight_version == "v2"
    assert generator.generate([request])[0]["meta_info"]["input_token_logprobs"][1][
        0
    ] == pytest.approx(before[1][0], abs=TOL)


def test_generate_ids_spreads_a_call_seed(generator):
    params = {"max_new_tokens": 5, "temperature": 1.0, "sampling_seed": 3, "ignore_eos": True}
    outputs = generator.generate_ids([[5, 6, 7]] * 4, params, return_logprob=True)
    samples = [tuple(o["output_ids"]) for o in outputs]
    assert len(set(samples)) > 1 and samples == [
        tuple(o["output_ids"]) for o in generator.generate_ids([[5, 6, 7]] * 4, params)
    ]
    assert all(len(o["meta_info"]["output_token_logprobs"]) == 5 for o in outputs)


def test_top_k_top_p_restrict_the_draw(generator, hf_model):
    prompt = PROMPTS[0]
    greedy = generator.generate(
        [
            {
                "input_ids": prompt,
                "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
            }
        ]
    )[0]
    for restrict in ({"top_k": 1}, {"top_p": 1e-6}):
        [out] = generator.generate(
            [
                {
                    "input_ids": prompt,
                    "sampling_params": {
                        "max_new_tokens": 4,
                        "temperature": 1.5,
                        "sampling_seed": 0,
                        "ignore_eos": True,
                        **restrict,
                    },
                }
            ]
        )
        assert out["output_ids"] == greedy["output_ids"]
    with torch.no_grad():
        allowed = set(hf_model(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist())
    draws = generator.generate(
        [
            {
                "input_ids": prompt,
                "sampling_params": {
                    "max_new_tokens": 1,
                    "temperature": 2.0,
                    "top_k": 3,
                    "sampling_seed": s,
                },
            }
            for s in range(40)
        ]
    )
    drawn = {d["output_ids"][0] for d in draws}
    assert drawn <= allowed and len(drawn) > 1
