"""Reference model (KL loss) and PPO critic of the training actor, in-process (world size 1).

Reference log-probs = the initial policy's and stay fixed while the policy trains; the KL
loss becomes > 0; critic values are aligned with the response tokens (empty responses
too), start at 0 (zero head), a few critic steps reduce the value loss on a fixed batch,
and a checkpoint round trip restores the critic (and its optimizer) exactly.
"""

import numpy as np
import pytest

from opd_core.algorithm.advantages import compute_advantages
from opd_core.algorithm.batch import TrainBatch
from opd_core.config import OPDRunConfig
from opd_core.hf_utils import make_tiny_qwen3
from opd_core.megatron.convert import hf_to_torch_dist
from opd_core.megatron.parallel import destroy_distributed, free_port
from opd_core.trainer.actor import TrainActor
from opd_core.trainer.group import TrainerGroup
from opd_core.trainer.spec import ActorSpec


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic")
    hf_dir = make_tiny_qwen3(root / "student", initializer_range=0.1)
    return {"root": root, "hf": hf_dir, "ckpt": hf_to_torch_dist(hf_dir, root / "torch_dist")}


@pytest.fixture(autouse=True)
def _fresh_process_group():
    yield
    destroy_distributed()  # each test sets up its own world-size-1 actor


def make_actor(student, ckpt=None, **algorithm) -> TrainActor:
    cfg = OPDRunConfig.model_validate(
        {
            "train": {"global_batch_size": 8, "micro_batch_size": 3, "lr": 1e-2, "critic_lr": 1e-2},
            "algorithm": {"use_opd": False, "opd_type": None, **algorithm},
        }
    )
    actor = TrainActor()
    actor.setup(
        0,
        1,
        "127.0.0.1",
        free_port(),
        ActorSpec.from_config(cfg, student["hf"], ckpt or student["ckpt"]),
    )
    return actor


def make_batch(seed: int = 0) -> TrainBatch:
    rng = np.random.default_rng(seed)
    prompts = [list(map(int, rng.integers(3, 300, rng.integers(1, 7)))) for _ in range(8)]
    responses = [list(map(int, rng.integers(3, 300, rng.integers(0, 6)))) for _ in range(8)]
    responses[0] = []  # a zero-length response in every batch
    responses[1] = [int(rng.integers(3, 300))]  # and a length-1 one
    advantages = [rng.standard_normal(len(r)).astype(np.float32) for r in responses]
    return TrainBatch(prompts, responses, advantages=advantages)


def ppo_batch(actor: TrainActor, seed: int = 0) -> TrainBatch:
    """A batch with old log-probs, critic values, GAE advantages, returns, as the loop builds it."""
    batch = make_batch(seed)
    batch.old_logprobs = actor.compute_logprobs(batch)
    values = actor.compute_values(batch)
    rewards = np.random.default_rng(seed).choice([0.0, 1.0], size=len(batch)).astype(np.float32)
    result = compute_advantages(
        actor.algorithm,
        rewards=rewards,
        group_ids=np.arange(len(batch)) // 2,
        old_logprobs=batch.old_logprobs,
        teacher_logprobs=None,
        values=values,
    )
    batch.advantages, batch.returns, batch.old_values = result.advantages, result.returns, values
    return batch


def test_reference_is_the_initial_policy_and_stays_fixed(student):
    actor = make_actor(student, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl")
    assert actor.critic is None  # grpo: no critic, no memory for it
    batch = make_batch()
    initial = actor.compute_logprobs(batch)
    reference = actor.ref_logprobs(batch)
    for ref, policy in zip(reference, initial):
        np.testing.assert_array_equal(ref, policy)
    batch.old_logprobs, batch.ref_logprobs = initial, reference
    first = actor.train_step(batch)
    assert first["kl_loss"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the step
    second = actor.train_step(batch)
    assert second["kl_loss"] > 1e-6  # the policy moved away from the reference
    after = actor.compute_logprobs(batch)
    assert max(np.abs(a - b).max() for a, b in zip(after, initial) if len(a)) > 1e-3
    for ref, before in zip(actor.ref_logprobs(batch), reference):
        np.testing.assert_array_equal(ref, before)
    with pytest.raises(RuntimeError, match="critic"):
        actor.compute_values(batch)


def test_no_reference_without_kl_loss(student):
    actor = make_actor(student)
    assert actor.reference is None
    with pytest.raises(RuntimeError, match="use_kl_loss"):
        actor.ref_logprobs(make_batch())


def test_critic_values_shapes_and_value_loss_decreases(student):
    # No value clip here: with fixed old values the clip would bound how far the fit can go.
    actor = make_actor(student, advantage_estimator="ppo", gamma=1.0, lambd=0.95, value_clip=None)
    batch = ppo_batch(actor)
    values = actor.compute_values(batch)
    assert [v.shape for v in values] == [(len(r),) for r in batch.response_ids]
    assert values[0].dtype == np.float32 and values[0].shape == (0,)
    assert all(np.all(v == 0) for v in values)  # zero-initialised head
    losses = []
    for _ in range(6):
        metrics = actor.train_step(batch)  # same old values / returns: a fixed critic target
        assert {"value_loss", "value_clip_frac", "value_mean", "critic_grad_norm"} <= set(metrics)
        losses.append(metrics["value_loss"])
    print("value loss by step:", [round(x, 5) for x in losses])
    assert losses[-1] < 0.5 * losses[0], losses
    assert any(not np.all(v == 0) for v in actor.compute_values(batch) if len(v))
    # The critic has its own weights: the trunk moved, the policy's did not move with it.
    critic_embed = actor.critic.embedding.word_embeddings.weight
    policy_embed = actor.module.embedding.word_embeddings.weight
    assert (critic_embed - policy_embed).abs().max() > 0


def test_value_clip_is_reported(student):
    actor = make_actor(student, advantage_estimator="ppo", value_clip=1e-4)
    batch = ppo_batch(actor, seed=1)
    batch.returns = [r + 5.0 for r in batch.returns]  # far targets: the clipped branch wins
    actor.train_step(batch)
    metrics = actor.train_step(batch)
    assert metrics["value_clip_frac"] > 0.5


def test_checkpoint_round_trip_restores_the_critic_exactly(student):
    root = student["root"]
    actor = make_actor(student, advantage_estimator="ppo")
    batch = ppo_batch(actor, seed=2)
    actor.train_step(batch)
    actor.train_step(batch)
    actor.save_checkpoint(root / "run", step=2)
    saved_values = actor.compute_values(batch)
    expected = actor.train_step(batch)  # the step a resumed run must repeat exactly
    expected_values = actor.compute_values(batch)
    destroy_distributed()

    resumed = make_actor(student, advantage_estimator="ppo")  # set up from the student, then resume
    info = resumed.load_checkpoint(root / "run")
    assert info["resumed_critic"] and info["resumed_optimizer"] and info["iteration"] == 2
    for a, b in zip(resumed.compute_values(batch), saved_values):
        np.testing.assert_array_equal(a, b)
    got = resumed.train_step(batch)
    for key in ("value_loss", "value_clip_frac", "critic_grad_norm", "loss", "grad_norm"):
        assert got[key] == expected[key], key
    # Critic optimizer state resumed too.
    for a, b in zip(resumed.compute_values(batch), expected_values):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "parallel",
    [{"tensor_model_parallel_size": 2}, {"pipeline_model_parallel_size": 2}],
    ids=["tp2", "pp2"],
)
def test_model_parallel_critic_and_reference_match_single_rank(student, parallel):
    """TP=2 or PP=2 (two Ray actors, gloo): the value head (replicated under TP, on the last stage
    under PP) and the reference give the single rank's numbers, grad norms included, and the
    two-rank checkpoint's critic loads at world size 1."""
    algorithm = {
        "use_opd": False,
        "opd_type": None,
        "advantage_estimator": "ppo",
        "use_kl_loss": True,
        "kl_loss_coef": 0.1,
    }
    cfg = OPDRunConfig.model_validate(
        {
            "train": {
                "global_batch_size": 8,
                "micro_batch_size": 3,
                "lr": 1e-2,
                "critic_lr": 1e-2,
                "parallel": parallel,
                "ray": {"actor_num_cpus_per_rank": 1},
            },
            "algorithm": algorithm,
        }
    )
    single = make_actor(student, **algorithm)
    batch = ppo_batch(single, seed=4)
    batch.ref_logprobs = single.ref_logprobs(batch)
    expected = [single.train_step(batch) for _ in range(2)]
    expected_values = single.compute_values(batch)
    destroy_distributed()

    with TrainerGroup(cfg, student["hf"], student["ckpt"]) as group:
        for a, b in zip(group.ref_logprobs(batch), batch.ref_logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
        got = [group.train_step(batch) for _ in range(2)]
        parallel_values = group.compute_values(batch)
        run_dir = student["root"] / f"{next(iter(parallel))}_run"
        group.save_checkpoint(run_dir, step=2)
    for a, b in zip(got, expected):
        for key in (
            "value_loss",
            "value_clip_frac",
            "critic_grad_norm",
            "loss",
            "kl_loss",
            "grad_norm",
        ):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    print(
        f"{parallel} vs one rank: max |value diff|",
        max(float(np.abs(a - b).max()) for a, b in zip(parallel_values, expected_values) if len(a)),
        "value_loss",
        [(a["value_loss"], b["value_loss"]) for a, b in zip(got, expected)],
    )
    for a, b in zip(parallel_values, expected_values):
        np.testing.assert_allclose(a, b, atol=1e-4)

    resharded = make_actor(student, **algorithm)
    info = resharded.load_checkpoint(run_dir)
    # AdamW state only fits the same layout.
    assert info["resumed_critic"] and not info["resumed_optimizer"]
    for a, b in zip(resharded.compute_values(batch), parallel_values):
        np.testing.assert_allclose(a, b, atol=1e-5)
