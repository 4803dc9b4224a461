"""The pipeline through sglang-router: two built-in rollout engines and two teacher replicas,
each group behind its own router, placed by Ray in CPU bundles, through the Prefect flow.

Checked: the run completes; each engine and each replica served a share of the requests
(counted in each server's own access log); every weight update reached both engines (each
log has one per round, and the fleet checks that both report the new weight_version before
the next round starts); the rollouts record that version. One train and one eval prompt
come within a few tokens of the models' context length (512): the rounds and the eval cap
their max_new_tokens to fit instead of failing (real SGLang answers 400 otherwise).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_runs import SMALL_BATCHES, TINY_TOY, local_ray

from opd_core.io import read_arrow, read_json
from opd_core.schemas import EVAL_SAMPLES, ROLLOUTS

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 2
CONTEXT = 512  # the toy models' max_position_embeddings
# 503 tokens with the template: over the pre-flight budget of a full response (489), under the
# 505-token input an SGLang server with a 512-token context scores, so kept with its rollouts'
# max_new_tokens capped (counted in download/manifest.json).
LONG = "Add up the digits: " + "1" * 470 + ". What is 2+3?"


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=8) as address:
        yield address


def _prompts(path: Path) -> Path:
    rows = [{"prompt": LONG, "label": "5"}] + [
        {"prompt": f"What is {a}+{a + 1}?", "label": str(2 * a + 1)} for a in range(10, 13)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _count(log: Path, line: str) -> int:
    return log.read_text(errors="replace").count(line)


@pytest.mark.slow
def test_pipeline_through_routers_with_a_prompt_near_the_context(
    prefect_harness, ray_cluster, tmp_path, monkeypatch
):
    from flows.opd import opd_flow

    monkeypatch.chdir(REPO)
    data = _prompts(tmp_path / "prompts.jsonl")
    overrides = [
        *TINY_TOY,
        *SMALL_BATCHES,  # 4 prompts a round: all four, the long one included
        f"rollout.num_rollout={ROUNDS}",
        "train.save_interval=100",
        f"data.train={data}",
        f"eval.benchmarks=[{{source: '{data}'}}]",
        "eval.n_samples=1",
        "rollout.num_engines=2",
        "teacher.num_replicas=2",
        "rollout.router_policy=round_robin",
        # Unseeded: the samples share their sampling params, so the router takes their
        # batches (2 sequences each); the long prompt's capped ones go to an engine directly.
        "rollout.enable_deterministic_inference=false",
        "client.batch_size=2",
        "teacher.router_policy=round_robin",
        f"train.ray.address={ray_cluster}",
        f"run.artifacts_dir={tmp_path}",
        "run.run_id=routed",
    ]
    opd_flow(config_path="configs/toy.yaml", overrides=overrides)
    run = tmp_path / "routed"

    # Placement: one actor, two engines, two replicas, each in its own CPU bundle.
    placement = read_json(run / "train" / "placement.json")
    roles = sorted(row["role"] for row in placement)
    assert roles == ["actor", "rollout", "rollout", "teacher", "teacher"]
    assert all(row["gpu_ids"] == [] for row in placement)  # CPU engines hold no GPU
    endpoint = read_json(run / "teacher" / "endpoint.json")
    assert len(endpoint["urls"]) == 2 and endpoint["url"] not in endpoint["urls"]  # the router

    # Every engine and replica took a share; every sampled sequence was generated once.
    engines = [run / "train" / f"rollout_server_{i}.log" for i in (0, 1)]
    replicas = [run / "teacher" / f"server_{i}.log" for i in (0, 1)]
    served = {log.name: _count(log, '"POST /generate HTTP/1.1" 200') for log in engines}
    scored = {log.name: _count(log, '"POST /generate HTTP/1.1" 200') for log in replicas}
    print(f"\nrollout requests per engine: {served}; teacher requests per replica: {scored}")
    assert all(served.values()) and all(scored.values())
    assert sum(served.values()) == ROUNDS * 4  # 4 requests of 2 samples a round
    # One weight update per round reached each engine directly (the router does not route it).
    for log in engines:
        assert _count(log, '"POST /update_weights_from_disk HTTP/1.1" 200') == ROUNDS, log

    for r in range(ROUNDS):
        rollouts = read_arrow(run / "train" / f"round_{r:04d}" / "rollouts.arrow", ROLLOUTS)
        assert set(rollouts.column("weight_version").to_pylist()) == {str(r)}
        long_rows = [
            (len(prompt) + len(response), reason)
            for prompt, response, reason in zip(
                rollouts.column("prompt_ids").to_pylist(),
                rollouts.column("response_ids").to_pylist(),
                rollouts.column("finish_reason").to_pylist(),
            )
            if len(prompt) > CONTEXT - 32
        ]
        assert len(long_rows) == 2  # its two samples, capped to fit the context
        assert all(total <= CONTEXT - 7 for total, _ in long_rows), long_rows  # teacher scores it

    # The timeline: unseeded batches (each sharing its params, the long prompt's two capped
    # samples too) all went through the routers, so the busy spans are the routers'.
    engine_urls = {row["url"] for row in placement if row["role"] == "rollout"}
    for row in read_arrow(run / "train" / "metrics.arrow").to_pylist():
        servers = json.loads(row["time_servers"])
        assert set(servers["teacher"]) == {endpoint["url"]}, servers  # the teacher's router
        (rollout_router,) = servers["rollout"]  # the engines' router, not an engine
        assert rollout_router not in engine_urls, servers
        assert row["time_score_start"] < row["time_generate_end"]  # streamed by default

    manifest = read_json(run / "download" / "manifest.json")
    assert manifest["preflight"]["prompts"]["train"]["capped"] == 1
    samples = read_arrow(run / "final_eval" / "samples.arrow", EVAL_SAMPLES)
    assert len(samples) == 4 * 2  # every eval prompt answered, the long one too
    assert os.path.exists(run / "final_eval" / "report.md")
