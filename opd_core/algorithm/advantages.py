"""Per-token advantages for every estimator, with the on-policy distillation penalty on top.

    result = compute_advantages(cfg.algorithm, rewards, group_ids, old_logprobs,
                                teacher_logprobs=teacher_logprobs, loss_masks=loss_masks)
    batch.advantages, batch.returns = result.advantages, result.returns

Inputs are per sample (ragged): `rewards[i]` a scalar, `group_ids[i]` the prompt it answers,
and per response token arrays `old_logprobs[i]` (the student's recomputed log-probs before the
update), `teacher_logprobs[i]`, `values[i]` (ppo critic), `loss_masks[i]` (1 = the token is
trained; default all ones). Order of operations, as in slime's `compute_advantages_and_returns`:

1. the estimator:
   - grpo / gspo: (r - group mean) / (group std + 1e-6) broadcast to every token (unbiased std,
     `grpo_std_normalization`); a group of one sample gets 0.
   - ppo: the reward on the last trained token, GAE(gamma, lambd) against `values`;
     returns = advantages + values (the critic's targets).
   - reinforce_plus_plus: discounted return of the reward placed on the last trained token,
     then whitened over all trained tokens of the batch;
     reinforce_plus_plus_baseline: (r - group mean) broadcast, then whitened.
2. OPD (when `use_opd`): `OPDTerm.penalize`, i.e. A_t -= opd_kl_coef * (old_logprob_t -
   teacher_logprob_t) on trained tokens for sampled-token OPD; top-k OPD adds no penalty (its
   term is the actor's dense loss, see opd_core/algorithm/opd.py).
3. optional `normalize_advantages`: whitening over all trained tokens of the batch.

Advantages of tokens outside the loss mask are 0. Zero-length responses give empty arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from opd_core.algorithm.losses import masked_mean
from opd_core.algorithm.opd import OPDTerm
from opd_core.config import AlgorithmConfig

__all__ = [
    "AdvantageResult",
    "compute_advantages",
    "discounted_returns",
    "gae",
    "gae_batch",
    "group_normalized_rewards",
    "masked_whiten",
]

GRPO_EPS = 1e-6  # slime: rewards / (std + 1e-6)
WHITEN_EPS = 1e-8  # slime: (x - mean) * rsqrt(var + 1e-8)


@dataclass
class AdvantageResult:
    advantages: list[np.ndarray]  # float32 per response token; 0 outside the loss mask
    returns: list[np.ndarray] | None  # ppo: critic targets (without the OPD penalty); else None
    opd_reverse_kl: float  # masked mean of old_logprobs - teacher_logprobs; NaN without a teacher
    teacher_logprob_mean: float  # masked mean teacher log-prob of the student's tokens; NaN without
    reverse_kl: list[np.ndarray] | None = None  # per token old - teacher (for per-sample plots)
    metrics: dict[str, float] = field(default_factory=dict)  # advantage mean/std/abs, reward mean


def group_normalized_rewards(
    rewards: np.ndarray, group_ids: np.ndarray, divide_by_std: bool = True
) -> np.ndarray:
    """Each reward minus its group's mean, divided by the group's unbiased std + 1e-6 if asked.

    A group of one sample has no baseline to compare with: its score is 0.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    scores = np.zeros_like(rewards)
    for group in np.unique(group_ids):
        members = np.flatnonzero(group_ids == group)
        if len(members) < 2:
            continue
        centred = rewards[members] - rewards[members].mean()
        if divide_by_std:
            centred = centred / (rewards[members].std(ddof=1) + GRPO_EPS)
        scores[members] = centred
    return scores


def _last_trained_token(mask: np.ndarray) -> int | None:
    trained = np.flatnonzero(mask)
    return int(trained[-1]) if len(trained) else None


def discounted_returns(reward: float, mask: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = gamma^(T-t) * reward for t <= T, the last trained token, and 0 after it."""
    returns = np.zeros(len(mask), dtype=np.float64)
    last = _last_trained_token(mask)
    if last is not None:
        returns[: last + 1] = reward * gamma ** np.arange(last, -1, -1, dtype=np.float64)
    return returns


def gae(
    reward: float, values: np.ndarray, mask: np.ndarray, gamma: float, lambd: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation of one sample with the reward on the last trained token.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token = 0),
    A_t = delta_t + gamma * lambd * A_{t+1}; returns = A + V.
    """
    advantages, returns = gae_batch(
        np.array([reward]), [np.asarray(values)], [np.asarray(mask)], gamma, lambd
    )
    return advantages[0], returns[0]


def gae_batch(
    rewards: np.ndarray,
    values: list[np.ndarray],
    masks: list[np.ndarray],
    gamma: float,
    lambd: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`gae` for a ragged batch: one backward pass over time, vectorised over samples.

    Padding is all zeros, so past a sample's end delta = 0 and its running sum stays 0: the
    recursion starts at each sample's own last token with V_{T} = 0.
    """
    lengths = [len(v) for v in values]
    width = max(lengths, default=0)
    padded_values = np.zeros((len(values), width + 1))
    token_rewards = np.zeros((len(values), width))
    for row, (reward, value, mask) in enumerate(zip(rewards, values, masks)):
        padded_values[row, : len(value)] = value
        last = _last_trained_token(mask)
        if last is not None:
            token_rewards[row, last] = reward
    advantages = np.zeros((len(values), width))
    running = np.zeros(len(values))
    for t in range(width - 1, -1, -1):
        delta = token_rewards[:, t] + gamma * padded_values[:, t + 1] - padded_values[:, t]
        running = delta + gamma * lambd * running
        advantages[:, t] = running
    returns = advantages + padded_values[:, :width]
    return [advantages[i, :n] for i, n in enumerate(lengths)], [
        returns[i, :n] for i, n in enumerate(lengths)
    ]


def masked_whiten(arrays: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
    """(x - mean) / sqrt(var + 1e-8) with mean and Bessel-corrected var over all masked tokens."""
    if not arrays:
        return []
    flat, flat_mask = np.concatenate(arrays), np.concatenate(masks)
    count = flat_mask.sum()
    if count == 0:
        return [np.array(a, dtype=np.float64) for a in arrays]
    mean = (flat * flat_mask).sum() / count
    var = (((flat - mean) ** 2) * flat_mask).sum() / count
    if count >= 2:
        var = var * count / (count - 1)
    scale = 1.0 / math.sqrt(var + WHITEN_EPS)
    return [(a - mean) * scale for a in arrays]


def _as_float_arrays(
    name: str, arrays: Sequence | None, lengths: list[int]
) -> list[np.ndarray] | None:
    if arrays is None:
        return None
    if len(arrays) != len(lengths):
        raise ValueError(f"{name} has {len(arrays)} rows for {len(lengths)} samples")
    out = []
    for row, (array, length) in enumerate(zip(arrays, lengths)):
        array = np.asarray(array, dtype=np.float64).reshape(-1)
        if len(array) != length:
            raise ValueError(f"{name}[{row}] has {len(array)} values for {length} response tokens")
        out.append(array)
    return out


def _finite_where_trained(
    name: str, arrays: list[np.ndarray], masks: list[np.ndarray]
) -> list[np.ndarray]:
    """Raise on a non-finite value of a trained token; zero untrained ones (NaN * 0 is NaN)."""
    for row, (array, mask) in enumerate(zip(arrays, masks)):
        bad = np.flatnonzero(~np.isfinite(array) & (mask > 0))
        if len(bad):
            raise ValueError(
                f"{name}[{row}] is {array[bad[0]]} at response token {bad[0]} (must be finite)"
            )
    return [np.where(mask > 0, array, 0.0) for array, mask in zip(arrays, masks)]


def compute_advantages(
    cfg: AlgorithmConfig,
    rewards: np.ndarray,
    group_ids: np.ndarray,
    old_logprobs: list[np.ndarray] | None,
    teacher_logprobs: list[np.ndarray] | None = None,
    values: list[np.ndarray] | None = None,
    loss_masks: list[np.ndarray] | None = None,
    response_lengths: Sequence[int] | None = None,
) -> AdvantageResult:
    """Advantages (and ppo returns) of one round's samples; see the module docstring.

    `old_logprobs` None (with `response_lengths`): the round is one on-policy optimizer step
    and nothing here reads them; the actor reports `opd_reverse_kl` from its own forward."""
    if old_logprobs is None:
        if response_lengths is None:
            raise ValueError("compute_advantages needs old_logprobs or response_lengths")
        lengths = [int(n) for n in response_lengths]
    else:
        lengths = [len(np.asarray(x).reshape(-1)) for x in old_logprobs]
    num_samples = len(lengths)
    rewards = np.asarray(rewards, dtype=np.float64).reshape(-1)
    group_ids = np.asarray(group_ids).reshape(-1)
    if len(rewards) != num_samples or len(group_ids) != num_samples:
        raise ValueError(
            f"{len(rewards)} rewards and {len(group_ids)} group ids for {num_samples} samples"
        )
    if not np.all(np.isfinite(rewards)):
        raise ValueError(f"reward {int(np.flatnonzero(~np.isfinite(rewards))[0])} is not finite")
    old = _as_float_arrays("old_logprobs", old_logprobs, lengths)
    teacher = _as_float_arrays("teacher_logprobs", teacher_logprobs, lengths)
    critic = _as_float_arrays("values", values, lengths)
    masks = _as_float_arrays("loss_masks", loss_masks, lengths) or [np.ones(n) for n in lengths]
    masks = [(m > 0).astype(np.float64) for m in masks]
    if old is not None:
        old = _finite_where_trained("old_logprobs", old, masks)
    if teacher is not None:
        teacher = _finite_where_trained("teacher_logprobs", teacher, masks)
    if critic is not None:  # GAE reads every value, trained token or not
        critic = _finite_where_trained("values", critic, [np.ones_like(v) for v in critic])
    opd = OPDTerm.from_config(cfg)
    if opd is not None and teacher is None:
        raise ValueError("algorithm.use_opd is true but compute_advantages got no teacher_logprobs")
    if opd is not None and not opd.dense and old is None:
        raise ValueError("sampled-token OPD penalizes advantages with the old log-probs: pass them")

    estimator, returns = cfg.advantage_estimator, None
    if estimator in ("grpo", "gspo"):
        scores = group_normalized_rewards(
            rewards, group_ids, divide_by_std=cfg.grpo_std_normalization
        )
        advantages = [np.full(n, score) for n, score in zip(lengths, scores)]
    elif estimator == "reinforce_plus_plus_baseline":
        scores = group_normalized_rewards(rewards, group_ids, divide_by_std=False)
        advantages = masked_whiten([np.full(n, score) for n, score in zip(lengths, scores)], masks)
    elif estimator == "reinforce_plus_plus":
        advantages = masked_whiten(
            [discounted_returns(r, m, cfg.gamma) for r, m in zip(rewards, masks)], masks
        )
    elif estimator == "ppo":
        if critic is None:
            raise ValueError("advantage_estimator=ppo needs critic values per response token")
        advantages, returns = gae_batch(rewards, critic, masks, cfg.gamma, cfg.lambd)
        returns = [ret.astype(np.float32) for ret in returns]
    else:  # pragma: no cover - the config's Literal rejects anything else
        raise ValueError(f"unknown advantage_estimator {estimator!r}")

    reverse_kl, opd_reverse_kl, teacher_mean = None, float("nan"), float("nan")
    if teacher is not None:
        trained = sum(m.sum() for m in masks) > 0
        if trained:
            teacher_mean = masked_mean(np.concatenate(teacher), np.concatenate(masks))
        if old is not None:
            reverse_kl = [o - t for o, t in zip(old, teacher)]
            if trained:
                opd_reverse_kl = masked_mean(np.concatenate(reverse_kl), np.concatenate(masks))
        if opd is not None:
            advantages = opd.penalize(advantages, reverse_kl, masks)
    if cfg.normalize_advantages:
        advantages = masked_whiten(advantages, masks)
    advantages = [(a * m).astype(np.float32) for a, m in zip(advantages, masks)]

    metrics = {"reward_mean": float(rewards.mean()) if num_samples else float("nan")}
    if any(lengths):
        flat, flat_mask = np.concatenate(advantages), np.concatenate(masks)
        mean = masked_mean(flat, flat_mask)
        metrics["advantage_mean"] = mean
        metrics["advantage_std"] = math.sqrt(masked_mean((flat - mean) ** 2, flat_mask))
        metrics["advantage_abs_mean"] = masked_mean(np.abs(flat), flat_mask)
    return AdvantageResult(
        advantages=advantages,
        returns=returns,
        opd_reverse_kl=opd_reverse_kl,
        teacher_logprob_mean=teacher_mean,
        reverse_kl=None if reverse_kl is None else [kl.astype(np.float32) for kl in reverse_kl],
        metrics=metrics,
    )
