"""Keep Python's garbage collector off the long-lived objects of a serving/scoring process.

    freeze_long_lived_objects()   # once the process is set up (imports done, model loaded)

Every /generate response with log-probs is ~10^4 small lists (`[logprob, token_id, None]`
per token), on the server that builds it and on the client that decodes it. Those
allocations trigger collections, and the oldest generation's collection walks every object
the process holds: torch, transformers, FastAPI or Prefect modules, ~10^6 objects. Measured
on the toy teacher (benchmarks/teacher_scoring.py): single pauses of up to 0.25 s, and a
quarter of a profiled scoring pass (request and response decoding) went to those walks.
`gc.freeze()` moves every object alive now to a permanent generation that collections skip
(CPython added it for pre-fork servers; it serves here as well); objects created later are
collected as usual.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_frozen = False


def freeze_long_lived_objects() -> None:
    """Collect once, then freeze what survives; later calls in the same process do nothing."""
    global _frozen
    with _lock:
        if _frozen:
            return
        gc.collect()
        gc.freeze()
        _frozen = True
