"""Dynamic batching for the built-in server: many concurrent requests, one forward at a time.

    engine = BatchingEngine(model_path, batch_window_ms=5, max_batch_size=64, generator_kwargs={})
    await engine.load()                            # the Generator, loaded on the compute thread
    ids = await engine.tokenize(["some text"])     # on the tokenizer thread
    work = await engine.submit(sequences)          # from a request handler
    outputs = await work.future                    # or work.cancel() when the client leaves

Requests are queued. One worker takes the first, then whatever else arrives within
`batch_window_ms` (and whatever queued up during the previous forward) up to
`max_batch_size` sequences, and runs it as ONE `Generator.generate` call on a single-thread
executor: two forwards never overlap, and weight updates (run on the same executor) land
between batches.

One request cannot break the others: a request whose client went away is dropped before
its batch runs (and its sequences stop decoding if it goes away mid-batch); if a batch
raises, its requests are rerun one at a time, so only the request that fails alone gets the
error. Tokenization runs on a thread of its own, without the GIL (`Generator.encode_texts`),
so a huge text never stalls the event loop or the forwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from opd_core.engine.gc_freeze import freeze_long_lived_objects
from opd_core.engine.generation import Generator
from opd_core.engine.sequence import Sequence

logger = logging.getLogger("opd.engine.server")

HEALTH_CHECK_TIMEOUT_S = 20.0  # SGLang's default SGLANG_HEALTH_CHECK_TIMEOUT


@dataclass
class _Work:
    """One /generate request waiting for (or in) a batch."""

    seqs: list[Sequence]
    future: asyncio.Future
    stream: asyncio.Queue | None = None  # partial responses, for `stream: true`
    results: dict[int, dict] = field(default_factory=dict)

    @property
    def abandoned(self) -> bool:
        return self.future.done()  # only ever done early by cancel()

    def cancel(self) -> None:
        """The client went away: drop the request, or stop decoding it if it is running."""
        for seq in self.seqs:
            seq.cancelled = True
        self.future.cancel()


class BatchingEngine:
    """The model, its one compute thread, its tokenizer thread, and the batching queue."""

    def __init__(
        self,
        model_path: str,
        batch_window_ms: float,
        max_batch_size: int,
        generator_kwargs: dict,
        on_load_error: Callable[[str], None] | None = None,
    ):
        self.model_path = model_path
        self.window = batch_window_ms / 1000
        self.max_batch_size = max_batch_size
        self.generator_kwargs = generator_kwargs
        self.on_load_error = on_load_error
        self.generator: Generator | None = None
        self.load_error: str | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-engine")
        self.tokenizer_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="opd-tokenize"
        )
        self.queue: asyncio.Queue[_Work] = asyncio.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.in_flight = 0  # requests submitted and not yet answered, dropped or failed
        self.last_progress = 0.0  # time.monotonic() of the last decoding step
        self.requests_served = 0  # answered with generations (the router test counts them)
        self.dropped = 0  # sequences whose client left before their compute started

    async def load(self) -> None:
        try:
            self.generator = await self.run(Generator, self.model_path, **self.generator_kwargs)
            logger.info("loaded %s", self.model_path)
            freeze_long_lived_objects()  # the model and every import: see gc_freeze.py
        except Exception as err:  # reported by /health* and /generate; the process may exit
            self.load_error = f"{type(err).__name__}: {err}"
            logger.error("model failed to load from %s: %s", self.model_path, self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)

    async def run(self, fn, *args, **kwargs):
        """Run `fn` on the compute thread (serialised with every forward)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, lambda: fn(*args, **kwargs)
        )

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of `texts`, on the tokenizer thread (not the loop, not the forward's)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.tokenizer_executor, self.generator.encode_texts, texts
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
                size += 0 if work.abandoned else len(work.seqs)
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Work]) -> None:
        live = [work for work in batch if not work.abandoned]
        self.dropped += sum(len(work.seqs) for work in batch if work.abandoned)
        self.in_flight -= len(batch) - len(live)
        if not live:
            return
        try:
            await self._compute(live)
        except Exception as err:
            if len(live) == 1:
                self._fail(live[0], err)
                return
            # One bad sequence must not fail the requests batched with it: rerun each
            # request alone, from the start; only the one that fails alone gets the error.
            logger.exception("a batch of %d requests failed; rerunning them one by one", len(live))
            for work in live:
                if work.abandoned:
                    self.in_flight -= 1
                    continue
                work.seqs = [seq.restarted() for seq in work.seqs]
                work.results.clear()
                try:
                    await self._compute([work])
                except Exception as err:
                    self._fail(work, err)

    async def _compute(self, batch: list[_Work]) -> None:
        """Run `batch` in chunks of at most max_batch_size sequences; answer each request."""
        owners = [(work, i) for work in batch for i in range(len(work.seqs))]
        for start in range(0, len(owners), self.max_batch_size):
            chunk = owners[start : start + self.max_batch_size]
            seqs = [work.seqs[i] for work, i in chunk]
            started = time.perf_counter()
            outputs = await self.run(self._generate_live, seqs, self._on_step(chunk))
            logger.debug("batch of %d sequences in %.3fs", len(seqs), time.perf_counter() - started)
            for (work, i), output in zip(chunk, outputs):
                work.results[i] = output
        for work in batch:
            self.in_flight -= 1
            if not work.future.done():  # cancelled when its client went away
                self.requests_served += 1
                work.future.set_result([work.results[i] for i in range(len(work.seqs))])

    def _generate_live(self, seqs: list[Sequence], on_step) -> list[dict | None]:
        """On the compute thread: generate for the sequences whose client is still there
        (a client may leave while its batch waits for the thread); None for the others."""
        keep = [not seq.cancelled for seq in seqs]  # decided once: flags may change meanwhile
        live = [seq for seq, kept in zip(seqs, keep) if kept]
        self.dropped += len(seqs) - len(live)  # sequences, counted on this one thread
        outputs = iter(self.generator.generate(live, on_step) if live else [])
        return [next(outputs) if kept else None for kept in keep]

    def _fail(self, work: _Work, err: Exception) -> None:
        self.in_flight -= 1
        logger.error("a request failed: %s: %s", type(err).__name__, err, exc_info=err)
        if not work.future.done():
            work.future.set_exception(err)

    def _on_step(self, chunk: list[tuple[_Work, int]]):
        """After every decoding step: record progress (/health) and stream partial answers."""
        streaming = [(work, i) for work, i in chunk if work.stream is not None]
        generator, loop = self.generator, self.loop

        def on_step(_seqs: list[Sequence]) -> None:
            self.last_progress = time.monotonic()
            for work, i in streaming:
                seq = work.seqs[i]
                if not seq.finished:  # the finished response is sent once, at the end
                    partial = seq.response(generator.decode, generator.token_text)
                    loop.call_soon_threadsafe(work.stream.put_nowait, (i, partial))

        return on_step

    async def submit(self, seqs: list[Sequence], stream: bool = False) -> _Work:
        work = _Work(seqs, self.loop.create_future(), asyncio.Queue() if stream else None)
        self.in_flight += 1
        await self.queue.put(work)
        return work

    async def health_check(self, timeout: float = HEALTH_CHECK_TIMEOUT_S) -> bool:
        """SGLang's /health_generate: a 1-token greedy generation of `input_ids [0]`, and any
        decoding progress meanwhile counts as alive (a busy server is not made to wait)."""
        started = time.monotonic()
        seq = self.generator.prepare(
            {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
        )
        work = await self.submit([seq])
        try:
            while time.monotonic() - started < timeout:
                done, _ = await asyncio.wait({work.future}, timeout=0.05)
                if done:
                    return work.future.exception() is None
                if self.last_progress > started:
                    return True
            return False
        finally:
            if not work.future.done():
                work.cancel()


async def sse_events(work: _Work, is_batch: bool, dumps) -> AsyncIterator[bytes]:
    """SGLang's stream format: `data: {response so far}` per token, then `data: [DONE]`."""

    def event(index: int, payload: dict) -> bytes:
        if is_batch:
            payload = {**payload, "index": index}
        return b"data: " + dumps(payload) + b"\n\n"

    try:
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
    finally:  # also when the client disconnects and the response is cancelled
        if not work.future.done():
            work.cancel()
