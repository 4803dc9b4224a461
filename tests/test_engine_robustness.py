"""The built-in server against one client's bad behaviour (issue 14 item 2), and the SGLang
behaviours that go with it (n, /flush_cache, the OpenAPI schema), over real HTTP."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from opd_core.engine.background import BackgroundServer
from opd_core.engine.server import create_app
from opd_core.hf_utils import make_tiny_qwen3

GREEDY = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("robust") / "model", max_position_embeddings=64)


@pytest.fixture(scope="module")
def served(model_dir):
    app = create_app(
        str(model_dir), deterministic=True, max_body_bytes=100_000, max_text_chars=2_000_000
    )
    with BackgroundServer(app) as url:
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        yield url, app.state.engine


def post(url: str, body, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=timeout)


class ComputeGate:
    """Holds the engine's one compute thread busy until released: requests queue up."""

    def __init__(self, engine):
        self.release, self.started = threading.Event(), threading.Event()
        engine.executor.submit(self._hold)
        assert self.started.wait(10)

    def _hold(self) -> None:
        self.started.set()
        self.release.wait(60)


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_body_limit_content_type_and_text_limit(served):
    url, _ = served
    http = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=1))
    big = b'{"input_ids": [' + b"1," * 60_000 + b"1]}"
    response = http.post(
        f"{url}/generate", content=big, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "100000" in response.json()["error"]["message"]
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        response = http.post(f"{url}/generate", content=b'{"input_ids": [1]}', headers=headers)
        assert response.status_code == 415, response.text
    response = http.post(f"{url}/generate", json={"text": "a" * 2_000_001})
    assert response.status_code == 413  # over the body limit before the text limit
    # The same keep-alive connection still serves.
    assert http.post(
        f"{url}/generate", json={"input_ids": [5], "sampling_params": GREEDY}
    ).is_success
    http.close()


def test_text_limit_and_tokenization_off_the_event_loop(model_dir):
    """A huge text is tokenized on the tokenizer thread without the GIL: /health answers
    while it is being tokenized (with the old in-loop tokenize it waited for the end)."""
    app = create_app(str(model_dir), max_body_bytes=64 << 20, max_text_chars=3_000_000)
    with BackgroundServer(app) as url:
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        too_long = post(url, {"text": "a" * 3_000_001})
        assert too_long.status_code == 400 and "--max-text-chars" in too_long.text
        generator = app.state.engine.generator
        started, finished = threading.Event(), threading.Event()
        encode = generator.encode_texts

        def watched(texts):
            started.set()
            try:
                return encode(texts)
            finally:
                finished.set()

        generator.encode_texts = watched
        try:
            with ThreadPoolExecutor(1) as pool:
                big = pool.submit(post, url, {"text": "What is 12 + 34? " * 60_000})
                assert started.wait(30)
                answered_meanwhile = 0  # /health answers that came back before it finished
                with httpx.Client(base_url=url, timeout=60) as http:
                    while not finished.is_set():
                        ok = http.get("/health").status_code == 200
                        answered_meanwhile += ok and not finished.is_set()
                result = big.result()
        finally:
            generator.encode_texts = encode
    # Several, not one: a tokenizer that held the GIL would let through at most a stray one.
    assert answered_meanwhile >= 3
    assert result.status_code == 400 and "longer than the model's context length" in result.text


def test_abandoned_requests_are_not_computed(served):
    url, engine = served
    generator = engine.generator
    computed = []
    real_generate = generator.generate

    def spy(seqs, on_step=None):
        computed.extend(s.rid for s in seqs)
        return real_generate(seqs, on_step)

    generator.generate = spy
    dropped_before = engine.dropped
    try:
        gate = ComputeGate(engine)
        body = {"input_ids": [5, 6], "sampling_params": {**GREEDY, "max_new_tokens": 30}}

        def abandon(i: int) -> None:
            with pytest.raises(httpx.TimeoutException):
                post(url, {**body, "rid": f"gone-{i}"}, timeout=0.3)

        with ThreadPoolExecutor(10) as pool:
            list(pool.map(abandon, range(20)))
        time.sleep(0.3)  # the server sees the 20 disconnects while the compute thread is held
        gate.release.set()
        wait_for(lambda: engine.in_flight == 0)
        assert post(url, {**body, "rid": "kept"}).status_code == 200
    finally:
        generator.generate = real_generate
    assert not [rid for rid in computed if rid.startswith("gone-")]
    assert "kept" in computed and engine.dropped - dropped_before == 20


def test_a_failing_request_fails_alone(served):
    """A batch that raises is rerun one request at a time: the valid requests batched with
    the failing one get exactly their answers from when they run alone."""
    url, engine = served
    generator = engine.generator
    prompts = [[5, 6, 7], [9, 10], [20], [30, 31, 32]]
    alone = [post(url, {"input_ids": p, "sampling_params": GREEDY}).json() for p in prompts]
    real_generate = generator.generate

    def poisoned(seqs, on_step=None):  # a sequence the engine cannot run (a fault injected)
        if any(s.rid == "poison" for s in seqs):
            raise RuntimeError("this sequence breaks the forward")
        return real_generate(seqs, on_step)

    generator.generate = poisoned
    try:
        gate = ComputeGate(engine)  # so that all five requests land in one batch
        with ThreadPoolExecutor(5) as pool:
            futures = [
                pool.submit(post, url, {"input_ids": p, "sampling_params": GREEDY}) for p in prompts
            ]
            bad = pool.submit(
                post, url, {"input_ids": [1, 2], "sampling_params": GREEDY, "rid": "poison"}
            )
            wait_for(lambda: engine.in_flight >= 5)
            gate.release.set()
            results = [f.result() for f in futures]
            bad = bad.result()
    finally:
        generator.generate = real_generate
    assert bad.status_code == 500 and "breaks the forward" in bad.text
    assert [r.status_code for r in results] == [200] * 4
    assert [r.json()["output_ids"] for r in results] == [a["output_ids"] for a in alone]


def test_flush_cache_refuses_while_requests_are_in_flight(served):
    url, engine = served
    gate = ComputeGate(engine)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, {"input_ids": [5], "sampling_params": GREEDY})
        wait_for(lambda: engine.in_flight > 0)
        busy = httpx.post(f"{url}/flush_cache")
        gate.release.set()
        assert pending.result().status_code == 200
    assert busy.status_code == 400 and busy.text == "Flush cache failed.\n"  # SGLang's answer
    wait_for(lambda: engine.in_flight == 0)
    assert httpx.get(f"{url}/flush_cache").status_code == 200


def test_n_samples_are_a_flat_prompt_major_list(served):
    url, _ = served
    sampled = {"max_new_tokens": 5, "temperature": 1.0, "ignore_eos": True}
    one = post(url, {"input_ids": [5, 6], "sampling_params": {**sampled, "n": 3}}).json()
    assert isinstance(one, list) and len(one) == 3  # a single prompt with n > 1 is a list
    # Deterministic server, no seed: SGLang seeds each with 42, so the 3 samples are equal.
    assert len({tuple(o["output_ids"]) for o in one}) == 1
    batch = post(
        url,
        {
            "input_ids": [[5, 6], [7]],
            "sampling_params": {**sampled, "n": 2, "sampling_seed": 3},
            "return_logprob": True,
        },
    ).json()
    assert [o["meta_info"]["prompt_tokens"] for o in batch] == [2, 2, 1, 1]  # prompt-major
    assert len({o["meta_info"]["id"] for o in batch}) == 4
    different = post(
        url, {"input_ids": [[5, 6], [7]], "sampling_params": [{**sampled, "n": 2}, {"n": 3}]}
    )
    assert different.status_code == 400 and "n must be the same" in different.text


def test_openapi_documents_the_request_bodies(served):
    url, _ = served
    schema = httpx.get(f"{url}/openapi.json").json()
    generate = schema["paths"]["/generate"]["post"]
    ref = generate["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/GenerateRequest"
    components = schema["components"]["schemas"]
    assert "top_k" in components["SamplingParams"]["properties"]
    assert {"413", "415", "400"} <= set(generate["responses"])
    update = schema["paths"]["/update_weights_from_disk"]["post"]["requestBody"]
    assert components["UpdateWeightsRequest"]["required"] == ["model_path"]
    assert update["content"]["application/json"]["schema"]["$ref"].endswith("UpdateWeightsRequest")
