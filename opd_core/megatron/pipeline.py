"""Micro-batches through Megatron's forward/backward schedules, for any pipeline-parallel size.

    rows = run_forward(model, micro_batches, per_sample)           # inference: per sample
    metrics = run_forward_backward(model, micro_batches, loss_of)  # training: per micro-batch

Each micro-batch goes in as a `megatron.layout.Layout` (one row per sample, or with
`share_prompts` one row per distinct prompt holding all its samples' responses).
`per_sample(output, micro, layout) -> list` turns the last stage's output for one micro-batch
(`forward_response_logits`: logits [n, vocab/tp] at its n response positions, or the critic's
values [n, 1]) into one result per sample.
`loss_of(output, micro, layout) -> (loss, metrics)` gives the micro-batch's loss, weighted by
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
from opd_core.megatron.layout import Layout


def _schedule(
    model,
    micro_batches: list[TrainBatch],
    on_output: Callable,
    forward_only: bool,
    share_prompts: bool,
) -> list:
    """What the schedule's loss function returned for each micro-batch (on the last stage)."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from opd_core.megatron.model import forward_response_logits

    if not micro_batches:  # an empty data-parallel shard: nothing to run on any of its stages
        return []
    layouts = [
        Layout.of(micro.prompt_ids, micro.response_ids, share_prompts) for micro in micro_batches
    ]

    def forward_step(data_iterator, model):
        micro, layout = next(data_iterator)
        output = forward_response_logits(model, layout)
        return output, partial(on_output, micro=micro, layout=layout)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(zip(micro_batches, layouts)),
        model=[model],
        num_microbatches=len(micro_batches),
        # Shapes are exchanged per micro-batch (variable_seq_lengths).
        seq_length=max(layout.ids.shape[1] for layout in layouts),
        micro_batch_size=max(layout.ids.shape[0] for layout in layouts),
        forward_only=forward_only,
    )


@torch.no_grad()
def run_forward(
    model,
    micro_batches: list[TrainBatch],
    per_sample: Callable[[torch.Tensor, TrainBatch, Layout], list],
    share_prompts: bool = False,
) -> list:
    """Forward only; the per-sample results of every micro-batch in order (on the last stage)."""
    no_tokens = torch.zeros((), dtype=torch.int)

    def on_output(output, micro, layout):
        return torch.zeros(()), no_tokens, per_sample(output, micro, layout)

    _set_training(model, False)
    return [
        row
        for rows in _schedule(model, micro_batches, on_output, True, share_prompts)
        for row in rows
    ]


def run_forward_backward(
    model,
    micro_batches: list[TrainBatch],
    loss_of: Callable[[torch.Tensor, TrainBatch, Layout], tuple[torch.Tensor, dict[str, Any]]],
    share_prompts: bool = False,
) -> list[dict[str, Any]]:
    """Forward and backward over every micro-batch (gradients accumulate in the parameters);
    the metrics of each micro-batch in order (on the last stage)."""

    def on_output(output, micro, layout):
        loss, metrics = loss_of(output, micro, layout)
        # The count is only reported back (calculate_per_token_loss): `loss` is already weighted.
        return loss, torch.zeros((), dtype=torch.int), metrics

    _set_training(model, True)
    return _schedule(model, micro_batches, on_output, False, share_prompts)


def _set_training(model, training: bool) -> None:
    """model.train(training) where the mode changes: the call walks every submodule (0.3 ms of
    a 22 ms toy step), and only these two functions set the mode, always on the root."""
    if model.training != training:
        model.train(training)
