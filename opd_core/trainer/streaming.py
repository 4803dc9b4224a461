"""Streamed scoring: the teacher scores each generated batch while the others still generate.

    scoring = StreamedScoring(teacher, pool=pool, clock=timeline.now)
    rollouts = generate_rollouts(..., on_batch=scoring.submit)  # scoring starts per batch
    scores = scoring.result(len(rollouts))  # every row's scores, in rollout order
    scoring.span                         # (first request, last answer) on `clock`

What a round writes does not change: the rows are the serial loop's, in the same order
(`opd_core.trainer.pieces.Pieces` puts each batch at its own positions and refuses a batch
seen twice or a row left out), with the same ids and the same log-probs to float rounding
(tests/test_streamed_scoring.py compares the files). Rounding, not more: an engine's batched
forward rounds differently depending on which requests it batches together (left padding),
which even two serial runs do not control.

Only the server teacher streams (`ServerTeacher`, opd_type sglang): its servers are
processes of their own that can score while the rollout engines generate. The in-actor
Megatron teacher stays serial: it runs inside the training actors through one TrainerGroup
call that splits the round's samples over the data-parallel ranks and micro-batches, so a
call per client batch would add a Ray round trip and a DP split per 32 samples; and with
`train.ray.colocate` those actors share their GPUs with the rollout engines, so scoring
there during generation would slow generation down rather than overlap it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait

from opd_core.algorithm.batch import TrainBatch
from opd_core.trainer.pieces import Pieces
from opd_core.trainer.rollouts import Rollouts
from opd_core.trainer.teachers import ServerTeacher, TeacherScores

__all__ = ["StreamedScoring"]


class StreamedScoring:
    """One round's teacher scores, requested batch by batch as the rollouts arrive.

    `submit(start, part)` (a `Rollouts` of rows start, start + 1, ...) is called on the
    rollout client's threads; the scoring runs on `pool`, so generation never waits for it.
    """

    def __init__(
        self,
        teacher: ServerTeacher,
        pool: Executor,
        clock: Callable[[], float],
        label: str = "teacher",
    ):
        self.teacher, self.pool, self.clock = teacher, pool, clock
        self.pieces: Pieces[TeacherScores] = Pieces(f"{label} scores")
        self._futures: list[Future] = []
        self._first: float | None = None
        self._last: float | None = None
        self._lock = threading.Lock()

    def submit(self, start: int, part: Rollouts) -> None:
        with self._lock:
            if self._first is None:
                self._first = self.clock()
            self._futures.append(self.pool.submit(self._score, start, part.batch()))

    def _score(self, start: int, batch: TrainBatch) -> None:
        scores = self.teacher.score(batch, label=None)  # no progress bar per batch
        self.pieces.add(start, len(batch), scores)
        with self._lock:
            self._last = max(self._last or 0.0, self.clock())

    def result(self, total: int) -> TeacherScores:
        """Waits for every batch's scores (of `total` rows in all); the first failure is
        raised as it was."""
        with self._lock:
            futures = list(self._futures)
        wait(futures)
        for future in futures:
            future.result()
        return TeacherScores.concat(self.pieces.ordered(total))

    @property
    def span(self) -> tuple[float, float] | None:
        """(first request, last answer) on `clock`; None before anything was scored."""
        if self._first is None or self._last is None:
            return None
        return self._first, self._last
