"""Micro-batches through Megatron's forward/backward schedules, for any pipeline-parallel size.

    rows = run_forward(model, micro_batches, per_sample)           # inference: per sample
    metrics = run_forward_backward(model, micro_batches, loss_of)  # training: per micro-batch

`per_sample(output, micro) -> list` turns the last stage's output for one micro-batch (logits
[b, s, vocab/tp], or the critic's values [b, s, 1]) into one result per sample.
`loss_of(output, micro) -> (loss, metrics)` gives the micro-batch's loss, already weighted by
its share of the global batch: the models are built with `calculate_per_token_loss`, so the
schedule neither divides it by the number of micro-batches nor does DDP average gradients over
data-parallel ranks (they are summed).

With pipeline parallel 1 the schedule is forward_backward_no_pipelining (a forward and a
backward per micro-batch). With PP > 1 it is Megatron's 1F1B schedule: activations go to the
next stage and gradients come back, as in Megatron-LM, and every micro-batch is padded to its
own length (`variable_seq_lengths`: the stages exchange shapes first). Every stage gets the same
micro-batches; only the last one computes outputs, so the results are on the last stage and
the other stages get []. The micro-batch list must be the same length on every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from opd_core.algorithm.batch import TrainBatch


def _schedule(
    model, micro_batches: list[TrainBatch], on_output: Callable, forward_only: bool
) -> list:
    """What the schedule's loss function returned for each micro-batch (on the last stage)."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from opd_core.megatron.model import forward_logits, pad_batch

    if not micro_batches:  # an empty data-parallel shard: nothing to run on any of its stages
        return []

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        ids, mask, _ = pad_batch(micro.prompt_ids, micro.response_ids)
        return forward_logits(model, ids, mask), partial(on_output, micro=micro)

    longest = max(
        len(p) + len(r)
        for micro in micro_batches
        for p, r in zip(micro.prompt_ids, micro.response_ids)
    )
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=max(longest, 1),  # shapes are exchanged per micro-batch (variable_seq_lengths)
        micro_batch_size=max(len(micro) for micro in micro_batches),
        forward_only=forward_only,
    )


@torch.no_grad()
def run_forward(
    model, micro_batches: list[TrainBatch], per_sample: Callable[[torch.Tensor, TrainBatch], list]
) -> list:
    """Forward only; the per-sample results of every micro-batch in order (on the last stage)."""
    no_tokens = torch.zeros((), dtype=torch.int)

    def on_output(output, micro):
        return torch.zeros(()), no_tokens, per_sample(output, micro)

    model.eval()
    return [
        row
        for rows in _schedule(model, micro_batches, on_output, forward_only=True)
        for row in rows
    ]


def run_forward_backward(
    model,
    micro_batches: list[TrainBatch],
    loss_of: Callable[[torch.Tensor, TrainBatch], tuple[torch.Tensor, dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Forward and backward over every micro-batch (gradients accumulate in the parameters);
    the metrics of each micro-batch in order (on the last stage)."""

    def on_output(output, micro):
        loss, metrics = loss_of(output, micro)
        # The count is only reported back (calculate_per_token_loss): `loss` is already weighted.
        return loss, torch.zeros((), dtype=torch.int), metrics

    model.train()
    return _schedule(model, micro_batches, on_output, forward_only=False)
