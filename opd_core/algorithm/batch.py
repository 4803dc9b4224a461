"""What the driver hands the training actors for one round: token ids and per-token arrays.

Samples are ragged (each its own prompt and response length); the actor pads them. Every
per-token array is aligned with `response_ids[i]` (same length, possibly 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainBatch:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: list[np.ndarray] = field(default_factory=list)  # float32, per response token
    # Policy log-probs before the update.
    old_logprobs: list[np.ndarray] = field(default_factory=list)
    ref_logprobs: list[np.ndarray] | None = None  # reference model, for the KL loss
    returns: list[np.ndarray] | None = None  # ppo: critic targets
    old_values: list[np.ndarray] | None = None  # ppo: critic values before the update
    loss_masks: list[np.ndarray] | None = (
        None  # 1 = token counts in the loss; None = all response tokens
    )
    teacher_topk_ids: list[np.ndarray] | None = None  # top-k OPD: [len(response), k] int32
    teacher_topk_logprobs: list[np.ndarray] | None = None  # top-k OPD: [len(response), k] float32
    # The teacher's log-prob of each sampled token (OPD): the actor reports the reverse KL.
    teacher_logprobs: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __post_init__(self) -> None:
        if len(self.prompt_ids) != len(self.response_ids):
            raise ValueError(
                f"{len(self.prompt_ids)} prompts but {len(self.response_ids)} responses"
            )
        for name in (
            "advantages",
            "old_logprobs",
            "ref_logprobs",
            "returns",
            "old_values",
            "loss_masks",
            "teacher_topk_ids",
            "teacher_topk_logprobs",
            "teacher_logprobs",
        ):
            arrays = getattr(self, name)
            if not arrays:
                continue
            if len(arrays) != len(self):
                raise ValueError(f"TrainBatch.{name} has {len(arrays)} rows, expected {len(self)}")
            for row, (array, response) in enumerate(zip(arrays, self.response_ids)):
                if len(array) != len(response):
                    raise ValueError(
                        f"TrainBatch.{name}[{row}] has {len(array)} values for "
                        f"{len(response)} response tokens"
                    )

    def select(self, rows: list[int] | np.ndarray) -> TrainBatch:
        """The sub-batch of `rows` (for micro-batches and data-parallel shards)."""
        pick = lambda xs: None if xs is None else ([xs[i] for i in rows] if xs else [])
        return TrainBatch(
            prompt_ids=pick(self.prompt_ids),
            response_ids=pick(self.response_ids),
            advantages=pick(self.advantages),
            old_logprobs=pick(self.old_logprobs),
            ref_logprobs=pick(self.ref_logprobs),
            returns=pick(self.returns),
            old_values=pick(self.old_values),
            loss_masks=pick(self.loss_masks),
            teacher_topk_ids=pick(self.teacher_topk_ids),
            teacher_topk_logprobs=pick(self.teacher_topk_logprobs),
            teacher_logprobs=pick(self.teacher_logprobs),
        )
