"""EngineClient against real built-in servers over HTTP: scoring, batching, failover, retries,
cache."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from transformers import AutoModelForCausalLM

from opd_core.config import ClientConfig
from opd_core.engine.background import BackgroundServer
from opd_core.engine.client import EngineClient, EngineError, EngineRequestError, scores_to_table
from opd_core.engine.logprob_cache import model_namespace
from opd_core.engine.protocol import ContextLimits, PromptTooLongError
from opd_core.engine.server import create_app
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.schemas import TEACHER_LOGPROBS

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16]]
RESPONSES = [[20, 21, 22], [23], [], [24, 25, 26, 27], [28, 2]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(
        tmp_path_factory.mktemp("engine_client") / "model", max_position_embeddings=64
    )


@pytest.fixture(scope="module")
def url(model_dir):
    with BackgroundServer(create_app(str(model_dir))) as url:
        EngineClient(url).wait_until_healthy(60)
        yield url


def counting(client: EngineClient) -> list[str]:
    """Every HTTP request the client sends, seen by an httpx event hook."""
    sent: list[str] = []
    client.http.event_hooks["request"].append(
        lambda request: sent.append(f"{request.method} {request.url}")
    )
    return sent


def dead_url() -> str:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_score_matches_direct_forward_and_zero_length(url, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with EngineClient(url, batch_size=2) as client:
        sent = counting(client)
        bodies = []
        client.http.event_hooks["request"].append(lambda r: bodies.append(json.loads(r.content)))
        scores = client.score(PROMPTS, RESPONSES)
    assert len(sent) == 2  # 4 non-empty sequences, 2 per batch request; the empty one is not sent
    # Log-probs only from the last prompt token on: batched by prompt length (1, 2 | 2, 4
    # tokens), each request from its shortest prompt's last token.
    assert sorted(body["logprob_start_len"] for body in bodies) == [0, 1]
    for prompt, response, got in zip(PROMPTS, RESPONSES, scores):
        assert got.dtype == np.float32 and got.shape == (len(response),)
        if not response:
            continue
        ids = prompt + response
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        expected = [logprobs[len(prompt) + j - 1, t].item() for j, t in enumerate(response)]
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_generate_batches_and_keeps_order(url):
    params = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
    with EngineClient(url, batch_size=2, max_concurrency=3) as client:
        sent = counting(client)
        outputs = client.generate(PROMPTS, params, return_logprob=True, progress="gen")
        singles = [client.generate([p], params)[0] for p in PROMPTS]
    assert len(sent) == 3 + len(PROMPTS)
    assert [o["output_ids"] for o in outputs] == [o["output_ids"] for o in singles]
    assert all(len(o["meta_info"]["output_token_logprobs"]) == 3 for o in outputs)
    with EngineClient(url) as client:
        per_sequence = client.generate(PROMPTS[:2], [{"max_new_tokens": 1}, {"max_new_tokens": 2}])
    assert [len(o["output_ids"]) for o in per_sequence] == [1, 2]


def test_cache_second_score_sends_no_request(url, model_dir, tmp_path):
    with EngineClient(url, cache_dir=str(tmp_path)) as client:
        sent = counting(client)
        first = client.score(PROMPTS, RESPONSES)
        assert any("/generate" in s for s in sent)
        sent.clear()
        second = client.score(PROMPTS, RESPONSES)
        assert sent == []  # answered from the cache
    with EngineClient(url, cache_dir=str(tmp_path)) as rerun:  # a rerun of the stage: a new client
        sent = counting(rerun)
        third = rerun.score(PROMPTS, RESPONSES)
        assert [s for s in sent if "/generate" in s] == []
    for a, b, c in zip(first, second, third):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # New teacher weights -> a new fingerprint -> the cache does not answer.
    other = make_tiny_qwen3(tmp_path / "other", seed=5, max_position_embeddings=64)
    with EngineClient(url, cache_dir=str(tmp_path)) as client:
        client.update_weights_from_disk(str(other))
        try:
            sent = counting(client)
            changed = client.score(PROMPTS, RESPONSES)
            assert any("/generate" in s for s in sent)
            assert not np.allclose(changed[0], first[0])
        finally:
            client.update_weights_from_disk(str(model_dir))


def test_failover_to_the_live_url(url):
    dead = dead_url()
    with EngineClient([dead, url], batch_size=1, backoff_initial=0.01) as client:
        sent = counting(client)
        scores = client.score(PROMPTS, RESPONSES)
        assert client.health() == {dead: False, url: True}
        assert client.wait_until_healthy(5) == [url]
    assert [len(s) for s in scores] == [len(r) for r in RESPONSES]
    # The dead URL is tried once, then put last for a cool-down; every batch succeeds.
    assert sum(dead in s for s in sent if "/generate" in s) <= 2
    with EngineClient(f"{dead},{url}") as client:  # comma-separated, as in teacher.url
        assert client.model_info()["is_generation"] is True


class Flaky:
    """A real HTTP proxy in front of the server that fails its first `failures` requests."""

    def __init__(self, target: str, failures: int, mode: str = "503"):
        self.target, self.failures, self.mode, self.seen = target, failures, mode, 0
        self.app = FastAPI()

        @self.app.api_route("/{path:path}", methods=["GET", "POST"])
        async def proxy(path: str, request: Request):
            self.seen += 1
            if self.seen <= self.failures:
                if self.mode == "hang":  # longer than the client's timeout
                    await asyncio.sleep(2)
                if self.mode == "garbage":
                    return JSONResponse({"not": "a list"})
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
            async with httpx.AsyncClient() as http:
                response = await http.request(
                    request.method,
                    f"{self.target}/{path}",
                    content=await request.body(),
                    headers={"content-type": "application/json"},
                )
            return JSONResponse(response.json(), status_code=response.status_code)


@pytest.mark.parametrize("mode", ["503", "garbage"])
def test_retries_on_5xx_and_malformed_answers(url, mode):
    flaky = Flaky(url, failures=2, mode=mode)
    with (
        BackgroundServer(flaky.app) as proxy_url,
        EngineClient(proxy_url, backoff_initial=0.01, max_retries=3) as client,
    ):
        scores = client.score(PROMPTS[:2], RESPONSES[:2])
    assert flaky.seen == 3 and [len(s) for s in scores] == [3, 1]


def test_gives_up_after_max_retries_and_never_retries_4xx(url):
    flaky = Flaky(url, failures=100)
    with (
        BackgroundServer(flaky.app) as proxy_url,
        EngineClient(proxy_url, backoff_initial=0.01, max_retries=2) as client,
        pytest.raises(EngineError, match="failed after 3 attempts.*overloaded"),
    ):
        client.generate([[1]], {"max_new_tokens": 1})
    assert flaky.seen == 3
    with EngineClient(url) as client:
        sent = counting(client)
        with pytest.raises(EngineRequestError, match="outside the vocabulary") as err:
            client.generate([[1, 9999]], {"max_new_tokens": 1})
        assert err.value.status_code == 400 and len(sent) == 1


def test_a_server_that_hangs_times_out_then_fails_over(url):
    hanging = Flaky(url, failures=100, mode="hang")
    with BackgroundServer(hanging.app) as hanging_url:
        with EngineClient(
            [hanging_url, url], timeout=0.2, batch_size=2, backoff_initial=0.01
        ) as client:
            started = time.monotonic()
            scores = client.score(PROMPTS, RESPONSES)
            assert [len(s) for s in scores] == [len(r) for r in RESPONSES]
            # One request waited out the timeout on the hanging URL; the rest went to the live one.
            assert hanging.seen <= 2 and time.monotonic() - started < 1.5
        with (
            EngineClient(hanging_url, timeout=0.2, max_retries=1, backoff_initial=0.01) as client,
            pytest.raises(EngineError, match="failed after 2 attempts.*Timeout"),
        ):
            client.generate([[1]], {"max_new_tokens": 1})


def test_api_key_and_from_config(model_dir, tmp_path):
    with BackgroundServer(create_app(str(model_dir), api_key="k1")) as secured:
        with EngineClient(secured) as anonymous:
            anonymous.wait_until_healthy(60)
            with pytest.raises(EngineRequestError) as err:
                anonymous.score([[1]], [[2]])
            assert err.value.status_code == 401
        cfg = ClientConfig(
            timeout=30, max_concurrency=2, batch_size=4, max_retries=1, cache_dir=str(tmp_path)
        )
        with EngineClient.from_config(secured, cfg, api_key="k1") as client:
            assert client.batch_size == 4 and client.cache is not None
            assert client.score([[1]], [[2]])[0].shape == (1,)
            client.flush_cache()


def test_wait_until_healthy_times_out_on_dead_url():
    with (
        EngineClient(dead_url()) as client,
        pytest.raises(TimeoutError, match="no engine became healthy"),
    ):
        client.wait_until_healthy(timeout=0.5, poll=0.1)


def test_scores_to_table():
    table = scores_to_table(
        [0, 0, 1], [0, 1, 0], [np.array([-1.0, -2.0]), np.zeros(0), np.array([-0.5])]
    )
    assert table.schema == TEACHER_LOGPROBS
    assert table.column("teacher_logprobs").to_pylist() == [[-1.0, -2.0], [], [-0.5]]
    assert table.column("teacher_logprobs").type == pa.list_(pa.float32())
    with pytest.raises(ValueError, match="differ in length"):
        scores_to_table([0], [0, 1], [np.zeros(1)])


def test_call_seed_gives_distinct_reproducible_samples(url, model_dir):
    """Seeds count only on a server started with --enable-deterministic-inference, as in
    SGLang; `seed` is the client's alias of SGLang's `sampling_seed`."""
    params = {"max_new_tokens": 6, "temperature": 1.0, "seed": 1234, "ignore_eos": True}

    def samples(client, params):
        return [tuple(o["output_ids"]) for o in client.generate([[5, 6, 7]] * 6, params)]

    with (
        BackgroundServer(create_app(str(model_dir), deterministic=True)) as seeded_url,
        EngineClient(seeded_url, batch_size=3) as client,
    ):
        client.wait_until_healthy(60)
        first, again = samples(client, params), samples(client, params)
        other = samples(client, {**params, "seed": 99})
        unseeded = {k: v for k, v in params.items() if k != "seed"}
        # SGLang seeds every unseeded request with 42 under the flag: n identical samples.
        assert samples(client, unseeded) == [samples(client, {**unseeded, "seed": 42})[0]] * 6
    assert first == again  # reproducible
    assert len(set(first)) > 1  # n samples of one prompt are not copies of each other
    assert first != other
    with EngineClient(url, batch_size=3) as client:  # without the flag: seeds are ignored
        assert samples(client, params) != samples(client, params)


def test_opening_clients_freezes_long_lived_objects_once(url, monkeypatch):
    """Decoding log-prob responses must not rescan the process's old objects (gc_freeze.py):
    the first client of a process collects and freezes, later ones leave the GC alone."""
    import gc

    from opd_core.engine import gc_freeze

    assert gc.get_freeze_count() > 0  # frozen for real when this module's server and client started
    calls: list[str] = []
    monkeypatch.setattr(gc_freeze, "_frozen", False)
    monkeypatch.setattr(gc_freeze.gc, "collect", lambda *args: calls.append("collect") or 0)
    monkeypatch.setattr(gc_freeze.gc, "freeze", lambda: calls.append("freeze"))
    for _ in range(2):
        with EngineClient(url):
            pass
    assert calls == ["collect", "freeze"]


def test_generate_caps_max_new_tokens_to_the_context(url, model_dir):
    """SGLang answers 400 when prompt + max_new_tokens > context: with `context_length` the
    client lowers max_new_tokens per sequence, and names prompts that cannot fit at all."""
    long_prompt, short_prompt = list(range(10, 60)), [5, 6]
    params = {"max_new_tokens": 30, "temperature": 0, "ignore_eos": True}
    with EngineClient(url) as client:
        with pytest.raises(EngineRequestError, match="Requested token count exceeds"):
            client.generate([long_prompt], params)
        long_out, short_out = client.generate(
            [long_prompt, short_prompt], params, context_length=64
        )
        # 64 - 50 = 14 asked; SGLang's scheduler then generates at most 64 - 2 - 50 = 12.
        assert long_out["meta_info"]["completion_tokens"] == 12
        assert short_out["meta_info"]["completion_tokens"] == 30
        with pytest.raises(PromptTooLongError, match=r"sequence 1 \(58 tokens\)"):
            client.generate([short_prompt, list(range(1, 59))], params, context_length=64)
    # A server that reports its limits (/server_info) overrides the caller's guess.
    with (
        BackgroundServer(create_app(str(model_dir), context_length=32)) as small,
        EngineClient(small) as client,
    ):
        client.wait_until_healthy(60)
        assert client.context_limits(64) == ContextLimits(32, 26)
        with pytest.raises(PromptTooLongError, match="context length 32"):
            client.generate([list(range(1, 30))], params, context_length=64)


class RenamedModel:
    """A real HTTP proxy whose /model_info reports a hub id, as an SGLang server started with
    `--model-path Qwen/...` does: nothing this client can hash."""

    def __init__(self, target: str):
        self.app = FastAPI()

        @self.app.api_route("/{path:path}", methods=["GET", "POST"])
        async def proxy(path: str, request: Request):
            async with httpx.AsyncClient(timeout=60) as http:
                response = await http.request(
                    request.method,
                    f"{target}/{path}",
                    content=await request.body(),
                    headers={"content-type": "application/json"},
                )
            answer = response.json()
            if path in ("model_info", "get_model_info"):
                answer["model_path"] = "Qwen/Qwen3-8B"
            return JSONResponse(answer, status_code=response.status_code)


def test_cache_namespace_is_the_weights_content_or_nothing(url, model_dir, tmp_path, caplog):
    import shutil

    copy = shutil.copytree(model_dir, tmp_path / "copy")
    with EngineClient(url, cache_dir=str(tmp_path / "c")) as client:
        namespace = client.cache_namespace()
        assert namespace == f"{model_namespace(model_dir)}|default"
        first = client.score(PROMPTS, RESPONSES)
    # Same weights under another path (a copied run directory): the same namespace, hits.
    with BackgroundServer(create_app(str(copy))) as copy_url:
        with EngineClient(copy_url, cache_dir=str(tmp_path / "c")) as client:
            client.wait_until_healthy(60)
            assert client.cache_namespace() == namespace
            sent = counting(client)
            again = client.score(PROMPTS, RESPONSES)
            assert not [s for s in sent if "/generate" in s]
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
        # A server whose model_path is a hub id: no safe namespace, so no cache at all.
        renamed = RenamedModel(copy_url)
        with (
            BackgroundServer(renamed.app) as proxy_url,
            EngineClient(proxy_url, cache_dir=str(tmp_path / "c")) as client,
        ):
            assert client.cache_namespace() is None
            assert "teacher-logprob cache off" in caplog.text
            sent = counting(client)
            client.score(PROMPTS, RESPONSES)
            assert [s for s in sent if "/generate" in s]  # scored, not answered from the cache
            explicit = EngineClient(proxy_url, cache_dir=str(tmp_path / "c"), cache_namespace="t1")
            with explicit:
                assert explicit.cache_namespace() == "t1|default"


def test_each_batch_reaches_on_batch_once_when_resent_after_recover(url):
    """A batch that failed on every URL and was resent after `recover` reaches `on_batch`
    once (what streamed scoring relies on); every answered request is in request_spans."""
    flaky = Flaky(url, failures=2)  # the first two batch requests fail
    recovered: list[str] = []
    delivered: list[tuple[int, int]] = []
    params = {"max_new_tokens": 3, "temperature": 0}
    with (
        BackgroundServer(flaky.app) as proxy_url,
        EngineClient(
            proxy_url,
            batch_size=2,
            max_retries=0,
            recover=lambda err: recovered.append(str(err)) or True,
        ) as client,
    ):
        outputs = client.generate(
            PROMPTS, params, on_batch=lambda start, out: delivered.append((start, len(out)))
        )
        spans = client.request_spans()
    with EngineClient(url) as direct:
        expected = direct.generate(PROMPTS, params)
    assert len(recovered) == 2 and flaky.seen == 5  # 3 batches, 2 of them sent twice
    assert sorted(delivered) == [(0, 2), (2, 2), (4, 1)]  # each batch once
    assert [o["output_ids"] for o in outputs] == [e["output_ids"] for e in expected]
    assert len(spans) == 3 and all(u == proxy_url and s <= e for u, s, e in spans)
