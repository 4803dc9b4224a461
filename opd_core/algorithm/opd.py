"""The on-policy distillation term: one object, both of its forms.

    opd = OPDTerm.from_config(cfg.algorithm)                 # None without algorithm.use_opd
    advantages = opd.penalize(advantages, reverse_kl, masks)  # driver side, before the step
    loss, kl = opd.dense_loss(student_topk, teacher_topk, mask)  # actor side, inside the step

- sampled-token OPD (`opd_topk: 0`, slime's): the reverse KL of the sampled token is a
  penalty on its advantage, A_t <- A_t - opd_kl_coef * (log p_student(y_t) - log p_teacher(y_t)),
  with the student's "old" log-probs (plain arrays: no gradient flows through the penalty).
- top-k OPD (`opd_topk: k`): no advantage penalty; instead a dense loss, opd_kl_coef x the
  reverse KL over the teacher's top-k support (+ one bucket for the rest), differentiated
  through the student's log-probs of those k tokens.

Either way the sampled-token reverse KL is reported as the round's `opd_reverse_kl` metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from opd_core.algorithm.losses import masked_mean, topk_reverse_kl
from opd_core.config import AlgorithmConfig

__all__ = ["OPDTerm"]


@dataclass(frozen=True)
class OPDTerm:
    coef: float
    # 0 = the sampled-token penalty on advantages; k > 0 = the dense top-k loss.
    topk: int = 0

    @classmethod
    def from_config(cls, algorithm: AlgorithmConfig) -> OPDTerm | None:
        if not algorithm.use_opd:
            return None
        return cls(coef=algorithm.opd_kl_coef, topk=algorithm.opd_topk)

    @property
    def dense(self) -> bool:
        """True when the term is a loss in the actor (top-k), not an advantage penalty."""
        return self.topk > 0

    def penalize(
        self,
        advantages: Sequence[np.ndarray],
        reverse_kl: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
    ) -> list[np.ndarray]:
        """Advantages with the sampled-token penalty on trained tokens (unchanged in top-k mode)."""
        if self.dense:
            return list(advantages)
        return [a - self.coef * kl * m for a, kl, m in zip(advantages, reverse_kl, masks)]

    def dense_loss(
        self,
        student_topk_logprobs: torch.Tensor,
        teacher_topk_logprobs: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted loss, the masked-mean top-k reverse KL) of one micro-batch, [b, t, k] in."""
        if not self.dense:
            raise ValueError("OPDTerm.dense_loss: sampled-token OPD has no dense loss (opd_topk=0)")
        per_token = topk_reverse_kl(student_topk_logprobs, teacher_topk_logprobs)
        kl = masked_mean(per_token, mask)
        return self.coef * kl, kl
