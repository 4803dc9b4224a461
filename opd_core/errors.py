"""The base class of errors that retrying cannot fix.

    class DataError(NotRetryable, ValueError): ...

A hub hiccup or a lost connection may pass on a second try; a broken jsonl line, a missing
label or a tokenizer that does not match the teacher's never does. Stage tasks retry only
errors that are not `NotRetryable` (see tasks/download.py), so bad input fails at once with
its message instead of after the retry delays.
"""

from __future__ import annotations

__all__ = ["NotRetryable"]


class NotRetryable(Exception):
    """Raising this again gives the same answer: the input is wrong, not the moment."""
