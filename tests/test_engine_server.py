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
    info = httpx.get(f"{url}/get_model_info").json()
    assert info["model_path"] == str(model_dir) and info["is_generation"] is True
    assert (
        info["vocab_size"] == 384
        and info["context_length"] == 64
        and len(info["weights_fingerprint"]) == 16
    )
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
        ({"input_ids": [[1], [2, -3]]}, "[1] input_ids[1]"),
        ({"input_ids": list(range(1, 66))}, "longer than the model's context length 64"),
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
        ({"input_ids": [1], "bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"input_ids": [1], "sampling_params": {"temprature": 0}}, "sampling_params.temprature"),
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
    fingerprint = httpx.get(f"{url}/get_model_info").json()["weights_fingerprint"]
    other = make_tiny_qwen3(tmp_path / "other", seed=3, max_position_embeddings=64)
    try:
        response = httpx.post(
            f"{url}/update_weights_from_disk", json={"model_path": str(other)}, timeout=60
        )
        assert response.status_code == 200 and response.json()["success"] is True
        after = post(url, body).json()["meta_info"]["input_token_logprobs"]
        assert after[1][0] != pytest.approx(before[1][0])
        info = httpx.get(f"{url}/get_model_info").json()
        assert info["weights_fingerprint"] != fingerprint and info["model_path"] == str(other)
        bad = httpx.post(
            f"{url}/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")}
        )
        assert (
            bad.status_code == 400
            and bad.json()["success"] is False
            and "missing" in bad.json()["message"]
        )
        assert httpx.post(f"{url}/update_weights_from_disk", json={"path": "x"}).status_code == 400
        assert (
            post(url, body).json()["meta_info"]["input_token_logprobs"] == after
        )  # untouched by the failures
    finally:
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
        assert httpx.get(f"{url}/get_model_info").status_code == 401
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
        assert httpx.get(f"{url}/health").status_code == 200
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
