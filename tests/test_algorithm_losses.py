"""Policy loss (PPO clip, dual clip, GSPO, KL, entropy) and clipped value loss, by hand."""

import math

import numpy as np
import pytest
import torch

from opd_core.algorithm.losses import approx_kl, masked_mean, policy_loss, value_loss
from opd_core.config import AlgorithmConfig


def cfg(**kw):
    return AlgorithmConfig(**({"use_opd": False} | kw))


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def run(logprob_values, advantages, mask=None, old=None, config=None, **kw):
    """policy_loss on [b, t] inputs; returns (loss, metrics, grad wrt logprobs)."""
    logprobs = t(*logprob_values).requires_grad_(True)
    old = torch.zeros_like(logprobs) if old is None else t(*old)
    mask = torch.ones_like(logprobs) if mask is None else t(*mask)
    loss, metrics = policy_loss(logprobs, old, t(*advantages), mask, config or cfg(), **kw)
    loss.backward()
    return loss, metrics, logprobs.grad


def test_masked_mean_torch_and_numpy():
    values, mask = t([1.0, 2.0, 100.0]), t([1.0, 1.0, 0.0])
    assert masked_mean(values, mask).item() == pytest.approx(1.5)
    assert masked_mean(t([1.0, 3.0], [5.0, 7.0]), t([1.0, 1.0], [1.0, 0.0]), dim=-1).tolist() == [
        2.0,
        5.0,
    ]
    assert masked_mean(np.array([1.0, 2.0, 100.0]), np.array([1, 1, 0])) == pytest.approx(1.5)
    assert masked_mean(t([1.0]), t([0.0])).item() == 0.0  # empty mask: 0, not NaN
    assert masked_mean(np.array([]), np.array([])) == 0.0


def test_on_policy_loss_is_minus_mean_advantage():
    loss, metrics, grad = run([[0.0, 0.0, 0.0]], [[1.0, -2.0, 4.0]])
    assert loss.item() == pytest.approx(-1.0)
    assert metrics["pg_loss"] == pytest.approx(-1.0)
    assert metrics["clip_frac"] == 0.0 and metrics["ppo_kl"] == 0.0
    # d/dlogp of -ratio*A/N at ratio 1.
    assert grad[0].tolist() == pytest.approx([-1 / 3, 2 / 3, -4 / 3])


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, clipped",
    [
        (1.5, 1.0, -1.2, True),  # above 1+eps with A>0: clipped, no gradient
        (1.5, -1.0, 1.5, False),  # above 1+eps with A<0: the unclipped (larger) loss stays
        (0.5, 1.0, -0.5, False),  # below 1-eps with A>0: unclipped
        (0.5, -1.0, 0.8, True),  # below 1-eps with A<0: clipped
        (1.1, 1.0, -1.1, False),  # inside the trust region
    ],
)
def test_ppo_clip(ratio, advantage, expected_loss, clipped):
    loss, metrics, grad = run([[math.log(ratio)]], [[advantage]])
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["clip_frac"] == (1.0 if clipped else 0.0)
    assert (grad.abs().item() == 0.0) is clipped
    assert metrics["ppo_kl"] == pytest.approx(-math.log(ratio), rel=1e-5)


def test_eps_clip_high_widens_the_upper_bound():
    _, m_default, _ = run([[math.log(1.25)]], [[1.0]])
    loss, m_high, _ = run([[math.log(1.25)]], [[1.0]], config=cfg(eps_clip_high=0.28))
    assert m_default["clip_frac"] == 1.0 and m_default["pg_loss"] == pytest.approx(-1.2)
    assert m_high["clip_frac"] == 0.0 and loss.item() == pytest.approx(-1.25)


def test_dual_clip_bounds_negative_advantages():
    loss, _, grad = run([[math.log(5.0)]], [[-1.0]], config=cfg(eps_clip_c=3.0))
    assert loss.item() == pytest.approx(3.0)  # min(5, 3 * 1)
    assert grad.item() == 0.0
    loss, _, _ = run([[math.log(5.0)]], [[-1.0]])
    assert loss.item() == pytest.approx(5.0, rel=1e-5)
    loss, _, _ = run([[math.log(5.0)]], [[1.0]], config=cfg(eps_clip_c=3.0))  # A>0: unaffected
    assert loss.item() == pytest.approx(-1.2)


def test_mask_excludes_padding():
    loss, metrics, grad = run(
        [[0.0, 7.0], [0.0, 0.0]], [[2.0, 100.0], [4.0, 6.0]], mask=[[1, 0], [1, 1]]
    )
    assert loss.item() == pytest.approx(-(2.0 + 4.0 + 6.0) / 3)
    assert grad[0, 1].item() == 0.0
    assert metrics["ppo_kl"] == 0.0


def test_fully_masked_batch_is_zero_not_nan():
    loss, metrics, grad = run([[0.3, 0.1]], [[1.0, 1.0]], mask=[[0, 0]])
    assert loss.item() == 0.0 and not math.isnan(metrics["clip_frac"])
    assert torch.all(grad == 0)


def test_gspo_uses_one_sequence_ratio():
    logprobs, advantages = [[0.1, 0.3], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]
    loss, metrics, _ = run(
        logprobs, advantages, config=cfg(advantage_estimator="gspo", eps_clip=0.5)
    )
    # Sequence 0 ratio exp(mean(0.1, 0.3)) = exp(0.2) on both tokens; sequence 1 ratio 1.
    assert loss.item() == pytest.approx(-(2 * math.exp(0.2) + 2) / 4, rel=1e-5)
    assert metrics["ppo_kl"] == pytest.approx(-0.2 / 2, rel=1e-5)
    # The masked token is left out of the sequence mean.
    loss, _, grad = run(
        logprobs,
        advantages,
        mask=[[1, 0], [1, 1]],
        config=cfg(advantage_estimator="gspo", eps_clip=0.5),
    )
    assert loss.item() == pytest.approx(-(math.exp(0.1) + 2) / 3, rel=1e-5)
    assert grad[0, 1].item() == 0.0
    # Per-token PPO on the same input differs.
    loss, _, _ = run(logprobs, advantages, config=cfg(eps_clip=0.5))
    assert loss.item() == pytest.approx(-(math.exp(0.1) + math.exp(0.3) + 2) / 4, rel=1e-5)


def test_gspo_clips_the_sequence_ratio():
    # Token log-ratios 0.5 and -0.1: per token only the first would clip; the sequence ratio
    # exp(0.2) > 1.2 clips both.
    _, metrics, grad = run([[0.5, -0.1]], [[1.0, 1.0]], config=cfg(advantage_estimator="gspo"))
    assert metrics["clip_frac"] == 1.0
    assert torch.all(grad == 0)


@pytest.mark.parametrize(
    "kl_type, expected",
    [("k1", 1.0), ("k3", math.exp(-1) - 1 + 1), ("low_var_kl", math.exp(-1))],
)
def test_kl_estimators(kl_type, expected):
    # log p = -1, log p_ref = -2: log ratio 1.
    assert approx_kl(t([-1.0]), t([-2.0]), kl_type).item() == pytest.approx(expected, rel=1e-6)


def test_k3_is_non_negative_and_low_var_kl_is_clamped():
    logprobs, ref = torch.tensor([-21.0, -1.0, -0.5]), torch.tensor([-1.0, -1.0, -3.0])
    k3 = approx_kl(logprobs, ref, "k3")
    assert torch.all(k3 >= 0)
    assert k3[0].item() == pytest.approx(math.exp(20) - 21, rel=1e-5)
    assert approx_kl(logprobs, ref, "low_var_kl")[0].item() == 10.0
    assert approx_kl(logprobs, ref, "k3")[1].item() == 0.0
    with pytest.raises(ValueError, match="unknown kl_loss_type 'k9'"):
        approx_kl(logprobs, ref, "k9")


def test_kl_loss_and_entropy_bonus_are_added():
    config = cfg(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1", entropy_coef=0.1)
    loss, metrics, _ = run(
        [[-1.0, -1.0]],
        [[1.0, 1.0]],
        old=[[-1.0, -1.0]],
        config=config,
        ref_logprobs=t([-2.0, -1.5]),
        entropy=t([2.0, 4.0]),
    )
    pg, kl, entropy = -1.0, (1.0 + 0.5) / 2, 3.0
    assert metrics["pg_loss"] == pytest.approx(pg)
    assert metrics["kl_loss"] == pytest.approx(kl)
    assert metrics["entropy"] == pytest.approx(entropy)
    assert loss.item() == pytest.approx(pg + 0.5 * kl - 0.1 * entropy)
    assert metrics["loss"] == pytest.approx(loss.item())


def test_kl_to_reference_is_logged_without_use_kl_loss():
    loss, metrics, _ = run(
        [[-1.0]], [[1.0]], old=[[-1.0]], ref_logprobs=t([-2.0]), config=cfg(kl_loss_type="k1")
    )
    assert metrics["kl_loss"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(-1.0)
    _, metrics, _ = run([[-1.0]], [[1.0]])
    assert math.isnan(metrics["kl_loss"]) and math.isnan(metrics["entropy"])


def test_use_kl_loss_without_reference_is_an_error():
    with pytest.raises(ValueError, match="use_kl_loss is true but policy_loss got no ref_logprobs"):
        run([[0.0]], [[1.0]], config=cfg(use_kl_loss=True, kl_loss_coef=0.1))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"\[batch, tokens\] tensors of one shape"):
        policy_loss(t([0.0, 0.0]), t([0.0]), t([1.0, 1.0]), t([1.0, 1.0]), cfg())


# ------------------------------------------------------------------------------ value loss


@pytest.mark.parametrize(
    "value, expected_loss, clipped",
    [
        (1.5, 0.5 * (1.2 - 2.0) ** 2, True),  # moved 0.5 from old 1.0, clipped back to 1.2
        (2.5, 0.5 * (1.2 - 2.0) ** 2, True),  # overshoot: the pessimistic clipped error counts
        (1.1, 0.5 * (1.1 - 2.0) ** 2, False),  # within the clip range
        (0.5, 0.5 * (0.5 - 2.0) ** 2, False),  # moved away from the return: unclipped is larger
    ],
)
def test_value_loss_clipping(value, expected_loss, clipped):
    values = t([value]).requires_grad_(True)
    loss, metrics = value_loss(values, t([1.0]), t([2.0]), t([1.0]), value_clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["value_clip_frac"] == (1.0 if clipped else 0.0)
    assert (values.grad.item() == 0.0) is clipped


def test_value_loss_without_clip_and_with_mask():
    values = t([[1.5, 9.0]])
    loss, metrics = value_loss(
        values, t([[1.0, 1.0]]), t([[2.0, 2.0]]), t([[1.0, 0.0]]), value_clip=None
    )
    assert loss.item() == pytest.approx(0.5 * 0.25)
    assert metrics["value_clip_frac"] == 0.0 and metrics["value_mean"] == pytest.approx(1.5)
