"""Dynamic batching for the built-in server: many concurrent requests, one forward at a time.

    engine = BatchingEngine(model_path, batch_window_ms=5, max_batch_size=64, generator_kwargs={})
    await engine.load()                            # the Generator, loaded on the compute thread
    work = await engine.submit(sequences)          # from a request handler
    outputs = await work.future

Requests are queued. One worker takes the first, then whatever else arrives within
`batch_window_ms` (and whatever queued up during the previous forward) up to
`max_batch_size` sequences, and runs it as ONE `Generator.generate` call on a single-thread
executor: two forwards never overlap, and weight updates (run on the same executor) land
between batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from opd_core.engine.gc_freeze import freeze_long_lived_objects
from opd_core.engine.generation import Generator
from opd_core.engine.sequence import Sequence

logger = logging.getLogger("opd.engine.server")


@dataclass
class _Work:
    """One /generate request waiting for (or in) a batch."""

    seqs: list[Sequence]
    future: asyncio.Future
    stream: asyncio.Queue | None = None  # partial responses, for `stream: true`
    results: dict[int, dict] = field(default_factory=dict)


class BatchingEngine:
    """The model, its one compute thread, and the batching queue."""

    def __init__(
        self, model_path: str, batch_window_ms: float, max_batch_size: int, generator_kwargs: dict
    ):
        self.model_path = model_path
        self.window = batch_window_ms / 1000
        self.max_batch_size = max_batch_size
        self.generator_kwargs = generator_kwargs
        self.generator: Generator | None = None
        self.load_error: str | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-engine")
        self.queue: asyncio.Queue[_Work] = asyncio.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def load(self) -> None:
        try:
            self.generator = await self.run(Generator, self.model_path, **self.generator_kwargs)
            logger.info("loaded %s", self.model_path)
            freeze_long_lived_objects()  # the model and every import: see gc_freeze.py
        except Exception as err:  # reported by /health_generate and /generate, never a crash
            self.load_error = f"{type(err).__name__}: {err}"
            logger.exception("failed to load %s", self.model_path)

    async def run(self, fn, *args, **kwargs):
        """Run `fn` on the compute thread (serialised with every forward)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: fn(*args, **kwargs)
        )

    async def batch_loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            size, deadline = len(batch[0].seqs), self.loop.time() + self.window
            while size < self.max_batch_size:
                if not self.queue.empty():  # whatever queued up during the last forward
                    work = self.queue.get_nowait()
                else:
                    remaining = deadline - self.loop.time()
                    if remaining <= 0:
                        break
                    try:
                        work = await asyncio.wait_for(self.queue.get(), remaining)
                    except TimeoutError:
                        break
                batch.append(work)
                size += len(work.seqs)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Work]) -> None:
        owners = [(work, i) for work in batch for i in range(len(work.seqs))]
        try:
            for start in range(0, len(owners), self.max_batch_size):
                chunk = owners[start : start + self.max_batch_size]
                seqs = [work.seqs[i] for work, i in chunk]
                started = time.perf_counter()
                outputs = await self.run(
                    self.generator.generate, seqs, self._stream_callback(chunk)
                )
                logger.debug(
                    "batch of %d sequences in %.3fs", len(seqs), time.perf_counter() - started
                )
                for (work, i), output in zip(chunk, outputs):
                    work.results[i] = output
            for work in batch:
                if not work.future.done():  # cancelled when its client went away
                    work.future.set_result([work.results[i] for i in range(len(work.seqs))])
        except Exception as err:  # an engine bug fails these requests, not the server
            logger.exception("batch failed")
            for work in batch:
                if not work.future.done():
                    work.future.set_exception(err)

    def _stream_callback(self, chunk: list[tuple[_Work, int]]):
        streaming = [(work, i) for work, i in chunk if work.stream is not None]
        if not streaming:
            return None
        generator, loop = self.generator, self.loop

        def on_step(_seqs: list[Sequence]) -> None:
            for work, i in streaming:
                seq = work.seqs[i]
                if not seq.finished:  # the finished response is sent once, at the end
                    partial = seq.response(generator.decode, generator.token_text)
                    loop.call_soon_threadsafe(work.stream.put_nowait, (i, partial))

        return on_step

    async def submit(self, seqs: list[Sequence], stream: bool = False) -> _Work:
        work = _Work(seqs, self.loop.create_future(), asyncio.Queue() if stream else None)
        await self.queue.put(work)
        return work


async def sse_events(work: _Work, is_batch: bool, dumps) -> AsyncIterator[bytes]:
    """SGLang's stream format: `data: {response so far}` per token, then `data: [DONE]`."""

    def event(index: int, payload: dict) -> bytes:
        if is_batch:
            payload = {**payload, "index": index}
        return b"data: " + dumps(payload) + b"\n\n"

    while not work.future.done():
        getter = asyncio.ensure_future(work.stream.get())
        done, _ = await asyncio.wait({getter, work.future}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield event(*getter.result())
        else:
            getter.cancel()
    while not work.stream.empty():
        yield event(*work.stream.get_nowait())
    try:
        outputs = work.future.result()
    except Exception as err:
        yield b"data: " + dumps({"error": {"message": str(err)}}) + b"\n\n"
    else:
        for i, output in enumerate(outputs):
            yield event(i, output)
    yield b"data: [DONE]\n\n"
