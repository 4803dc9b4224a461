"""Top-k OPD (`algorithm.opd_topk`): the coarsened reverse KL, the teacher's top-k over HTTP,
and an actor step that pulls the student towards the teacher on the top-k support."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from opd_core.algorithm.batch import TrainBatch
from opd_core.algorithm.losses import topk_reverse_kl
from opd_core.config import ConfigError, OPDRunConfig, load_config
from opd_core.engine.background import BackgroundServer
from opd_core.engine.client import EngineClient, scores_to_table
from opd_core.engine.server import create_app
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.io import read_arrow, write_arrow
from opd_core.megatron.convert import hf_to_torch_dist
from opd_core.megatron.parallel import destroy_distributed, free_port
from opd_core.schemas import TEACHER_LOGPROBS
from opd_core.trainer.actor import TrainActor
from opd_core.trainer.spec import ActorSpec

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
RESPONSES = [[20, 21, 22], [], [24]]


def test_topk_reverse_kl_is_the_full_kl_at_k_equal_vocab_and_a_lower_bound_below():
    torch.manual_seed(0)
    student = torch.log_softmax(torch.randn(4, 12), -1)
    teacher = torch.log_softmax(3 * torch.randn(4, 12), -1)
    full = (student.exp() * (student - teacher)).sum(-1)
    everything = teacher.topk(12, -1).indices
    assert torch.allclose(
        topk_reverse_kl(student.gather(-1, everything), teacher.gather(-1, everything)),
        full,
        atol=1e-5,
    )
    top3 = teacher.topk(3, -1).indices
    partial = topk_reverse_kl(student.gather(-1, top3), teacher.gather(-1, top3))
    assert (partial <= full + 1e-6).all() and (partial > 0).all()
    assert torch.allclose(
        topk_reverse_kl(teacher.gather(-1, top3), teacher.gather(-1, top3)),
        torch.zeros(4),
        atol=1e-6,
    )


def test_opd_topk_needs_use_opd_and_works_with_either_teacher():
    with pytest.raises(ConfigError, match="opd_topk is set but algorithm.use_opd is false"):
        load_config(
            None, ["algorithm.opd_topk=4", "algorithm.use_opd=false", "algorithm.opd_type=null"]
        )
    megatron = load_config(
        None,
        [
            "algorithm.opd_topk=4",
            "algorithm.use_opd=true",
            "algorithm.opd_type=megatron",
            "algorithm.opd_teacher_load=/ckpt",
        ],
    )
    assert megatron.algorithm.opd_topk == 4


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_qwen3(
        tmp_path_factory.mktemp("topk") / "teacher",
        max_position_embeddings=64,
        initializer_range=0.2,
    )


def test_score_topk_matches_a_direct_forward_and_goes_to_arrow(teacher_dir, tmp_path):
    with BackgroundServer(create_app(str(teacher_dir))) as url, EngineClient(url) as client:
        logprobs, topk_ids, topk_logprobs = client.score_topk(PROMPTS, RESPONSES, k=4)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    for prompt, response, sampled, ids, values in zip(
        PROMPTS, RESPONSES, logprobs, topk_ids, topk_logprobs
    ):
        assert ids.shape == values.shape == (len(response), 4) and ids.dtype == np.int32
        if not response:
            continue
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].float(), -1)
        positions = full[len(prompt) - 1 : len(prompt) + len(response) - 1]
        expected_values, expected_ids = positions.topk(4, -1)
        assert np.array_equal(ids, expected_ids.numpy())
        np.testing.assert_allclose(values, expected_values.numpy(), atol=1e-4)
        np.testing.assert_allclose(
            sampled, positions.gather(-1, torch.tensor(response)[:, None])[:, 0].numpy(), atol=1e-4
        )
    table = scores_to_table([0, 1, 2], [0, 0, 0], logprobs, topk_ids, topk_logprobs)
    stored = read_arrow(
        write_arrow(tmp_path / "teacher_logprobs.arrow", table, TEACHER_LOGPROBS), TEACHER_LOGPROBS
    )
    assert stored.column("teacher_topk_ids").to_pylist()[0] == topk_ids[0].tolist()


def test_actor_step_on_topk_loss_moves_the_student_towards_the_teacher(tmp_path, teacher_dir):
    student_hf = make_tiny_qwen3(
        tmp_path / "student", seed=1, max_position_embeddings=64, initializer_range=0.2
    )
    cfg = OPDRunConfig.model_validate(
        {
            "train": {"global_batch_size": 8, "micro_batch_size": 4, "lr": 1e-2},
            "algorithm": {"opd_topk": 4, "opd_kl_coef": 1.0},
        }
    )
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, 300, 4))) for _ in range(8)]
    responses = [list(map(int, rng.integers(3, 300, 5))) for _ in range(8)]
    ids, values = [], []
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            full = torch.log_softmax(
                teacher(torch.tensor([prompt + response])).logits[0].float(), -1
            )[len(prompt) - 1 : -1]
            top = full.topk(4, -1)
            ids.append(top.indices.numpy().astype(np.int32))
            values.append(top.values.numpy())
    actor = TrainActor()
    try:
        actor.setup(
            0,
            1,
            "127.0.0.1",
            free_port(),
            ActorSpec.from_config(cfg, student_hf, hf_to_torch_dist(student_hf, tmp_path / "ckpt")),
        )
        # Zero advantages: the top-k loss is the only signal.
        batch = TrainBatch(
            prompts,
            responses,
            advantages=[np.zeros(5, np.float32)] * 8,
            teacher_topk_ids=ids,
            teacher_topk_logprobs=values,
        )
        batch.old_logprobs = actor.compute_logprobs(batch)
        kls = [actor.train_step(batch)["opd_topk_kl"] for _ in range(5)]
    finally:
        destroy_distributed()
    assert kls[0] > 0 and kls[-1] < 0.7 * kls[0], kls


def test_topk_step_takes_a_zero_length_response(tmp_path):
    """A response cut to 0 tokens (a prompt at the context limit) has [0, k] top-k arrays, as
    score_topk and the Megatron teacher return them; the step must take it like any other."""
    student_hf = make_tiny_qwen3(tmp_path / "student", max_position_embeddings=64)
    cfg = OPDRunConfig.model_validate(
        {"train": {"global_batch_size": 2, "micro_batch_size": 2}, "algorithm": {"opd_topk": 4}}
    )
    rng = np.random.default_rng(0)
    responses = [[5, 6, 7], []]
    ids = [rng.integers(3, 300, (len(r), 4)).astype(np.int32) for r in responses]
    values = [np.log(np.full((len(r), 4), 0.2, np.float32)) for r in responses]
    actor = TrainActor()
    try:
        actor.setup(
            0,
            1,
            "127.0.0.1",
            free_port(),
            ActorSpec.from_config(cfg, student_hf, hf_to_torch_dist(student_hf, tmp_path / "ckpt")),
        )
        batch = TrainBatch(
            [[1, 2, 3], [1, 2]],
            responses,
            advantages=[np.zeros(len(r), np.float32) for r in responses],
            teacher_topk_ids=ids,
            teacher_topk_logprobs=values,
        )
        metrics = actor.train_step(batch)
    finally:
        destroy_distributed()
    assert (
        np.isfinite(metrics["opd_topk_kl"])
        and metrics["opd_topk_kl"] > 0
        and metrics["num_tokens"] == 3
    )
