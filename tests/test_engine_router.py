"""Two built-in engines behind a real sglang-router (a Rust binary, started as a process)."""

from __future__ import annotations

import httpx
import pytest

from opd_core.engine.background import BackgroundServer
from opd_core.engine.client import EngineClient
from opd_core.engine.router import launch_router
from opd_core.engine.server import create_app
from opd_core.hf_utils import make_tiny_qwen3

GREEDY = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("router")
    model = make_tiny_qwen3(root / "model", max_position_embeddings=64)
    apps = [create_app(str(model)) for _ in range(2)]
    servers = [BackgroundServer(app) for app in apps]
    urls = [server.start() for server in servers]
    try:
        for url in urls:
            assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        with launch_router(urls, policy="round_robin", log_path=root / "router.log") as router:
            yield router, [app.state.engine for app in apps], model, root
    finally:
        for server in servers:
            server.stop()


def test_generate_through_the_router_reaches_both_engines(cluster):
    router, engines, _, _ = cluster
    before = [engine.requests_served for engine in engines]
    direct = httpx.post(
        f"{router.worker_urls[0]}/generate",
        json={"input_ids": [5, 6, 7], "sampling_params": GREEDY},
        timeout=60,
    ).json()
    with httpx.Client(base_url=router.url, timeout=60) as http:
        singles = [
            http.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY})
            for _ in range(6)
        ]
        batch = http.post(
            "/generate", json={"input_ids": [[5, 6, 7], [9]], "sampling_params": GREEDY}
        )
    # The router adds `model`, `log_metrics`, `return_hidden_states`, ... : no 400.
    assert [r.status_code for r in singles] == [200] * 6, singles[0].text
    assert all(r.json()["output_ids"] == direct["output_ids"] for r in singles)
    assert batch.status_code == 200 and len(batch.json()) == 2
    served = [engine.requests_served - b for engine, b in zip(engines, before)]
    assert all(count >= 2 for count in served), served  # round robin: both got a share


def test_client_through_the_router_updates_every_engine(cluster, tmp_path):
    router, engines, model, _ = cluster
    other = make_tiny_qwen3(tmp_path / "other", seed=3, max_position_embeddings=64)
    with EngineClient(router.url, engine_urls=router.worker_urls) as client:
        [scores] = client.score([[5, 6]], [[7, 8]])
        assert scores.shape == (2,)
        # sglang-router does not route weight updates: the client sends one to each engine.
        not_routed = httpx.post(
            f"{router.url}/update_weights_from_disk", json={"model_path": str(other)}
        )
        assert not_routed.status_code == 404
        try:
            client.update_weights_from_disk(str(other), weight_version="round-1")
            versions = {engine.generator.weight_version for engine in engines}
            paths = {httpx.get(f"{u}/model_info").json()["model_path"] for u in router.worker_urls}
            assert versions == {"round-1"} and paths == {str(other)}
            [changed] = client.score([[5, 6]], [[7, 8]])
            assert not (changed == scores).all()
        finally:
            client.update_weights_from_disk(str(model), weight_version="default")
        flushed = httpx.post(f"{router.url}/flush_cache", timeout=30)
        assert flushed.status_code == 200  # the router fans it out to every engine
