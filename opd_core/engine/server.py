"""The built-in SGLang-protocol server: FastAPI + uvicorn around one `Generator`.

    python -m opd_core.engine.server --model-path DIR --host 127.0.0.1 --port 30000 [--api-key K]
    serve("DIR", port=30000)                      # the same, from Python (`opd serve` calls this)
    with BackgroundServer(create_app("DIR")) as url: ...   # in-process, on a free port (tests)

Endpoints (SGLang 0.5.23's names, shapes and status codes, srt/entrypoints/http_server.py):
POST /generate (single or batch, `n` samples, `stream` as SSE); GET /health and
/health_generate (503 until the model is loaded, then a 1-token generation); GET /model_info
(and its deprecated alias /get_model_info); GET /server_info (and /get_server_info); GET|POST
/flush_cache (400 while requests are in flight); POST /update_weights_from_disk and
/update_weight_version. The OpenAPI schema at /openapi.json documents the request bodies.

One request cannot break the server: the body is limited (413) and must be JSON (415); every
/generate request is validated in full before it joins a batch (400 naming the field: types,
ranges, token ids in the vocabulary, SGLang's context-length rules); text is tokenized on a
thread of its own; a request whose client disconnects is dropped before compute; a batch
that raises is rerun one request at a time (see `batching.py`); a failed weight update is a
JSON 400 that leaves the old weights serving. When the model cannot be loaded, /health*
answer 503 with the reason and `serve()` exits with code 1 and one log line saying why.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from opd_core.engine.batching import BatchingEngine, sse_events
from opd_core.engine.generation import RequestError
from opd_core.engine.protocol import (
    MAX_PARAM_ITEMS,
    MAX_SEQUENCES,
    GenerateRequest,
    UpdateWeightsRequest,
    UpdateWeightVersionRequest,
    validation_message,
)

logger = logging.getLogger("opd.engine.server")

DEFAULT_MAX_BODY_BYTES = 64 << 20
DEFAULT_MAX_TEXT_CHARS = 4 << 20  # a prompt text; 10 MB of text cannot fit any context we serve
_DRAIN_FACTOR = 16  # an oversized body up to 16x the limit is read and dropped, then 413

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


class BodyError(Exception):
    """A request body the server will not parse: its HTTP status and why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _never_raises(handler: Callable) -> Callable:
    """An exception escaping a handler makes uvicorn close the keep-alive connection after
    Starlette's 500 (the next request on it is reset): answer a JSON 500 instead."""

    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except Exception as err:
            logger.exception("unexpected error in %s", handler.__name__)
            return _error(500, f"internal error: {type(err).__name__}: {err}")

    return wrapped


def create_app(
    model_path: str,
    api_key: str | None = None,
    batch_window_ms: float = 5,
    max_batch_size: int = 64,
    deterministic: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
    on_load_error: Callable[[str], None] | None = None,
    server_args: dict[str, Any] | None = None,
    **generator_kwargs: Any,
) -> FastAPI:
    """The server app; the model loads in the background after startup (see /health).

    `deterministic` is SGLang's --enable-deterministic-inference: only then is a request's
    `sampling_seed` honoured (see `generation.py`). `generator_kwargs` go to `Generator`
    (device, dtype, seed, context_length, trust_remote_code, prefix_cache).
    `on_load_error(reason)` is called if the model cannot be loaded (`serve` uses it to exit).
    `server_args` are echoed by /server_info.
    """
    generator_kwargs["sampling_seed_mode"] = "deterministic" if deterministic else "ignore"
    engine = BatchingEngine(
        str(model_path), batch_window_ms, max_batch_size, generator_kwargs, on_load_error
    )
    info_args = {
        "model_path": str(model_path),
        "context_length": generator_kwargs.get("context_length"),
        "max_running_requests": max_batch_size,
        "enable_deterministic_inference": deterministic,
        "disable_radix_cache": not generator_kwargs.get("prefix_cache", True),
        "random_seed": generator_kwargs.get("seed"),
        **(server_args or {}),
    }

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(engine.batch_loop()), asyncio.create_task(engine.load())]
        yield
        for task in tasks:
            task.cancel()
        engine.executor.shutdown(wait=False, cancel_futures=True)
        engine.tokenizer_executor.shutdown(wait=False, cancel_futures=True)

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
    @app.get("/health_generate")
    @_never_raises
    async def health_generate() -> Response:
        # SGLang answers /health like /health_generate (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION
        # is on by default): 503 while starting, then a 1-token generation.
        if (busy := not_ready()) is not None:
            return busy
        if await engine.health_check():
            return Response(status_code=200)
        return _error(503, "no generation progress within the health check timeout")

    @app.get("/model_info")
    @app.get("/get_model_info")  # SGLang's deprecated alias
    @_never_raises
    async def model_info() -> Response:
        return not_ready() or JSONResponse(engine.generator.model_info())

    @app.get("/server_info")
    @app.get("/get_server_info")  # SGLang's deprecated alias
    @_never_raises
    async def server_info() -> Response:
        # SGLang: the server args (context_length is None unless --context-length was
        # given) plus the scheduler's max_req_input_len.
        generator = engine.generator
        return JSONResponse(
            {
                **info_args,
                "max_req_input_len": generator.limits.input_limit if generator else None,
                "max_total_num_tokens": None,  # no KV pool: each batch has its own cache
                "internal_states": [
                    {
                        "requests_in_flight": engine.in_flight,
                        "requests_served": engine.requests_served,
                        "requests_dropped": engine.dropped,
                        "weight_version": generator.weight_version if generator else None,
                    }
                ],
                "version": "opd-builtin",
                "backend": "builtin",
            }
        )

    @app.get("/flush_cache", operation_id="flush_cache_get")
    @app.post("/flush_cache", operation_id="flush_cache_post")
    @_never_raises
    async def flush_cache(timeout: float = Query(0.0, ge=0.0, le=3600.0)) -> Response:
        # There is no prefix cache to drop (every batch starts from an empty KV cache), but
        # like SGLang's scheduler this refuses while requests are queued or running, after
        # waiting up to `timeout` seconds for them (http_server.py flush_cache).
        deadline = asyncio.get_running_loop().time() + timeout
        while engine.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if engine.in_flight > 0:
            return PlainTextResponse("Flush cache failed.\n", status_code=400)
        return PlainTextResponse(
            "Cache flushed.\nPlease check backend logs for more details. (When there are "
            "running or waiting requests, the operation will not be performed.)\n"
        )

    @app.post("/update_weights_from_disk")
    @_never_raises
    async def update_weights_from_disk(request: Request) -> Response:
        def failed(status: int, message: str) -> JSONResponse:
            body = {"success": False, "message": message, "num_paused_requests": 0}
            return JSONResponse(body, status_code=status)

        try:
            body = UpdateWeightsRequest.model_validate(await read_json(request, max_body_bytes))
        except BodyError as err:
            return failed(err.status, str(err))
        except ValidationError as err:
            return failed(400, validation_message(err))
        if (busy := not_ready()) is not None:
            return busy
        if body.abort_all_requests:
            logger.info("abort_all_requests: the built-in engine lets in-flight requests finish")
        try:
            message = await engine.run(
                engine.generator.load_weights, body.model_path, body.weight_version
            )
        except RequestError as err:  # SGLang: any failed update is a 400, success false
            logger.warning("weight update from %s failed: %s", body.model_path, err)
            return failed(400, str(err))
        return JSONResponse({"success": True, "message": message, "num_paused_requests": 0})

    @app.post("/update_weight_version")
    @_never_raises
    async def update_weight_version(request: Request) -> Response:
        try:
            body = UpdateWeightVersionRequest.model_validate(
                await read_json(request, max_body_bytes)
            )
        except BodyError as err:
            return JSONResponse({"success": False, "message": str(err)}, status_code=err.status)
        except ValidationError as err:
            message = validation_message(err)
            return JSONResponse({"success": False, "message": message}, status_code=400)
        if (busy := not_ready()) is not None:
            return busy
        engine.generator.weight_version = body.new_version
        return JSONResponse(
            {
                "success": True,
                "message": f"Weight version updated to {body.new_version}",
                "new_version": body.new_version,
            }
        )

    @app.post("/generate")
    @_never_raises
    async def generate(request: Request) -> Response:
        try:
            raw = await read_json(request, max_body_bytes)
            if (busy := not_ready()) is not None:  # the checks below need the model's limits
                return busy
            check_sizes(raw, engine.generator.context_length, max_text_chars)
            body = GenerateRequest.model_validate(raw)
            singles = body.split()
        except BodyError as err:
            return _error(err.status, str(err))
        except ValidationError as err:
            return _error(400, validation_message(err))
        except ValueError as err:
            return _error(400, str(err))
        texts = list(dict.fromkeys(s.text for s in singles if s.text is not None))
        by_text = dict(zip(texts, await engine.tokenize(texts))) if texts else {}
        seqs = []
        for i, single in enumerate(singles):
            try:
                seqs.append(engine.generator.prepare(single, by_text.get(single.text)))
            except RequestError as err:
                return _error(400, f"{f'[{i}] ' if body.is_batch else ''}{err}")
        work = await engine.submit(seqs, stream=bool(body.stream))
        if body.stream:
            return StreamingResponse(
                sse_events(work, body.is_batch, _dumps), media_type="text/event-stream"
            )
        try:
            outputs = await answer_or_disconnect(work, request)
        except Exception as err:
            return _error(500, f"generation failed: {type(err).__name__}: {err}")
        if outputs is None:  # nobody is listening any more
            return Response(status_code=499)
        return JSONResponse(outputs if body.is_batch else outputs[0])

    app.openapi = functools.partial(_openapi_with_bodies, app)
    return app


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body: 415 unless it says it is JSON, 413 past `limit` bytes, 400
    if it does not parse. A refused body is drained (up to 16x the limit) before the answer,
    so the client reads the answer instead of a reset connection."""
    stream = request.stream()
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        await _drain(stream, limit * _DRAIN_FACTOR)
        raise BodyError(415, f"Content-Type must be application/json, got {content_type!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await _drain(stream, limit * _DRAIN_FACTOR)
        raise BodyError(413, f"body: {declared} bytes, more than this server's {limit}")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _drain(stream, limit * _DRAIN_FACTOR - size)
            raise BodyError(413, f"body: more than this server's {limit} bytes")
        chunks.append(chunk)
    try:
        return _loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise BodyError(400, f"body: not valid JSON ({err})") from None


async def _drain(stream: AsyncIterator[bytes], budget: int) -> None:
    async for chunk in stream:
        budget -= len(chunk)
        if budget < 0:
            return


def check_sizes(body: Any, context_length: int, max_text_chars: int) -> None:
    """Cheap bounds, checked before the full validation: pydantic validates every element of
    a list or dict before it looks at its length (5M ids: 1.1 s of the event loop), so each
    container's size is bounded here first (ValueError = a 400)."""
    if not isinstance(body, dict):
        raise ValueError("body: must be a JSON object")
    ids = body.get("input_ids")
    flat_ids = isinstance(ids, list) and not (ids and isinstance(ids[0], list))
    for name, value in body.items():
        is_prompt = name == "input_ids" and flat_ids  # bounded by the context, below
        if isinstance(value, list | dict) and len(value) > MAX_SEQUENCES and not is_prompt:
            raise ValueError(f"{name}: {len(value)} entries; at most {MAX_SEQUENCES}")
    if isinstance(ids, list):
        rows = [ids] if flat_ids else ids
        for i, row in enumerate(rows):
            if isinstance(row, list) and len(row) >= context_length:
                where = "input_ids" if flat_ids else f"input_ids[{i}]"
                raise ValueError(
                    f"{where}: The input ({len(row)} tokens) is longer than the model's "
                    f"context length ({context_length} tokens)."
                )
    text = body.get("text")
    for i, item in enumerate(text if isinstance(text, list) else [text]):
        if isinstance(item, str) and len(item) > max_text_chars:
            where = f"text[{i}]" if isinstance(text, list) else "text"
            raise ValueError(
                f"{where}: {len(item)} characters, more than this server's --max-text-chars "
                f"{max_text_chars}"
            )
    params = body.get("sampling_params")
    for i, one in enumerate(params if isinstance(params, list) else [params]):
        for key, value in one.items() if isinstance(one, dict) else ():
            if isinstance(value, list | dict) and len(value) > MAX_PARAM_ITEMS:
                where = f"sampling_params[{i}]" if isinstance(params, list) else "sampling_params"
                raise ValueError(f"{where}.{key}: {len(value)} entries; at most {MAX_PARAM_ITEMS}")


async def answer_or_disconnect(work, request: Request) -> list[dict] | None:
    """The request's outputs, or None (and the work cancelled) if its client went away."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work.future, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.future.done():
        work.cancel()
        return None
    return work.future.result()


async def _disconnected(request: Request) -> None:
    # After the body, uvicorn's receive() blocks until the client disconnects.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _content(*media_types: str) -> dict[str, Any]:
    return {"content": {media: {"schema": {}} for media in media_types}}


_JSON, _TEXT = _content("application/json"), _content("text/plain")
_NO_BODY: dict[str, Any] = {}
_ERRORS = {code: {"description": "error", **_JSON} for code in ("401", "500", "503")}
# What each operation answers, with which content type (schemathesis checks both).
_RESPONSES: dict[str, dict[str, dict]] = {
    "/generate": {
        "200": _content("application/json", "text/event-stream"),
        **{code: _JSON for code in ("400", "413", "415", "499")},
    },
    "/update_weights_from_disk": {code: _JSON for code in ("200", "400", "413", "415")},
    "/update_weight_version": {code: _JSON for code in ("200", "400", "413", "415")},
    "/flush_cache": {"200": _TEXT, "400": _TEXT, "422": _JSON},
    "/health": {"200": _NO_BODY},
    "/health_generate": {"200": _NO_BODY},
    "/model_info": {"200": _JSON},
    "/get_model_info": {"200": _JSON},
    "/server_info": {"200": _JSON},
    "/get_server_info": {"200": _JSON},
}


def _openapi_with_bodies(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies the handlers parse themselves (they read raw
    bytes for the orjson fast path and their own 400/413/415 answers), and every status
    code and content type each operation answers with."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version="1", routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    template = "#/components/schemas/{model}"
    bodies = {
        "/generate": GenerateRequest,
        "/update_weights_from_disk": UpdateWeightsRequest,
        "/update_weight_version": UpdateWeightVersionRequest,
    }
    for path, model in bodies.items():
        body_schema = model.model_json_schema(ref_template=template)
        components.update(body_schema.pop("$defs", {}))
        components[model.__name__] = body_schema
        reference = {"$ref": template.format(model=model.__name__)}
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": reference}},
        }
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            answers = {**_ERRORS, **_RESPONSES.get(path, {})}
            operation["responses"] = {
                code: {"description": "see the module docstring", **answer}
                for code, answer in answers.items()
            }
    app.openapi_schema = schema
    return schema


# ------------------------------------------------------------------------ entry points


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 30000,
    api_key: str | None = None,
    log_level: str = "info",
    **app_kwargs: Any,
) -> None:
    """Run the server in the foreground until interrupted (what `opd serve` calls). If the
    model cannot be loaded the process exits with code 1 instead of serving 503s forever."""
    import uvicorn

    server: uvicorn.Server | None = None

    def exit_on_load_error(reason: str) -> None:
        logger.error("opd engine: cannot serve %s: %s; exiting", model_path, reason)
        if server is not None:
            server.should_exit = True

    app = create_app(model_path, api_key=api_key, on_load_error=exit_on_load_error, **app_kwargs)
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    )
    server.run()
    if app.state.engine.load_error:
        sys.exit(1)


# SGLang flags that the built-in engine accepts without using them (each gets a log line);
# any other --flag is let through too, so that an SGLang command line always starts.
_IGNORED_SGLANG_FLAGS = {
    "--chunked-prefill-size": int,
    "--mem-fraction-static": float,
}


def build_parser():
    import argparse

    # sglang.launch_server's flag names, so one launcher command line drives both servers.
    parser = argparse.ArgumentParser(
        prog="python -m opd_core.engine.server",
        description=__doc__.split("\n")[0],
        epilog="Other sglang.launch_server flags (--flag [value]) are accepted and ignored, "
        "with a log line each.",
    )
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--tp-size", type=int, default=1, help="must be 1: the built-in server runs on one device"
    )
    for flag, kind in _IGNORED_SGLANG_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help="SGLang's; unused here")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--random-seed", type=int, default=None)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "half", "float16", "bfloat16", "float", "float32"],
    )
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--base-gpu-id", type=int, default=0, help="with CUDA: the device index to use"
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument(
        "--enable-deterministic-inference",
        action="store_true",
        help="honour each request's sampling_seed (without it SGLang ignores them)",
    )
    parser.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="compute every prompt in full (by default a batch's shared prefixes are "
        "computed once, as SGLang's radix cache does)",
    )
    parser.add_argument(
        "--max-running-requests", type=int, default=64, help="most sequences in one batch"
    )
    parser.add_argument(
        "--batch-window-ms", type=float, default=5.0, help="how long to gather a batch"
    )
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--max-text-chars", type=int, default=DEFAULT_MAX_TEXT_CHARS)
    parser.add_argument("--log-level", default="info")
    return parser


def parse_args(argv: list[str] | None = None):
    """(known args, [(ignored flag, its value or None)]); a stray positional is an error."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    ignored: list[tuple[str, str | None]] = []
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--"):
            parser.error(f"unrecognized argument: {flag}")
        if "=" in flag:
            ignored.append(tuple(flag.split("=", 1)))
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            ignored.append((flag, rest[i + 1]))
            i += 2
        else:
            ignored.append((flag, None))
            i += 1
    for flag in _IGNORED_SGLANG_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            ignored.append((flag, str(value)))
    return args, ignored


def main(argv: list[str] | None = None) -> None:
    args, ignored = parse_args(argv)
    if args.tp_size != 1:
        raise SystemExit(
            "--tp-size: the built-in server runs on one device; "
            "use backend sglang for tensor parallelism"
        )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for flag, value in ignored:
        logger.info(
            "ignoring %s%s: an SGLang flag the built-in engine does not use",
            flag,
            f" {value}" if value is not None else "",
        )
    device = args.device
    if device is None and args.base_gpu_id:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{args.base_gpu_id}"
        else:
            logger.info("ignoring --base-gpu-id %d: no CUDA device", args.base_gpu_id)
    serve(
        args.model_path,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        log_level=args.log_level,
        batch_window_ms=args.batch_window_ms,
        max_batch_size=args.max_running_requests,
        deterministic=args.enable_deterministic_inference,
        max_body_bytes=args.max_body_bytes,
        max_text_chars=args.max_text_chars,
        server_args={"tp_size": args.tp_size, "dtype": args.dtype, "ignored_flags": ignored},
        seed=args.random_seed,
        context_length=args.context_length,
        device=device,
        dtype={"auto": None, "half": "float16", "float": "float32"}.get(args.dtype, args.dtype),
        trust_remote_code=args.trust_remote_code,
        prefix_cache=not args.disable_radix_cache,
    )


if __name__ == "__main__":
    main()
