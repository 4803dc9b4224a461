"""The answers of one request's batches, collected as they arrive, each row exactly once.

    pieces = Pieces("round 3 rollouts")
    pieces.add(start=32, length=32, piece=part)   # from any thread, in any order
    parts = pieces.ordered(total=256)             # row order; an error if a row is missing

Streamed scoring (opd_core.trainer.streaming) and the streamed rollouts
(opd_core.trainer.rollouts) use it, so that a batch the client resent after a failure can
neither be counted twice nor be lost. No Ray, no engine: scripts/gpu_check.py imports the
rollouts.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

__all__ = ["Pieces"]

T = TypeVar("T")


class Pieces(Generic[T]):
    """Pieces of a table's rows, each covering rows [start, start + length), collected as
    they arrive (from any thread): each row exactly once, or an error naming `what`."""

    def __init__(self, what: str):
        self.what = what
        self._pieces: dict[int, tuple[int, T]] = {}
        self._lock = threading.Lock()

    def add(self, start: int, length: int, piece: T) -> None:
        with self._lock:
            if start in self._pieces:
                raise RuntimeError(f"{self.what}: rows {start}..{start + length - 1} came twice")
            self._pieces[start] = (length, piece)

    def ordered(self, total: int) -> list[T]:
        """The pieces in row order; a RuntimeError unless they cover 0..total-1 once each."""
        with self._lock:
            starts = sorted(self._pieces)
            covered = 0
            for start in starts:
                if start != covered:
                    problem = "overlap" if start < covered else "are missing"
                    raise RuntimeError(f"{self.what}: rows from {min(start, covered)} {problem}")
                covered += self._pieces[start][0]
            if covered != total:
                raise RuntimeError(f"{self.what}: {covered} of {total} rows arrived")
            return [self._pieces[start][1] for start in starts]
