"""Server fleets on a real Ray cluster with logical GPUs, over real HTTP, behind the real
sglang-router: placement, load sharing, weight versions, and relaunching a killed server.

Greedy decoding of distinct prompts gives the same tokens on any engine holding the same
weights, so "the killed fleet answered every sequence exactly once" is checked by comparing
each position with the answer of a fleet nobody killed.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest
from tiny_runs import local_ray

from opd_core.config import OPDRunConfig
from opd_core.engine.fleet import FleetError, start_servers
from opd_core.hf_utils import make_tiny_qwen3

PROMPTS = [[1 + i % 7, 20 + i, 3, 40 + 2 * i] for i in range(24)]
GREEDY = {"max_new_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def cluster():
    with local_ray(num_cpus=8, num_gpus=4):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    small = {"hidden_size": 32, "num_hidden_layers": 1}
    return make_tiny_qwen3(root / "a", **small), make_tiny_qwen3(root / "b", seed=3, **small)


def _config(**rollout) -> OPDRunConfig:
    return OPDRunConfig.model_validate({"rollout": rollout})


def _server_process(url: str) -> psutil.Process:
    """The server process (its process group's leader) serving `url`: one of this test
    process's descendants (its Ray cluster's actors start the servers)."""
    port = url.rsplit(":", 1)[1]
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if "opd_core.engine.server" in cmdline and cmdline[cmdline.index("--port") + 1] == port:
            return process
    raise AssertionError(f"no server process for {url}")


def _ids(responses: list[dict]) -> list[list[int]]:
    return [r["output_ids"] for r in responses]


def _wait_until_back(fleet, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sum("is back" in e for e in fleet.events) < count:
        assert time.monotonic() < deadline, fleet.events
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_engines(cluster, models, tmp_path_factory):
    cfg = _config(
        num_engines=2,
        num_gpus_per_engine=1,
        router_policy="round_robin",
        enable_deterministic_inference=True,
    )
    log = tmp_path_factory.mktemp("logs") / "rollout.log"
    with start_servers("rollout", cfg, models[0], log, weight_version="0") as fleet:
        yield cfg, fleet


def test_engines_hold_their_own_gpus_and_share_the_requests(two_engines, models):
    cfg, fleet = two_engines
    assert fleet.router is not None and fleet.url == fleet.router.url
    gpus = [row.gpu_ids for row in fleet.placement]
    assert all(len(ids) == 1 for ids in gpus) and gpus[0] != gpus[1]
    for row in fleet.placement:  # each server runs with exactly the GPUs Ray gave its actor
        environ = _server_process(row.url).environ()
        assert environ["CUDA_VISIBLE_DEVICES"] == ",".join(row.gpu_ids)
        assert row.url.startswith("http://127.0.0.1:")  # one node: loopback only

    before = fleet.requests_served()
    # Seeded samples (per-sequence seeds: batches the router 422s) go to the engines directly,
    # 4 a request, in turn; shared params go through the router.
    with fleet.client(cfg.client.model_copy(update={"batch_size": 4})) as client:
        out = client.generate(PROMPTS, {"max_new_tokens": 4, "sampling_seed": 11})
        out += client.generate(PROMPTS, GREEDY)
    served = {url: fleet.requests_served()[url] - before[url] for url in fleet.urls}
    print(f"\nrequests served per engine: {served}")
    # 12 batch requests of 4 (a router health check may add one: /health generates a token).
    assert len(out) == 2 * len(PROMPTS) and sum(served.values()) >= 2 * len(PROMPTS) // 4
    assert all(count > 0 for count in served.values()), served

    fleet.update_weights(models[1], "1")  # each engine directly (the router would 404)
    assert set(fleet.weight_versions().values()) == {"1"}


def test_a_killed_engine_behind_the_router_is_relaunched_with_the_current_weights(
    two_engines, models
):
    cfg, fleet = two_engines
    fleet.update_weights(models[1], "1")
    with fleet.client(cfg.client) as client:
        expected = client.generate(PROMPTS, GREEDY)
        victim = fleet.urls[0]
        answers: list = []
        sender = threading.Thread(target=lambda: answers.append(client.generate(PROMPTS, GREEDY)))
        sender.start()
        os.killpg(_server_process(victim).pid, signal.SIGKILL)  # while requests are in flight
        sender.join()
    # The router sent what the dead engine had to the other one: every position, once.
    assert _ids(answers[0]) == _ids(expected)
    _wait_until_back(fleet, 1)
    assert fleet.restarts == 1
    assert fleet.events[0] == f"rollout engine 0 ({victim}) died: exit code -9; relaunching (1/3)"
    info = httpx.get(f"{victim}/model_info").json()  # same URL, the current weights
    assert (info["model_path"], info["weight_version"]) == (str(models[1]), "1")
    assert fleet.router.worker_urls == fleet.urls


def test_a_lone_engine_killed_is_waited_out_and_the_budget_is_bounded(cluster, models, tmp_path):
    """No router: the client's batch fails on the only URL, the fleet relaunches the engine,
    the batch is sent again. A killed Ray actor takes its server along and is replaced in its
    bundle. One death more than `max_restarts` is an error naming the server."""
    import ray

    cfg = _config(num_engines=1, max_restarts=2)
    with start_servers("rollout", cfg, models[0], tmp_path / "rollout.log", watch=False) as fleet:
        assert fleet.router is None
        with fleet.client(cfg.client.model_copy(update={"max_retries": 1})) as client:
            expected = _ids(client.generate(PROMPTS, GREEDY))
            os.killpg(_server_process(fleet.urls[0]).pid, signal.SIGKILL)
            assert _ids(client.generate(PROMPTS, GREEDY)) == expected
            assert fleet.restarts == 1

            server = _server_process(fleet.urls[0])
            ray.kill(fleet._servers[0].actor)  # the actor, not the server
            server.wait(timeout=30)  # it dies with the actor that started it
            assert _ids(client.generate(PROMPTS, GREEDY)) == expected
            assert fleet.restarts == 2 and "its Ray actor died" in fleet.events[-2]

            os.killpg(_server_process(fleet.urls[0]).pid, signal.SIGKILL)
            with pytest.raises(
                FleetError,
                match=r"rollout engine 0 \(http://127\.0\.0\.1:\d+\) "
                r"died: exit code -9; no restarts left",
            ):
                client.generate(PROMPTS, GREEDY)


def test_external_servers_are_used_as_given_never_started_or_relaunched(models, tmp_path):
    """backend=external: no Ray, no router; weight updates still reach the server, and a
    failure is not "healed" (someone else runs it)."""
    from opd_core.config import RolloutConfig
    from opd_core.engine.launcher import launch_server

    with launch_server("builtin", models[0], RolloutConfig(), tmp_path / "ext.log") as server:
        cfg = _config(backend="external", url=server.url)
        with start_servers("rollout", cfg, models[0], tmp_path / "unused.log") as fleet:
            assert fleet.url == [server.url] and fleet.router is None and not fleet.placement
            fleet.update_weights(models[1], "7")
            assert fleet.weight_versions() == {server.url: "7"}
            assert fleet.recover(RuntimeError("down")) is False


def test_a_fleets_clients_are_kept_and_keyed_by_their_settings():
    """Made once per fleet (a new httpx client loads a TLS context every time), but a
    one-server fleet's update client (default retries) is not its control client (2)."""
    from opd_core.engine.fleet import ServerFleet

    cfg = OPDRunConfig()
    url = "http://127.0.0.1:9"
    fleet = ServerFleet("rollout", "external", cfg.rollout, "m", [url])
    update, control = fleet._client_of(url), fleet._control().__enter__()
    assert update is fleet._client_of(url) and control is fleet._control().__enter__()
    assert update is not control
    assert update.transport.max_retries == 5 and control.transport.max_retries == 2
    fleet.stop()
    assert fleet._clients == {}
