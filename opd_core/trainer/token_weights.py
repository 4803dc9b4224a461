"""How one global batch's token-mean loss is split over micro-batches and data-parallel ranks.

Each micro-batch's loss is weighted by its share of the global batch's loss tokens
(`weighted_by_tokens`), so gradient accumulation over micro-batches and the sum over
data-parallel ranks give exactly the token mean of the global batch, whatever TP/PP/DP and
micro-batch sizes are chosen; metrics are token-weighted the same way and reduced by
`token_mean`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from opd_core.algorithm.batch import TrainBatch


def with_loss_masks(batch: TrainBatch) -> TrainBatch:
    """The batch with explicit loss masks (all response tokens where none are given)."""
    if batch.loss_masks:
        return batch
    return replace(
        batch, loss_masks=[np.ones(len(r), dtype=np.float32) for r in batch.response_ids]
    )


def global_tokens_of(batch: TrainBatch) -> float:
    """Loss tokens in the whole global batch (this shard's, summed over data-parallel ranks)."""
    local = float(sum(np.asarray(m, dtype=np.float64).sum() for m in batch.loss_masks))
    return dp_sum(torch.tensor([local], dtype=torch.float64))[0].item()


def weighted_by_tokens(loss: torch.Tensor, metrics: dict, mask: torch.Tensor, global_tokens: float):
    """The micro-batch's loss weighted by its share of the global tokens, so gradient accumulation
    and the sum over DP ranks give exactly the token mean of the global batch; its metrics
    token-weighted likewise (summed by `_token_mean`)."""
    tokens = float(mask.sum())
    # {}: nothing to average.
    weighted = {key: value * tokens for key, value in metrics.items()} if tokens else {}
    return loss * (tokens / max(global_tokens, 1.0)), weighted


def token_mean(
    micro_metrics: list[dict], keys: tuple[str, ...], global_tokens: float
) -> dict[str, float]:
    """Token-weighted means over the global batch: summed over micro-batches, pipeline stages
    (only the last has any) and DP ranks, in the same order on every rank (an empty shard too)."""
    counted = [
        m for m in micro_metrics if m
    ]  # NaN where a counted micro-batch did not compute a key
    sums = torch.tensor(
        [sum(m.get(key, float("nan")) for m in counted) for key in keys], dtype=torch.float64
    )
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    totals = dp_sum(sums)
    return {k: float(v) / max(global_tokens, 1.0) for k, v in zip(keys, totals.tolist())}


def dp_sum(values: torch.Tensor) -> torch.Tensor:
    if ps.get_data_parallel_world_size() > 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        values = values.to(device)
        dist.all_reduce(values, group=ps.get_data_parallel_group())
    return values.cpu()
