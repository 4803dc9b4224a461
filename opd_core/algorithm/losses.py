"""Policy and value losses for the training actor (torch), and the one `masked_mean` helper.

    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask, cfg.algorithm,
                                ref_logprobs=ref_logprobs, entropy=entropy)
    loss.backward()

All per-token tensors are `[batch, tokens]`, padded, with `mask` = 1 on response tokens that
count (padding and tokens outside the loss mask are 0). Reductions are masked token means
over the whole micro-batch. Formulas and names follow slime (`slime/utils/ppo_utils.py`):

- PPO clip: ratio = exp(logprobs - old_logprobs), loss = max(-ratio*A, -clip(ratio, 1-eps_clip,
  1+eps_clip_high)*A); dual clip (`eps_clip_c`) bounds the loss at -eps_clip_c*A for A < 0.
- GSPO: the same clip on a sequence-level ratio exp(mean_t(logprobs - old_logprobs)) shared by
  every token of a sequence (the advantages are grpo's).
- KL loss to the reference (`use_kl_loss`): k1 = log(p/p_ref); k3 = low_var_kl =
  p_ref/p - 1 - log(p_ref/p) (Schulman's unbiased, non-negative estimator); low_var_kl is
  clamped to [-10, 10].
- Entropy bonus: loss -= entropy_coef * mean entropy.
"""

from __future__ import annotations

import numpy as np
import torch

from opd_core.config import AlgorithmConfig

__all__ = ["approx_kl", "masked_mean", "policy_loss", "topk_reverse_kl", "value_loss"]


def masked_mean(values, mask, dim: int | None = None):
    """Mean of `values` where `mask` is 1 (torch or numpy); an empty mask gives 0, never NaN.

    With `dim`, the mean is taken along that axis (per sequence for `dim=-1`).
    """
    if isinstance(values, torch.Tensor):
        mask = mask.to(values.dtype)
        if dim is None:
            return (values * mask).sum() / mask.sum().clamp(min=1)
        return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)
    values = np.asarray(values, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    if dim is None:
        return float((values * mask).sum() / max(mask.sum(), 1.0))
    return (values * mask).sum(dim) / np.maximum(mask.sum(dim), 1.0)


def approx_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kl_type == "k1":
        return log_ratio
    if kl_type in ("k3", "low_var_kl"):
        kl = torch.exp(-log_ratio) - 1 + log_ratio
        # Clamped for low_var_kl only, as slime does: a huge ratio must not blow up the loss.
        return kl.clamp(-10, 10) if kl_type == "low_var_kl" else kl
    raise ValueError(f"unknown kl_loss_type {kl_type!r} (expected k1, k3 or low_var_kl)")


def _check_shapes(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"policy_loss needs [batch, tokens] tensors of one shape, got {shapes}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: AlgorithmConfig,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The actor's loss (differentiable through `logprobs`/`entropy`) and its metrics as floats.

    `old_logprobs`, `advantages` and `ref_logprobs` are treated as constants.
    """
    _check_shapes(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    mask = mask.to(logprobs.dtype)
    old_logprobs, advantages = (
        old_logprobs.detach().to(logprobs.dtype),
        advantages.detach().to(logprobs.dtype),
    )

    log_ratio = logprobs - old_logprobs
    if cfg.advantage_estimator == "gspo":
        # One ratio per sequence: the geometric mean of its token ratios, broadcast to its tokens.
        log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    eps_low = cfg.eps_clip
    eps_high = cfg.eps_clip if cfg.eps_clip_high is None else cfg.eps_clip_high
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    token_losses = torch.maximum(unclipped, clipped)
    clip_frac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    if cfg.eps_clip_c is not None:
        # Dual clip: for negative advantages the loss is bounded by -eps_clip_c * A, so a
        # very large ratio on a bad token cannot dominate the update.
        bounded = torch.minimum(token_losses, -cfg.eps_clip_c * advantages)
        token_losses = torch.where(advantages < 0, bounded, token_losses)
    pg_loss = masked_mean(token_losses, mask)
    loss = pg_loss

    metrics = {
        "pg_loss": pg_loss.item(),
        "clip_frac": clip_frac.item(),
        "ppo_kl": masked_mean(-log_ratio.detach(), mask).item(),  # slime's ppo_kl = old - new
    }
    # Every metric key is always present (NaN = not computed) so rows aggregate into one schema.
    metrics["entropy"] = metrics["kl_loss"] = float("nan")
    if entropy is not None:
        entropy_mean = masked_mean(entropy, mask)
        metrics["entropy"] = entropy_mean.item()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * entropy_mean
    if cfg.use_kl_loss and ref_logprobs is None:
        raise ValueError("algorithm.use_kl_loss is true but policy_loss got no ref_logprobs")
    # Logged whenever a reference is given, optimised only with use_kl_loss.
    if ref_logprobs is not None:
        kl_loss = masked_mean(approx_kl(logprobs, ref_logprobs.detach(), cfg.kl_loss_type), mask)
        metrics["kl_loss"] = kl_loss.item()
        if cfg.use_kl_loss:
            loss = loss + cfg.kl_loss_coef * kl_loss
    metrics["loss"] = loss.item()
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped critic loss 0.5 * mean(max((v - R)^2, (v_clipped - R)^2)), with v_clipped
    within old_values +- value_clip."""
    mask = mask.to(values.dtype)
    old_values, returns = old_values.detach().to(values.dtype), returns.detach().to(values.dtype)
    unclipped = (values - returns) ** 2
    if value_clip is None:
        token_losses, clip_frac = unclipped, values.new_zeros(())
    else:
        clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
        clipped = (clipped_values - returns) ** 2
        token_losses = torch.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    loss = 0.5 * masked_mean(token_losses, mask)
    metrics = {
        "value_loss": loss.item(),
        "value_clip_frac": clip_frac.item(),
        "value_mean": masked_mean(values.detach(), mask).item(),
    }
    return loss, metrics


def topk_reverse_kl(
    student_topk_logprobs: torch.Tensor, teacher_topk_logprobs: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Reverse KL(student || teacher) per token over the teacher's top-k support plus "the rest".

    Both distributions are coarsened to k + 1 outcomes: the teacher's k most likely tokens and
    one bucket for everything else (1 - their total probability). That is a proper KL, a lower
    bound on the full-vocabulary one, and it still penalises student mass outside the top-k
    (which renormalising over the k tokens alone would ignore). Inputs [..., k] -> [...].
    """

    def with_rest(logprobs: torch.Tensor) -> torch.Tensor:
        covered = torch.logsumexp(logprobs, dim=-1, keepdim=True)
        rest = torch.log(torch.clamp(-torch.expm1(torch.clamp(covered, max=0.0)), min=eps))
        return torch.cat([logprobs, rest], dim=-1)

    student, teacher = (
        with_rest(student_topk_logprobs.float()),
        with_rest(teacher_topk_logprobs.float()),
    )
    return (student.exp() * (student - teacher)).sum(-1)
