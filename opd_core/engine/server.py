"""The built-in SGLang-protocol server: FastAPI + uvicorn around one `Generator`.

    python -m opd_core.engine.server --model-path DIR --host 127.0.0.1 --port 30000 [--api-key K]
    serve("DIR", port=30000)                      # the same, from Python (`opd serve` calls this)
    with BackgroundServer(create_app("DIR")) as url: ...   # in-process, on a free port (tests)

Endpoints (SGLang's names and shapes): POST /generate (single or batch, `stream` as SSE),
GET /health, GET /health_generate (503 until the model is loaded and a 1-token generation
works), GET /get_model_info, POST /flush_cache, POST /update_weights_from_disk.

Every /generate request is validated up front (a bad one gets a 400 naming the field and
never reaches the model), then handed to the dynamic batcher (`batching.py`), which runs
concurrent requests together in one forward.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from opd_core.engine.batching import BatchingEngine, sse_events
from opd_core.engine.generation import RequestError
from opd_core.engine.protocol import GenerateRequest, UpdateWeightsRequest, validation_message

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
    engine = BatchingEngine(str(model_path), batch_window_ms, max_batch_size, generator_kwargs)

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

    if api_key:  # only then: an http middleware costs ~0.3 ms on every request

        @app.middleware("http")
        async def check_api_key(request: Request, call_next):
            # Like SGLang: /health* stays open so orchestrators can probe without the key.
            if (
                not request.url.path.startswith("/health")
                and request.headers.get("Authorization") != f"Bearer {api_key}"
            ):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

    def not_ready() -> JSONResponse | None:
        if engine.generator is None:
            detail = (
                f"model failed to load: {engine.load_error}"
                if engine.load_error
                else "model is loading"
            )
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
            seq = engine.generator.prepare(
                {
                    "input_ids": [engine.generator.pad_id],
                    "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                }
            )
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
            message = await engine.run(
                engine.generator.load_weights, body.model_path, body.weight_version
            )
        except (ValidationError, RequestError, ValueError) as err:
            text = validation_message(err) if isinstance(err, ValidationError) else str(err)
            return JSONResponse(
                {"success": False, "message": text, "num_paused_requests": 0}, status_code=400
            )
        return JSONResponse({"success": True, "message": message, "num_paused_requests": 0})

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        try:
            body = GenerateRequest.model_validate(await _json(request))
            singles = body.split()
        except ValidationError as err:
            return _error(400, validation_message(err))
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
            return StreamingResponse(
                sse_events(work, body.is_batch, _dumps), media_type="text/event-stream"
            )
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

    uvicorn.run(
        create_app(model_path, api_key=api_key, **app_kwargs),
        host=host,
        port=port,
        log_level=log_level,
    )


def build_parser():
    import argparse

    # sglang.launch_server's flag names, so one launcher command line drives both servers.
    parser = argparse.ArgumentParser(
        prog="python -m opd_core.engine.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--tp-size", type=int, default=1, help="must be 1: the built-in server runs on one device"
    )
    parser.add_argument(
        "--mem-fraction-static",
        type=float,
        default=None,
        help="accepted for sglang compatibility; unused",
    )
    parser.add_argument(
        "--enable-deterministic-inference",
        action="store_true",
        help="SGLang's flag; the built-in engine's sampling is always seeded per request",
    )
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--max-running-requests", type=int, default=64, help="most sequences in one batch"
    )
    parser.add_argument(
        "--batch-window-ms", type=float, default=5.0, help="how long to gather a batch"
    )
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.tp_size != 1:
        raise SystemExit(
            "--tp-size: the built-in server runs on one device; use backend sglang for tensor parallelism"
        )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
