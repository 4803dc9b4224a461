"""The built-in SGLang-protocol server over real HTTP (uvicorn on a free port)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from opd_core.engine.background import BackgroundServer
from opd_core.engine.generation import Generator
from opd_core.engine.server import create_app
from opd_core.hf_utils import make_tiny_qwen3


def wait_ready(url: str, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{url}/health_generate", timeout=30)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(
        tmp_path_factory.mktemp("engine_server") / "model", max_position_embeddings=64
    )


@pytest.fixture(scope="module")
def server(model_dir):
    # A long batch window makes the batching of concurrent requests deterministic to observe.
    app = create_app(str(model_dir), batch_window_ms=100, max_batch_size=8)
    with BackgroundServer(app) as url:
        assert wait_ready(url).status_code == 200
        yield url, app.state.engine


@pytest.fixture(scope="module")
def reference(model_dir):
    return Generator(model_dir)


def post(url, body, **kwargs):
    return httpx.post(f"{url}/generate", json=body, timeout=60, **kwargs)


def test_health_endpoints_and_model_info(server, model_dir):
    url, _ = server
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/health_generate").status_code == 200
    info = httpx.get(f"{url}/model_info").json()
    assert httpx.get(f"{url}/get_model_info").json() == info  # SGLang's deprecated alias
    assert info["model_path"] == str(model_dir) and info["is_generation"] is True
    # SGLang's keys: no weights fingerprint, no context length, version "default".
    assert info["weight_version"] == "default" and info["architectures"] == ["Qwen3ForCausalLM"]
    assert "weights_fingerprint" not in info and "context_length" not in info
    server_info = httpx.get(f"{url}/server_info").json()
    assert httpx.get(f"{url}/get_server_info").json()["max_req_input_len"] == 58
    assert server_info["context_length"] is None  # as SGLang: only --context-length sets it
    response = httpx.post(f"{url}/flush_cache")
    assert response.status_code == 200 and "flushed" in response.text.lower()


def test_generate_single_matches_in_process_generator(server, reference):
    url, _ = server
    body = {
        "input_ids": [5, 6, 7, 8],
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 2,
        "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
    }
    got = post(url, body).json()
    [expected] = reference.generate([{k: v for k, v in body.items()}])
    assert got["output_ids"] == expected["output_ids"] and got["text"] == expected["text"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        a, b = got["meta_info"][key], expected["meta_info"][key]
        assert [e[1] for e in a] == [e[1] for e in b]
        assert max(abs((x[0] or 0) - (y[0] or 0)) for x, y in zip(a, b)) <= 1e-4
    assert got["meta_info"]["input_token_logprobs"][0] == [None, 5, None]
    assert got["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert (
        len(got["meta_info"]["output_top_logprobs"]) == 4
        and got["meta_info"]["input_top_logprobs"][0] is None
    )


def test_generate_batch_and_text(server, reference):
    url, _ = server
    body = {
        "input_ids": [[5, 6, 7], [9, 10]],
        "return_logprob": [True, False],
        "sampling_params": [
            {"max_new_tokens": 0},
            {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
        ],
    }
    first, second = post(url, body).json()
    assert first["output_ids"] == [] and first["meta_info"]["input_token_logprobs"] == [
        [None, 7, None]
    ]
    assert len(second["output_ids"]) == 2 and "output_token_logprobs" not in second["meta_info"]
    text_out = post(
        url,
        {
            "text": "What is 2 + 2?",
            "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True},
        },
    ).json()
    assert text_out["meta_info"]["prompt_tokens"] == len(
        reference.tokenizer.encode("What is 2 + 2?")
    )
    assert text_out["text"] == reference.decode(text_out["output_ids"])


def sse_events(response: httpx.Response) -> list:
    events = [
        line.removeprefix("data: ")
        for line in response.text.split("\n\n")
        if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stream(server):
    url, _ = server
    response = post(
        url,
        {
            "input_ids": [5, 6, 7],
            "stream": True,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
        },
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert [len(e["output_ids"]) for e in events] == [1, 2, 3, 4]  # one chunk per token
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert (
        events[-1]["output_ids"]
        == post(
            url,
            {
                "input_ids": [5, 6, 7],
                "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
            },
        ).json()["output_ids"]
    )
    batch = sse_events(
        post(
            url,
            {
                "input_ids": [[5], [6]],
                "stream": True,
                "sampling_params": {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True},
            },
        )
    )
    finals = [e for e in batch if e["meta_info"]["finish_reason"] is not None]
    assert sorted(e["index"] for e in finals) == [0, 1]


def test_concurrent_requests_share_one_forward(server):
    url, engine = server
    real_generate, calls, active, overlap = engine.generator.generate, [], [0], [0]
    lock = threading.Lock()

    def spy(seqs, on_step=None):  # the real generate, recording batch sizes and overlap
        with lock:
            active[0] += 1
            overlap[0] = max(overlap[0], active[0])
        calls.append(len(seqs))
        try:
            return real_generate(seqs, on_step)
        finally:
            with lock:
                active[0] -= 1

    engine.generator.generate = spy
    try:
        body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: post(url, body), range(12)))
    finally:
        engine.generator.generate = real_generate
    assert all(r.status_code == 200 for r in results)
    assert len({tuple(r.json()["output_ids"]) for r in results}) == 1
    assert sum(calls) == 12 and len(calls) < 12 and max(calls) > 1  # batched ...
    assert max(calls) <= 8  # ... never above max_batch_size
    assert overlap[0] == 1  # and never two forwards at once


@pytest.mark.parametrize(
    "body, field",
    [
        ({"input_ids": [1, 400]}, "input_ids[1]: token id 400 is outside the vocabulary"),
        (
            {"input_ids": [[1], [2, -3]], "sampling_params": {"max_new_tokens": 1}},
            "[1] input_ids[1]",
        ),
        (
            {"input_ids": list(range(1, 66))},
            "The input (65 tokens) is longer than the model's context length (64 tokens)",
        ),
        ({"input_ids": [1, 2]}, "Requested token count exceeds"),  # default max_new_tokens 128
        (
            {"input_ids": list(range(1, 59)), "sampling_params": {"max_new_tokens": 0}},
            "Input length (58 tokens) exceeds the maximum allowed length (58 tokens)",
        ),
        (
            {"input_ids": [1], "sampling_params": {"max_new_tokens": -1}},
            "sampling_params.max_new_tokens",
        ),
        (
            {"input_ids": [1], "sampling_params": {"max_new_tokens": "3"}},
            "sampling_params.max_new_tokens",
        ),
        ({"input_ids": "1 2 3"}, "input_ids"),
        ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
        ({"input_ids": [1], "sampling_params": {"temprature": 0}}, "sampling_params.temprature"),
        (
            {"input_ids": [1], "sampling_params": {"seed": 1}},
            "sampling_params.seed",
        ),  # not SGLang's
        ({"input_ids": [1], "return_hidden_states": True}, "return_hidden_states: not supported"),
        (
            {"input_ids": [[1]], "return_logprob": [True], "sampling_params": {"n": 2}},
            "return_logprob: Cannot use a list with n > 1",
        ),
        ({"input_ids": [[1], [2]], "rid": ["a", "a"]}, "rid: duplicate request ids"),
        (
            {"input_ids": [[1], [2]], "sampling_params": [{}]},
            "sampling_params: has 1 entries but the batch has 2",
        ),
        (
            {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5},
            "logprob_start_len",
        ),
        ({"text": "a", "input_ids": [1]}, "exactly one"),
        ({}, "exactly one"),
        ([1, 2, 3], "body"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, body, field):
    url, _ = server
    response = post(url, body)
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]


def test_unknown_top_level_fields_are_ignored_as_in_sglang(server):
    """What sglang-router adds to every request it forwards."""
    url, _ = server
    greedy = {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}
    plain = post(url, {"input_ids": [5, 6], "sampling_params": greedy}).json()
    router_fields = {
        "model": None,
        "log_metrics": True,
        "return_hidden_states": False,
        "background": False,
        "no_logs": False,
        "return_bytes": False,
        "return_entropy": False,
        "some_future_field": {"x": 1},
    }
    routed = post(url, {"input_ids": [5, 6], "sampling_params": greedy, **router_fields})
    assert routed.status_code == 200 and routed.json()["output_ids"] == plain["output_ids"]


def test_invalid_json_then_server_still_serves(server):
    url, _ = server
    response = httpx.post(
        f"{url}/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert (
        post(url, {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}).status_code == 200
    )


def test_update_weights_from_disk(server, model_dir, tmp_path):
    url, _ = server
    body = {
        "input_ids": [5, 6, 7],
        "return_logprob": True,
        "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 0},
    }
    before = post(url, body).json()["meta_info"]["input_token_logprobs"]
    other = make_tiny_qwen3(tmp_path / "other", seed=3, max_position_embeddings=64)
    broken = make_tiny_qwen3(tmp_path / "broken", seed=4, max_position_embeddings=64)
    [weights] = broken.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # One keep-alive connection for everything: a failed update must not reset it.
    http = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1))
    try:
        response = http.post("/update_weights_from_disk", json={"model_path": str(other)})
        assert response.status_code == 200 and response.json()["success"] is True
        after = http.post("/generate", json=body).json()["meta_info"]["input_token_logprobs"]
        assert after[1][0] != pytest.approx(before[1][0])
        info = http.get("/model_info").json()
        assert info["model_path"] == str(other) and info["weight_version"] == "default"
        for bad_path, named in ((tmp_path / "missing", "missing"), (broken, str(weights))):
            bad = http.post("/update_weights_from_disk", json={"model_path": str(bad_path)})
            assert bad.status_code == 400 and bad.json()["success"] is False, bad.text
            assert named in bad.json()["message"]
        assert http.post("/update_weights_from_disk", json={"path": "x"}).status_code == 400
        # untouched by the failures, on the same connection
        assert (
            http.post("/generate", json=body).json()["meta_info"]["input_token_logprobs"] == after
        )
        response = http.post(
            "/update_weights_from_disk", json={"model_path": str(model_dir), "weight_version": "r1"}
        )
        assert response.json()["success"] is True
        assert http.get("/model_info").json()["weight_version"] == "r1"
        version = http.post("/update_weight_version", json={"new_version": "default"})
        assert version.json() == {
            "success": True,
            "message": "Weight version updated to default",
            "new_version": "default",
        }
    finally:
        http.close()
        httpx.post(
            f"{url}/update_weights_from_disk", json={"model_path": str(model_dir)}, timeout=60
        )
    assert post(url, body).json()["meta_info"]["input_token_logprobs"][1][0] == pytest.approx(
        before[1][0], abs=1e-5
    )


def test_api_key(model_dir):
    with BackgroundServer(create_app(str(model_dir), api_key="sekret")) as url:
        assert wait_ready(url).status_code == 200  # /health* stays open, as in SGLang
        body = {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}
        assert post(url, body).status_code == 401
        assert post(url, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/model_info").status_code == 401
        assert post(url, body, headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_unloadable_model_reports_503_not_crash(tmp_path):
    (tmp_path / "broken").mkdir()
    with BackgroundServer(create_app(str(tmp_path / "broken"))) as url:
        deadline = time.monotonic() + 30
        while (
            "failed to load" not in (response := httpx.get(f"{url}/health_generate")).text
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert (
            response.status_code == 503 and "failed to load" in response.json()["error"]["message"]
        )
        assert httpx.get(f"{url}/health").status_code == 503  # like SGLang: as /health_generate
        assert post(url, {"input_ids": [1]}).status_code == 503


def test_client_that_disconnects_does_not_hurt_others(server):
    url, _ = server
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(
            f"{url}/generate",
            json={
                **body,
                "sampling_params": {"max_new_tokens": 60, "temperature": 0, "ignore_eos": True},
            },
            timeout=0.05,
        )
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: post(url, body), range(4)))
    assert [r.status_code for r in results] == [200] * 4
    assert post(url, {"input_ids": [1], "sampling_params": {"top_k": 0}}).status_code == 400
