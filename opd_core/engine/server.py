"""The built-in SGLang-protocol server: FastAPI + uvicorn around one `Generator`.

    python -m opd_core.engine.server --model-path DIR --host 127.0.0.1 --port 30000 [--api-key K]
    serve("DIR", port=30000)                      # the same, from Python (`opd serve` calls this)
    with BackgroundServer(create_app("DIR")) as url: ...   # in-process, on a free port (tests)

Endpoints (SGLang's names and shapes): POST /generate (single or batch, `stream` as SSE),
GET /health, GET /health_generate (503 until the model is loaded and a 1-token generation
works), GET /get_model_info, POST /flush_cache, POST /update_weights_from_disk.

Dynamic batching: every /generate request is validated up front (a bad one gets a 400 with
the field name and never reaches the model), then queued. One worker takes whatever is
queued within `batch_window_ms` (up to `max_batch_size` sequences) and runs it as ONE
`Generator.generate` call on a single-thread executor, so two forwards never overlap and
weight updates happen between batches.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from opd_core.engine.generation import Generator, RequestError, _validation_message
from opd_core.engine.protocol import GenerateRequest, UpdateWeightsRequest
from opd_core.engine.sequence import Sequence

logger = logging.getLogger("opd.engine.server")

try:  # orjson (a Prefect dependency) encodes the big logprob lists several times faster
    import orjson

    _loads = orjson.loads

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _dumps(content)


@dataclass
class _Work:
    """One /generate request waiting for (or in) a batch."""

    seqs: list[Sequence]
    future: asyncio.Future
    stream: asyncio.Queue | None = None  # partial responses, for `stream: true`
    results: dict[int, dict] = field(default_factory=dict)


class _Engine:
    """The model, its one compute thread, and the batching queue."""

    def __init__(self, model_path: str, batch_window_ms: float, max_batch_size: int, generator_kwargs: dict):
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
        except Exception as err:  # reported by /health_generate and /generate, never a crash
            self.load_error = f"{type(err).__name__}: {err}"
            logger.exception("failed to load %s", self.model_path)

    async def run(self, fn, *args, **kwargs):
        """Run `fn` on the compute thread (serialised with every forward)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, lambda: fn(*args, **kwargs))

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
                outputs = await self.run(self.generator.generate, seqs, self._stream_callback(chunk))
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def create_app(
    model_path: str,
    api_key: str | None = None,
    batch_window_ms: float = 5,
    max_batch_size: int = 64,
    **generator_kwargs: Any,
) -> FastAPI:
    """The server app; the model loads in the background after startup (see /health_generate).

    `generator_kwargs` go to `Generator` (device, dtype, seed, context_length).
    """
    engine = _Engine(str(model_path), batch_window_ms, max_batch_size, generator_kwargs)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(engine.batch_loop()), asyncio.create_task(engine.load())]
        yield
        for task in tasks:
            task.cancel()
        engine.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="opd built-in engine (SGLang protocol)", lifespan=lifespan)
    app.state.engine = engine

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        # Like SGLang: /health* stays open so orchestrators can probe without the key.
        if api_key and not request.url.path.startswith("/health"):
            if request.headers.get("Authorization") != f"Bearer {api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    def not_ready() -> JSONResponse | None:
        if engine.generator is None:
            detail = f"model failed to load: {engine.load_error}" if engine.load_error else "model is loading"
            return _error(503, detail)
        return None

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if (busy := not_ready()) is not None:
            return busy
        try:
            seq = engine.generator.prepare({"input_ids": [engine.generator.pad_id], "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
            work = await engine.submit([seq])
            await work.future
        except Exception as err:
            return _error(503, f"generation failed: {err}")
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info() -> Response:
        return not_ready() or JSONResponse(engine.generator.model_info())

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        # There is no prefix cache to drop: every batch starts from an empty KV cache.
        return PlainTextResponse("Cache flushed.")

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> Response:
        if (busy := not_ready()) is not None:
            return busy
        try:
            body = UpdateWeightsRequest.model_validate(await _json(request))
            message = await engine.run(engine.generator.load_weights, body.model_path, body.weight_version)
        except (ValidationError, RequestError, ValueError) as err:
            text = _validation_message(err) if isinstance(err, ValidationError) else str(err)
            return JSONResponse({"success": False, "message": text, "num_paused_requests": 0}, status_code=400)
        return JSONResponse({"success": True, "message": message, "num_paused_requests": 0})

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        try:
            body = GenerateRequest.model_validate(await _json(request))
            singles = body.split()
        except ValidationError as err:
            return _error(400, _validation_message(err))
        except ValueError as err:
            return _error(400, str(err))
        if (busy := not_ready()) is not None:
            return busy
        seqs = []
        for i, single in enumerate(singles):
            try:
                seqs.append(engine.generator.prepare(single))
            except RequestError as err:
                return _error(400, f"{f'[{i}] ' if body.is_batch else ''}{err}")
        work = await engine.submit(seqs, stream=body.stream)
        if body.stream:
            return StreamingResponse(_sse(work, body.is_batch), media_type="text/event-stream")
        try:
            outputs = await work.future
        except Exception as err:
            return _error(500, f"generation failed: {type(err).__name__}: {err}")
        return JSONResponse(outputs if body.is_batch else outputs[0])

    return app


async def _json(request: Request) -> Any:
    try:
        return _loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"body: not valid JSON ({err})") from None


async def _sse(work: _Work, is_batch: bool) -> AsyncIterator[bytes]:
    """SGLang's stream format: `data: {response so far}` per token, then `data: [DONE]`."""

    def event(index: int, payload: dict) -> bytes:
        if is_batch:
            payload = {**payload, "index": index}
        return b"data: " + _dumps(payload) + b"\n\n"

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
        yield b"data: " + _dumps({"error": {"message": str(err)}}) + b"\n\n"
    else:
        for i, output in enumerate(outputs):
            yield event(i, output)
    yield b"data: [DONE]\n\n"


# ------------------------------------------------------------------------ entry points


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 30000,
    api_key: str | None = None,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Run the server in the foreground until interrupted (what `opd serve` calls)."""
    import uvicorn

    uvicorn.run(create_app(model_path, api_key=api_key, **app_kwargs), host=host, port=port, log_level=log_level)


def build_parser():
    import argparse

    # sglang.launch_server's flag names, so one launcher command line drives both servers.
    parser = argparse.ArgumentParser(prog="python -m opd_core.engine.server", description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tp-size", type=int, default=1, help="must be 1: the built-in server runs on one device")
    parser.add_argument("--mem-fraction-static", type=float, default=None, help="accepted for sglang compatibility; unused")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-running-requests", type=int, default=64, help="most sequences in one batch")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="how long to gather a batch")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.tp_size != 1:
        raise SystemExit("--tp-size: the built-in server runs on one device; use backend sglang for tensor parallelism")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(
        args.model_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        log_level=args.log_level,
        batch_window_ms=args.batch_window_ms,
        max_batch_size=args.max_running_requests,
        seed=args.random_seed,
        context_length=args.context_length,
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
    )


if __name__ == "__main__":
    main()
