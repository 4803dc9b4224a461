"""Tensor and data parallelism on CPU: real Ray actors in a placement group, gloo, megatron-core.

Three training steps at TP=2 and at DP=2 give the losses of TP=1/DP=1 (within 1e-3), and a
TP=2 checkpoint loads at TP=1 and back with the same log-probs. The batch has samples sharing
a prompt, as a GRPO round does, so every layout trains the shared-prompt input
(megatron.layout); the single rank also runs it one row per sample for the same losses.
~70 s on 2 cores.
"""

import signal

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from opd_core.algorithm.batch import TrainBatch
from opd_core.cluster import start_ray
from opd_core.config import OPDRunConfig
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.megatron.convert import hf_to_torch_dist
from opd_core.trainer.group import TrainerGroup


@pytest.fixture(scope="module")
def cluster():
    """A local cluster started as the train stage does, under an orchestrator's SIGTERM handler."""

    def orchestrator_sigterm(signum, frame):
        # What Prefect installs: a cancel's SIGTERM becomes CANCELLED.
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, orchestrator_sigterm)
    try:
        start_ray(None, num_cpus=4)
        yield orchestrator_sigterm
        ray.shutdown()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_starting_ray_keeps_the_orchestrators_sigterm_handler(cluster):
    """ray.init installs `sys.exit` for SIGTERM; left there, a Prefect cancel ends CRASHED, not
    CANCELLED."""
    assert signal.getsignal(signal.SIGTERM) is cluster


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    hf_dir = make_tiny_qwen3(root / "hf", initializer_range=0.1)
    return hf_dir, hf_to_torch_dist(hf_dir, root / "torch_dist")


def config(
    tp: int = 1, dp: int = 1, pp: int = 1, micro_batch_size: int = 8, share_prompts: str = "auto"
) -> OPDRunConfig:
    return OPDRunConfig.model_validate(
        {
            "train": {
                "global_batch_size": 8,
                "micro_batch_size": micro_batch_size,
                "lr": 1e-2,
                "parallel": {
                    "tensor_model_parallel_size": tp,
                    "data_parallel_size": dp,
                    "pipeline_model_parallel_size": pp,
                },
                "ray": {"actor_num_cpus_per_rank": 1},
                "share_prompts": share_prompts,
            }
        }
    )


def make_batch() -> TrainBatch:
    rng = np.random.default_rng(0)
    distinct = [list(map(int, rng.integers(3, 300, rng.integers(2, 7)))) for _ in range(5)]
    prompts = [distinct[i] for i in (0, 0, 1, 1, 2, 3, 3, 4)]  # groups of 2 and single ones
    # Lengths 0..5: includes empty responses.
    responses = [list(map(int, rng.integers(3, 300, rng.integers(0, 6)))) for _ in range(8)]
    advantages = [rng.standard_normal(len(r)).astype(np.float32) for r in responses]
    return TrainBatch(prompts, responses, advantages=advantages)


def three_steps(group, batch: TrainBatch) -> list[float]:
    batch.old_logprobs = group.compute_logprobs(batch)
    return [group.train_step(batch)["loss"] for _ in range(3)]


@pytest.fixture(scope="module")
def single_rank(cluster, student):
    """TP=1, PP=1, DP=1: the losses of three steps and the log-probs after them."""
    hf_dir, ckpt = student
    batch = make_batch()
    with TrainerGroup(config(), hf_dir, ckpt) as group:
        losses = three_steps(group, batch)
        logprobs = group.compute_logprobs(batch)
    assert losses[0] != losses[2]  # the steps really changed the model
    with TrainerGroup(config(share_prompts="off"), hf_dir, ckpt) as group:
        np.testing.assert_allclose(three_steps(group, make_batch()), losses, atol=1e-5)
        for a, b in zip(group.compute_logprobs(batch), logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
    return losses, logprobs


def test_tp2_and_dp2_match_single_rank_and_tp_checkpoints_reshard(single_rank, student, tmp_path):
    hf_dir, ckpt = student
    batch = make_batch()
    reference, reference_logprobs = single_rank

    # TP=2 with micro-batches of 2 (gradient accumulation over 4 micro-batches).
    with TrainerGroup(config(tp=2, micro_batch_size=2), hf_dir, ckpt) as group:
        assert [r["tp_rank"] for r in group.ranks] == [0, 1]
        np.testing.assert_allclose(three_steps(group, batch), reference, atol=1e-3)
        tp2_logprobs = group.compute_logprobs(batch)
        group.save_checkpoint(tmp_path / "tp2", step=3)
    for a, b in zip(tp2_logprobs, reference_logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)

    with TrainerGroup(config(dp=2, micro_batch_size=2), hf_dir, ckpt) as group:
        assert sorted(r["dp_rank"] for r in group.ranks) == [0, 1]
        np.testing.assert_allclose(three_steps(group, batch), reference, atol=1e-3)
        # One sample for two DP ranks: one shard is empty and must still join the collectives.
        single = batch.select([next(i for i, r in enumerate(batch.response_ids) if r)])
        assert np.isfinite(group.train_step(single)["loss"])
        assert len(group.compute_logprobs(single)[0]) == len(single.response_ids[0]) > 0

    # The TP=2 checkpoint at TP=1, saved again, and loaded back at TP=2.
    with TrainerGroup(config(), hf_dir, tmp_path / "tp2", step=3) as group:
        tp1_logprobs = group.compute_logprobs(batch)
        group.save_checkpoint(tmp_path / "tp1", step=4)
    with TrainerGroup(config(tp=2), hf_dir, tmp_path / "tp1") as group:  # latest = step 4
        back_logprobs = group.compute_logprobs(batch)
    for tp2, tp1, back in zip(tp2_logprobs, tp1_logprobs, back_logprobs):
        np.testing.assert_allclose(tp1, tp2, atol=1e-5)
        np.testing.assert_allclose(back, tp2, atol=1e-5)


def test_pp2_matches_single_rank_and_pp_checkpoints_reshard(single_rank, student, tmp_path):
    """Pipeline parallel 2 (one layer per stage, the tied embedding on both ends) through
    Megatron's 1F1B schedule: same losses and log-probs; its checkpoint and HF export load at
    PP=1."""
    hf_dir, ckpt = student
    batch = make_batch()
    reference, reference_logprobs = single_rank
    with TrainerGroup(config(pp=2, micro_batch_size=2), hf_dir, ckpt) as group:
        assert sorted(r["pp_rank"] for r in group.ranks) == [0, 1]
        losses = three_steps(group, batch)
        pp2_logprobs = group.compute_logprobs(batch)
        group.save_checkpoint(tmp_path / "pp2", step=3)
        group.export_hf(tmp_path / "pp2_hf")
        # One sample: one micro-batch, still through both stages.
        single = batch.select([next(i for i, r in enumerate(batch.response_ids) if r)])
        assert np.isfinite(group.train_step(single)["loss"])
    np.testing.assert_allclose(losses, reference, atol=1e-3)
    for a, b in zip(pp2_logprobs, reference_logprobs):
        np.testing.assert_allclose(a, b, atol=1e-4)

    with TrainerGroup(config(), hf_dir, tmp_path / "pp2", step=3) as group:
        pp1_logprobs = group.compute_logprobs(batch)
    for pp1, pp2 in zip(pp1_logprobs, pp2_logprobs):
        np.testing.assert_allclose(pp1, pp2, atol=1e-5)

    # The export is a whole HF model (both stages' layers, one tied embedding).
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "pp2_hf").eval()
    sample = 1
    ids = torch.tensor([batch.prompt_ids[sample] + batch.response_ids[sample]])
    with torch.no_grad():
        hf_logprobs = torch.log_softmax(exported(ids).logits[0].float(), -1)
    start = len(batch.prompt_ids[sample]) - 1
    expected = [
        hf_logprobs[start + i, token].item() for i, token in enumerate(batch.response_ids[sample])
    ]
    np.testing.assert_allclose(expected, pp2_logprobs[sample], atol=1e-4)


def test_a_layout_that_does_not_fit_the_model_is_refused_before_any_actor_starts(student):
    hf_dir, ckpt = student  # 2 layers, 4 heads, 2 kv heads
    with pytest.raises(
        ValueError,
        match=r"train.parallel does not fit models.student .*pipeline_model_parallel_size 4 "
        r"does not divide num_hidden_layers 2",
    ):
        TrainerGroup(config(pp=4), hf_dir, ckpt)
    with pytest.raises(
        ValueError, match=r"tensor_model_parallel_size 4 does not divide num_key_value_heads 2"
    ):
        TrainerGroup(config(tp=4), hf_dir, ckpt)
