"""Both teacher modes give the same teacher log-probs and top-k on the same rollouts (fp32, <=1e-4).

opd_type=sglang: the teacher behind the built-in SGLang-protocol server, scored over HTTP
with `EngineClient.score`. opd_type=megatron: the teacher's torch_dist checkpoint loaded into
the Ray training actor (`TrainerGroup.teacher_logprobs`), no server. Rollouts are sampled
from the server first, as in a round. The actor side runs at PP=1 and PP=2. ~90 s on 2 cores.
"""

import numpy as np
import pytest
from tiny_runs import student_and_teacher

from opd_core.algorithm.batch import TrainBatch
from opd_core.config import OPDRunConfig, TeacherConfig
from opd_core.engine.client import EngineClient
from opd_core.engine.launcher import launch_server
from opd_core.megatron.parallel import destroy_distributed
from opd_core.trainer.group import TrainerGroup


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    models = student_and_teacher(tmp_path_factory.mktemp("teacher_modes"))
    destroy_distributed()  # the conversion's one-rank group is not needed by the driver any more
    return models


@pytest.mark.parametrize("pipeline", [1, 2], ids=["pp1", "pp2"])
def test_server_and_megatron_teacher_logprobs_agree(models, pipeline):
    """Also with the teacher (and student) split over two pipeline stages."""
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 300, n))) for n in (1, 3, 5, 8, 4, 6)]
    with (
        launch_server(
            "builtin",
            models["teacher"],
            TeacherConfig(startup_timeout=120),
            models["root"] / "server.log",
        ) as server,
        EngineClient(server.url) as client,
    ):
        responses = client.generate(
            prompts, {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 3}
        )
        response_ids = [list(r["output_ids"]) for r in responses]
        response_ids.append([])  # a zero-length response scores to an empty array in both modes
        prompts = prompts + [prompts[0]]
        over_http = client.score(prompts, response_ids)
        http_topk = client.score_topk(prompts, response_ids, k=5)
    assert sum(len(r) for r in response_ids) >= 10

    cfg = OPDRunConfig.model_validate(
        {
            "algorithm": {
                "use_opd": True,
                "opd_type": "megatron",
                "opd_teacher_load": str(models["teacher_ckpt"]),
            },
            "train": {
                "dtype": "fp32",
                "micro_batch_size": 4,
                "ray": {"actor_num_cpus_per_rank": 1},
                "parallel": {"pipeline_model_parallel_size": pipeline},
            },
        }
    )
    batch = TrainBatch(prompt_ids=prompts, response_ids=response_ids)
    with TrainerGroup(
        cfg, models["student"], models["student_ckpt"], teacher_ckpt_dir=models["teacher_ckpt"]
    ) as trainer:
        in_actor = trainer.teacher_logprobs(batch)
        student = trainer.compute_logprobs(batch)
        actor_topk = trainer.teacher_topk(batch, 5)

    differences = []
    for row, (http, megatron, response) in enumerate(zip(over_http, in_actor, response_ids)):
        assert http.shape == megatron.shape == (len(response),), row
        if len(response):
            differences.append(float(np.abs(http - megatron).max()))
    print(
        f"PP={pipeline}: max |server - megatron| teacher log-prob difference: "
        f"{max(differences):.2e}"
    )
    assert max(differences) <= 1e-4
    # The actor really used the teacher, not the student it trains.
    assert max(float(np.abs(t - s).max()) for t, s in zip(in_actor, student) if len(t)) > 0.1

    # Top-k OPD: the same k tokens with the same log-probs from the server and the actor.
    for row, (http_sampled, http_ids, http_values, sampled, ids, values) in enumerate(
        zip(*http_topk, *actor_topk)
    ):
        assert (
            ids.shape == values.shape == http_ids.shape == (len(response_ids[row]), 5)
            and ids.dtype == np.int32
        )
        np.testing.assert_allclose(sampled, http_sampled, atol=1e-4)
        np.testing.assert_allclose(values, http_values, atol=1e-4)
        # Ties aside (none at fp32 on random weights), the same ids in the same order.
        assert (ids == http_ids).all(), row
