"""Asynchronous rounds (`rollout.async_rounds`): round k+1's rollouts are made while round k trains.

    for round_index, metrics in async_rounds(rounds, start=state.next_round): ...

`opd_core.trainer.loop.run_rounds` drives a `Rounds` with this instead of `serial_rounds` when
the config asks for it. Write v_j for the policy after j optimizer rounds (v_0 = the converted
student). Serial rounds sample round k from v_k. Here, while round k trains (v_k -> v_{k+1}),
a background thread generates round k+1's rollouts (and has a teacher server score them)
with the engines still at v_k; once both are done the engines get v_{k+1} and round k+1
trains while round k+2 is made. So round k's rollouts come from v_{max(k-1, 0)}: the
off-policy gap is at most one step, every row's `weight_version` says which, and the PPO
ratio takes the engine's log-probs of the rollouts as the old ones
(`OPDRunConfig.old_logprobs_from_rollouts`). On 2 CPU cores the phases overlap only if each
process has a thread of its own (README, Benchmarks).

A run (re)started at round n >= 1 (the trainer at v_n, from round n-1's checkpoint) makes
round n's rollouts from v_{n-1} (the engines start there: `TrainState.rollout_export`), then
moves the engines to v_n, as the uninterrupted run did: the result is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loop.py imports this module
    from opd_core.trainer.loop import Rounds

__all__ = ["async_rounds"]

logger = logging.getLogger("opd.train")


def async_rounds(rounds: Rounds, start: int) -> Iterator[tuple[int, dict]]:
    """Rounds `start`.. with each next round's rollouts made during the step before it; yields
    (round, metrics) once a round is done and the engines hold its weights.

    The engines must hold v_{max(start-1, 0)} (`Rounds` starts them, and rebuilds them after
    a training actor died, from `TrainState.rollout_export`). If a round fails (a dead
    training actor), the background round is waited for and dropped: the caller rewinds to
    the last checkpoint and calls this again from there."""
    total = rounds.cfg.rollout.rounds
    if start >= total:
        return
    produced = rounds.produce(start)  # from v_{start-1}: nothing to overlap it with yet
    if start > 0:  # the trainer resumed at v_start: the next rollouts come from it
        rounds.engines.update_weights(rounds.state.hf_export, weight_version=str(start))
    upcoming: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-async-rollouts") as pool:
        try:
            for round_index in range(start, total):
                if round_index + 1 < total:
                    upcoming = pool.submit(rounds.produce, round_index + 1, overlapped=True)
                metrics = rounds.consume(
                    round_index, produced, wait=None if upcoming is None else upcoming.result
                )
                produced = None if upcoming is None else upcoming.result()
                upcoming = None
                yield round_index, metrics
        finally:
            if upcoming is not None:  # a round failed while the next one was being made
                wait_for([upcoming])
                if upcoming.exception() is not None:
                    logger.warning(
                        "the rollouts being made for the next round are dropped: %s: %s",
                        type(upcoming.exception()).__name__,
                        upcoming.exception(),
                    )
