"""Advantage estimators and the OPD penalty, against hand-computed values."""

import math

import numpy as np
import pytest

from opd_core.algorithm.advantages import (
    compute_advantages,
    discounted_returns,
    gae,
    group_normalized_rewards,
)
from opd_core.config import AlgorithmConfig

SQRT3_2 = math.sqrt(3) / 2  # (r - mean)/std for a group [1, 0, 0, 1] (unbiased std = sqrt(1/3))


def cfg(estimator="grpo", use_opd=False, **kw):
    return AlgorithmConfig(advantage_estimator=estimator, use_opd=use_opd, **kw)


def lp(*values):
    return np.array(values, dtype=np.float32)


def approx(values, rel=1e-5, abs=1e-6):
    return pytest.approx(np.asarray(values, dtype=np.float64), rel=rel, abs=abs)


# ------------------------------------------------------------------------------ grpo / gspo


@pytest.mark.parametrize("estimator", ["grpo", "gspo"])
def test_grpo_group_normalised_and_broadcast(estimator):
    old = [lp(-1, -1), lp(-1), lp(-1, -1, -1), lp(-1)]
    result = compute_advantages(cfg(estimator), np.array([1.0, 0.0, 0.0, 1.0]), np.zeros(4), old)
    expected = [SQRT3_2] * 2, [-SQRT3_2], [-SQRT3_2] * 3, [SQRT3_2]
    for got, want in zip(result.advantages, expected):
        assert got.dtype == np.float32
        assert got == approx(want)
    assert result.returns is None
    assert math.isnan(result.opd_reverse_kl)


def test_grpo_groups_are_separate_and_singletons_get_zero():
    old = [lp(-1), lp(-1), lp(-1)]
    result = compute_advantages(cfg(), np.array([1.0, 0.0, 5.0]), np.array([3, 3, 9]), old)
    # group 3: centred +-0.5, unbiased std sqrt(0.5); group 9 has one sample -> 0.
    assert [a[0] for a in result.advantages] == approx([math.sqrt(0.5), -math.sqrt(0.5), 0.0])


def test_grpo_equal_rewards_give_zero_not_nan():
    result = compute_advantages(cfg(), np.ones(3), np.zeros(3), [lp(-1)] * 3)
    assert [a[0] for a in result.advantages] == approx([0, 0, 0])


def test_grpo_without_std_normalisation():
    scores = group_normalized_rewards(np.array([3.0, 1.0]), np.array([0, 0]), divide_by_std=False)
    assert scores == approx([1.0, -1.0])


# ---------------------------------------------------------------------------------- OPD


def test_opd_penalty_added_after_grpo():
    old = [lp(-1.0, -2.0), lp(-0.5)]
    teacher = [lp(-1.5, -0.5), lp(-0.5)]
    config = cfg(use_opd=True, opd_kl_coef=0.5)
    result = compute_advantages(
        config, np.array([1.0, 0.0]), np.zeros(2), old, teacher_logprobs=teacher
    )
    base = math.sqrt(0.5)  # group of [1, 0]
    # reverse KL per token: [0.5, -1.5] and [0.0]
    assert result.advantages[0] == approx([base - 0.25, base + 0.75])
    assert result.advantages[1] == approx([-base])
    assert result.opd_reverse_kl == pytest.approx((0.5 - 1.5 + 0.0) / 3)
    assert result.teacher_logprob_mean == pytest.approx((-1.5 - 0.5 - 0.5) / 3)
    assert result.reverse_kl[0] == approx([0.5, -1.5])


def test_pure_distillation_advantage_is_minus_reverse_kl():
    # Zero rewards: every estimator's base advantage is 0 and OPD alone is the signal.
    old, teacher = [lp(-0.2, -3.0, -1.0)], [lp(-1.2, -1.0, -1.0)]
    for estimator in ("grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        result = compute_advantages(
            cfg(estimator, use_opd=True), np.zeros(1), np.zeros(1), old, teacher_logprobs=teacher
        )
        assert result.advantages[0] == approx([-1.0, 2.0, 0.0]), estimator


def test_top_k_opd_needs_no_old_logprobs():
    """Top-k OPD adds no advantage penalty: without old log-probs (a one-step round) the
    advantages are the same; the sampled-token penalty cannot do without them."""
    old, teacher = [lp(-1.0, -2.0), lp(-0.5)], [lp(-1.5, -0.5), lp(-0.5)]
    config = cfg(use_opd=True, opd_topk=4)
    rewards, groups = np.array([1.0, 0.0]), np.zeros(2)
    full = compute_advantages(config, rewards, groups, old, teacher_logprobs=teacher)
    lean = compute_advantages(
        config, rewards, groups, None, teacher_logprobs=teacher, response_lengths=[2, 1]
    )
    for a, b in zip(full.advantages, lean.advantages):
        assert a == approx(b)
    assert lean.teacher_logprob_mean == full.teacher_logprob_mean
    assert math.isnan(lean.opd_reverse_kl)  # the actor reports it from its forward
    with pytest.raises(ValueError, match="sampled-token OPD penalizes advantages"):
        compute_advantages(
            cfg(use_opd=True), rewards, groups, None, teacher, response_lengths=[2, 1]
        )


def test_teacher_without_use_opd_only_logs_the_kl():
    old, teacher = [lp(-1.0, -2.0)], [lp(-2.0, -2.0)]
    result = compute_advantages(
        cfg(use_opd=False), np.ones(1), np.zeros(1), old, teacher_logprobs=teacher
    )
    assert result.advantages[0] == approx([0.0, 0.0])
    assert result.opd_reverse_kl == pytest.approx(0.5)


def test_opd_respects_loss_mask():
    old, teacher = [lp(-1.0, -1.0, -1.0)], [lp(-2.0, -3.0, -4.0)]
    mask = [np.array([1, 0, 1])]
    result = compute_advantages(
        cfg(use_opd=True), np.zeros(1), np.zeros(1), old, teacher_logprobs=teacher, loss_masks=mask
    )
    assert result.advantages[0] == approx([-1.0, 0.0, -3.0])
    # (1 + 3) / 2: the masked token is not counted.
    assert result.opd_reverse_kl == pytest.approx(2.0)
    assert result.teacher_logprob_mean == pytest.approx(-3.0)


def test_normalize_advantages_runs_after_opd():
    old, teacher = [lp(-1.0, -1.0), lp(-1.0)], [lp(-2.0, -1.0), lp(-4.0)]
    config = cfg(use_opd=True, normalize_advantages=True)
    result = compute_advantages(config, np.ones(2), np.zeros(2), old, teacher_logprobs=teacher)
    penalised = np.array([-1.0, 0.0, -3.0])  # grpo base 0 (equal rewards), minus the reverse KL
    mean, std = penalised.mean(), penalised.std(ddof=1)
    expected = (penalised - mean) / math.sqrt(std**2 + 1e-8)
    assert np.concatenate(result.advantages) == approx(expected)
    # Whitening before the penalty would have left these as the raw -KL values.
    assert not np.allclose(np.concatenate(result.advantages), penalised)


def test_use_opd_without_teacher_is_an_error():
    with pytest.raises(
        ValueError, match="use_opd is true but compute_advantages got no teacher_logprobs"
    ):
        compute_advantages(cfg(use_opd=True), np.ones(1), np.zeros(1), [lp(-1)])


# ------------------------------------------------------------------------------------ ppo


def test_gae_hand_computed():
    # gamma = lambda = 1: A_1 = 1 - 0.2 = 0.8, A_0 = (0.2 - 0.5) + 0.8 = 0.5; returns = A + V.
    advantages, returns = gae(1.0, np.array([0.5, 0.2]), np.ones(2), gamma=1.0, lambd=1.0)
    assert advantages == approx([0.5, 0.8])
    assert returns == approx([1.0, 1.0])
    # gamma 0.9, lambda 0.5: delta_0 = 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.45 * 0.8 = 0.04.
    advantages, returns = gae(1.0, np.array([0.5, 0.2]), np.ones(2), gamma=0.9, lambd=0.5)
    assert advantages == approx([0.04, 0.8])
    assert returns == approx([0.54, 1.0])


def test_ppo_with_opd_and_mask():
    old, teacher = [lp(-1.0, -1.0, -1.0), lp(-1.0)], [lp(-1.5, -1.0, -9.0), lp(-1.0)]
    values = [np.array([0.5, 0.2, 0.7]), np.array([0.3])]
    # Third token of sample 0 is outside the loss mask: the reward lands on token 1.
    masks = [np.array([1, 1, 0]), np.array([1])]
    result = compute_advantages(
        cfg("ppo", use_opd=True),
        np.array([1.0, 0.0]),
        np.zeros(2),
        old,
        teacher_logprobs=teacher,
        values=values,
        loss_masks=masks,
    )
    # Sample 0: t2: delta = 0 - 0.7 = -0.7; t1: delta = 1 + 0.7 - 0.2 = 1.5, A = 1.5 - 0.7 = 0.8;
    # t0: delta = 0.2 - 0.5 = -0.3, A = 0.5. OPD: token 0 has KL 0.5.
    assert result.advantages[0] == approx([0.5 - 0.5, 0.8, 0.0])
    assert result.returns[0] == approx([1.0, 1.0, 0.0])  # returns carry no OPD penalty
    assert result.advantages[1] == approx([-0.3])
    assert result.returns[1] == approx([0.0])


def test_ppo_needs_values():
    with pytest.raises(ValueError, match="ppo needs critic values"):
        compute_advantages(cfg("ppo"), np.ones(1), np.zeros(1), [lp(-1)])


# ---------------------------------------------------------------------------- reinforce++


def test_discounted_returns():
    assert discounted_returns(1.0, np.ones(3), 0.5) == approx([0.25, 0.5, 1.0])
    assert discounted_returns(2.0, np.array([1, 1, 0]), 0.5) == approx([1.0, 2.0, 0.0])
    assert discounted_returns(2.0, np.zeros(2), 0.5) == approx([0.0, 0.0])


def test_reinforce_plus_plus_whitens_discounted_returns():
    old = [lp(-1, -1, -1), lp(-1)]
    result = compute_advantages(
        cfg("reinforce_plus_plus", gamma=0.5), np.array([1.0, 0.0]), np.zeros(2), old
    )
    raw = np.array([0.25, 0.5, 1.0, 0.0])
    mean = 0.4375  # raw.mean()
    var = (0.1875**2 + 0.0625**2 + 0.5625**2 + 0.4375**2) / 3  # unbiased
    assert np.concatenate(result.advantages) == approx((raw - mean) / math.sqrt(var + 1e-8))


def test_reinforce_plus_plus_baseline_subtracts_group_mean_then_whitens():
    old = [lp(-1, -1), lp(-1)]
    result = compute_advantages(
        cfg("reinforce_plus_plus_baseline"), np.array([1.0, 0.0]), np.zeros(2), old
    )
    # centred [0.5, 0.5 | -0.5]; mean 1/6; unbiased var 1/3.
    scale = 1 / math.sqrt(1 / 3 + 1e-8)
    assert np.concatenate(result.advantages) == approx(np.array([1 / 3, 1 / 3, -2 / 3]) * scale)


# ------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize(
    "estimator", ["grpo", "gspo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"]
)
@pytest.mark.parametrize("use_opd", [False, True])
def test_length_one_and_zero_length_responses(estimator, use_opd):
    old = [lp(-1.0), lp(), lp(-1.0, -1.0)]
    teacher = [lp(-2.0), lp(), lp(-1.0, -3.0)]
    values = [np.array([0.5]), np.array([]), np.array([0.1, 0.2])]
    result = compute_advantages(
        cfg(estimator, use_opd=use_opd),
        np.array([1.0, 0.0, 0.0]),
        np.zeros(3),
        old,
        teacher_logprobs=teacher,
        values=values,
    )
    assert [len(a) for a in result.advantages] == [1, 0, 2]
    assert all(np.all(np.isfinite(a)) for a in result.advantages)
    if result.returns is not None:
        assert [len(r) for r in result.returns] == [1, 0, 2]
    assert result.opd_reverse_kl == pytest.approx((1.0 + 0.0 + 2.0) / 3)


def test_all_responses_empty():
    result = compute_advantages(
        cfg(use_opd=True), np.zeros(2), np.zeros(2), [lp(), lp()], teacher_logprobs=[lp(), lp()]
    )
    assert [len(a) for a in result.advantages] == [0, 0]
    assert math.isnan(result.opd_reverse_kl)


def test_empty_batch():
    result = compute_advantages(cfg(), np.zeros(0), np.zeros(0), [])
    assert result.advantages == []


def test_masked_tokens_get_zero_advantage():
    result = compute_advantages(
        cfg(),
        np.array([1.0, 0.0]),
        np.zeros(2),
        [lp(-1, -1), lp(-1, -1)],
        loss_masks=[np.array([0, 1]), np.array([1, 0])],
    )
    assert result.advantages[0] == approx([0.0, math.sqrt(0.5)])
    assert result.advantages[1] == approx([-math.sqrt(0.5), 0.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"teacher_logprobs": [lp(-1.0)]},
            r"teacher_logprobs\[0\] has 1 values for 2 response tokens",
        ),
        (
            {"teacher_logprobs": [lp(-1.0, np.nan)]},
            r"teacher_logprobs\[0\] is nan at response token 1",
        ),
        ({"loss_masks": [np.ones(2), np.ones(2)]}, "loss_masks has 2 rows for 1 samples"),
        ({"rewards": np.ones(2)}, "2 rewards and 1 group ids for 1 samples"),
    ],
)
def test_bad_input_names_the_field(kwargs, message):
    args = {"rewards": np.ones(1), "teacher_logprobs": None, "loss_masks": None} | kwargs
    with pytest.raises(ValueError, match=message):
        compute_advantages(
            cfg(),
            args["rewards"],
            np.zeros(1),
            [lp(-1.0, -1.0)],
            teacher_logprobs=args["teacher_logprobs"],
            loss_masks=args["loss_masks"],
        )


def test_nan_outside_the_mask_is_allowed():
    result = compute_advantages(
        cfg(use_opd=True),
        np.zeros(1),
        np.zeros(1),
        [lp(-1.0, -1.0)],
        teacher_logprobs=[lp(-2.0, np.nan)],
        loss_masks=[np.array([1, 0])],
    )
    assert result.advantages[0] == approx([-1.0, 0.0])


def test_batched_gae_matches_a_per_sample_loop():
    rng = np.random.default_rng(0)
    lengths = [5, 0, 1, 9]
    values = [rng.normal(size=n) for n in lengths]
    masks = [(rng.random(n) > 0.3).astype(float) for n in lengths]
    rewards = rng.normal(size=len(lengths))
    result = compute_advantages(
        cfg("ppo", gamma=0.95, lambd=0.9),
        rewards,
        np.arange(4),
        [np.zeros(n) for n in lengths],
        values=values,
        loss_masks=masks,
    )
    for reward, value, mask, got, got_returns in zip(
        rewards, values, masks, result.advantages, result.returns
    ):
        token_rewards = np.zeros(len(value))
        if mask.any():
            token_rewards[np.flatnonzero(mask)[-1]] = reward
        expected, running = np.zeros(len(value)), 0.0
        for t in reversed(range(len(value))):
            next_value = value[t + 1] if t + 1 < len(value) else 0.0
            running = token_rewards[t] + 0.95 * next_value - value[t] + 0.95 * 0.9 * running
            expected[t] = running
        assert got == approx(expected * mask, rel=1e-4, abs=1e-5)
        assert got_returns == approx(expected + value, rel=1e-4, abs=1e-5)
