"""A robust client for SGLang-protocol servers (the real SGLang or the built-in one).

    urls = ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
    with EngineClient(urls, cache_dir=".cache/t", cache_namespace=model_namespace(dir)) as client:
        client.wait_until_healthy(600)
        outputs = client.generate(prompt_ids, {"max_new_tokens": 64, "temperature": 1.0})
        teacher_logprobs = client.score(prompt_ids, response_ids, progress="teacher")

One pooled `httpx.Client`; at most `max_concurrency` requests in flight; sequences sent
`batch_size` at a time as one batch request; failover between URLs and retries with backoff
on connection errors, 5xx and malformed answers (never on a 4xx): see `transport.py`.

`score` is teacher scoring as slime does it, asking for less: prompt+response `input_ids`,
`max_new_tokens` 0, `return_logprob`, `logprob_start_len = len(prompt) - 1` (the input
log-probs from the last prompt token on: SGLang then reuses the prompt's prefix cache across
its n samples, which `logprob_start_len` 0 forbids, and returns a fraction of the JSON);
keep the last `len(response)` values. Sequences are batched by prompt length and each
request asks from its shortest prompt (sglang-router takes no per-sequence list there).

Results are cached under `cache_dir`, keyed by a namespace for the teacher's weights and the
ids. Pass `cache_namespace` (e.g. `logprob_cache.model_namespace(teacher_dir)`, the content
hash of its weight files). Without it the client derives one from the server's /model_info
`model_path` when that is a directory it can read (the same content hash), and otherwise
does not cache at all (one warning): real SGLang reports no weights fingerprint and keeps
`weight_version` "default", so path + version alone would serve stale log-probs after the
files under that path change. After a weight update through this client the namespace is
derived again, from the new checkpoint (only when something is scored).

`generate(..., context_length=N)` caps each sequence's max_new_tokens so that SGLang accepts
it (see `protocol.ContextLimits`), taking the limits from the server's /server_info when it
reports them (real SGLang reports `max_req_input_len`, and `context_length` when started
with --context-length; sglang-router answers that endpoint about itself), else from N.

With `engine_urls` (the engines behind a router given as `urls`), weight updates, cache
flushes and model_info go to each engine directly: the router does not route
/update_weights_from_disk. sglang-router 0.3.2 also answers 422 to a batch whose
`sampling_params` is a list (one per sequence, e.g. per-sequence seeds): its request type
holds one value per batch. Such batches go straight to the engines instead, rotating over
them with failover like the router's round robin. Sent through the router one sequence per
request (slime's way), they were ~10x slower on the built-in engine (toy rollout, 2 engines:
42 s vs 4.3 s for 256 sequences on the loaded 2-core machine; 1 engine: 11.5 s). Scoring
sends one `logprob_start_len` per batch for the same reason.

`recover(error)` (e.g. `ServerFleet.recover`, which relaunches dead servers) is called when a
batch request failed on every URL after all retries; if it returns True the batch is sent
again, up to `MAX_RECOVERIES` times. Each batch's answers land at that batch's positions, so
a resent batch never duplicates or drops a row.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from opd_core.engine.gc_freeze import freeze_long_lived_objects
from opd_core.engine.logprob_cache import LogprobCache, model_namespace
from opd_core.engine.protocol import ContextLimits, cap_max_new_tokens, per_sequence_params
from opd_core.engine.transport import EngineError, EngineRequestError, FailoverTransport
from opd_core.schemas import TEACHER_LOGPROBS

__all__ = ["EngineClient", "EngineError", "EngineRequestError", "scores_to_table"]

logger = logging.getLogger("opd.engine.client")

MAX_RECOVERIES = 5  # per batch request: resends after `recover` said the servers are back


class EngineClient:
    def __init__(
        self,
        urls: str | Sequence[str],
        timeout: float = 120.0,
        max_concurrency: int = 16,
        batch_size: int = 32,
        max_retries: int = 5,
        api_key: str | None = None,
        cache_dir: str | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        cache_namespace: str | None = None,
        engine_urls: Sequence[str] | None = None,
        recover: Callable[[EngineError], bool] | None = None,
    ):
        self.transport = FailoverTransport(
            urls, timeout, max_concurrency, max_retries, api_key, backoff_initial, backoff_max
        )
        self.urls, self.http, self.request = (
            self.transport.urls,
            self.transport.http,
            self.transport.request,
        )
        self.engine_urls = [u.rstrip("/") for u in engine_urls] if engine_urls else self.urls
        # `urls` is a router: batches it cannot take go to the engines (module docstring).
        self.routed = set(self.engine_urls) != set(self.urls)
        self._engines = (
            FailoverTransport(
                self.engine_urls,
                timeout,
                max_concurrency,
                max_retries,
                api_key,
                backoff_initial,
                backoff_max,
            )
            if self.routed
            else self.transport
        )
        self.recover = recover
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="opd-client")
        self.cache_dir = cache_dir
        self._cache: LogprobCache | None = None
        # The cache key's first part; `_namespace_known` once it is decided (None = no cache).
        self._namespace, self._namespace_known = cache_namespace, cache_namespace is not None
        self._weight_version: str | None = None  # set by this client's weight updates
        self._limits: ContextLimits | None = None
        self._limits_asked = False
        self._lock = threading.Lock()
        # Decoding big log-prob responses must not rescan every long-lived object (gc_freeze.py).
        freeze_long_lived_objects()

    @classmethod
    def from_config(
        cls, urls: str | Sequence[str], cfg, api_key: str | None = None, **kwargs: Any
    ) -> EngineClient:
        """From an `opd_core.config.ClientConfig` (`kwargs`: cache_namespace, engine_urls,
        recover)."""
        return cls(
            urls,
            timeout=cfg.timeout,
            max_concurrency=cfg.max_concurrency,
            batch_size=cfg.batch_size,
            max_retries=cfg.max_retries,
            api_key=api_key,
            cache_dir=cfg.cache_dir,
            **kwargs,
        )

    # ------------------------------------------------------------------- generation

    def generate(
        self,
        input_ids: list[list[int]],
        sampling_params: dict | list[dict],
        return_logprob: bool = False,
        progress: str | None = None,
        context_length: int | None = None,
        on_batch: Callable[[int, list[dict]], None] | None = None,
        **request_fields: Any,
    ) -> list[dict]:
        """SGLang /generate for many sequences; responses in input order.

        `on_batch(start, responses)` is called (on a client thread) as each batch request is
        answered, with the responses of sequences start, start + 1, ...: once per batch,
        resent batches included (only the answer that succeeded is passed on).

        `sampling_params` is one dict for all or one per sequence; `request_fields` are other
        /generate fields (logprob_start_len, top_logprobs_num, ...) applied to every sequence.
        A `sampling_seed` (or `seed`) in a shared dict seeds the whole call: sequence i is
        sampled with seed + i, so repeated prompts get different samples and a rerun with the
        same seed reproduces all of them (on a server started with
        --enable-deterministic-inference: SGLang ignores seeds otherwise).

        `context_length` (the model's, e.g. its config's max_position_embeddings) caps each
        sequence's max_new_tokens to what the server accepts; a prompt that cannot fit at
        all raises `PromptTooLongError` naming it. Without it nothing is capped and a
        sequence that does not fit is the server's 400.
        """
        per_sequence = isinstance(sampling_params, list)
        if per_sequence and len(sampling_params) != len(input_ids):
            raise ValueError(
                f"sampling_params: {len(sampling_params)} entries for {len(input_ids)} sequences"
            )
        sampling_params = per_sequence_params(sampling_params, len(input_ids))
        if context_length is not None:
            sampling_params = cap_max_new_tokens(
                [len(ids) for ids in input_ids],
                sampling_params,
                self.context_limits(context_length),
            )
        per_sequence = isinstance(sampling_params, list)

        def payload(start: int, stop: int) -> dict:
            params = sampling_params[start:stop] if per_sequence else sampling_params
            if per_sequence and all(p == params[0] for p in params):
                params = params[0]  # one dict: what a router takes
            return {
                "input_ids": [list(map(int, ids)) for ids in input_ids[start:stop]],
                "sampling_params": params,
                "return_logprob": return_logprob,
                **request_fields,
            }

        return self._batched(len(input_ids), payload, progress, on_batch)

    def _batched(
        self,
        total: int,
        make_payload,
        progress: str | None,
        on_batch: Callable[[int, list[dict]], None] | None = None,
    ) -> list[dict]:
        """One request of `batch_size` sequences at a time; the answers in order, and each
        batch's to `on_batch` as it arrives. A batch with per-sequence sampling params skips
        a router (see the module docstring)."""
        spans = [(s, min(s + self.batch_size, total)) for s in range(0, total, self.batch_size)]
        bar = tqdm(total=total, desc=progress, unit="seq", disable=progress is None, leave=False)

        def send(span: tuple[int, int]) -> list[dict]:
            size = span[1] - span[0]

            def check(answer: Any) -> None:
                if (
                    not isinstance(answer, list)
                    or len(answer) != size
                    or not all(isinstance(a, dict) and "meta_info" in a for a in answer)
                ):
                    raise ValueError(f"expected a list of {size} responses with meta_info")

            body = make_payload(*span)
            per_sequence = isinstance(body["sampling_params"], list)
            transport = self._engines if per_sequence else self.transport
            for recoveries in itertools.count():
                try:
                    answer = transport.request("POST", "/generate", body, check=check)
                    break
                except EngineRequestError:
                    raise  # the request is wrong, not the server
                except EngineError as err:
                    if self.recover is None or recoveries >= MAX_RECOVERIES:
                        raise
                    if not self.recover(err):
                        raise
            bar.update(size)
            if on_batch is not None:
                on_batch(span[0], answer)
            return answer

        try:
            return [out for chunk in self.pool.map(send, spans) for out in chunk]
        finally:
            bar.close()

    def request_spans(self) -> list[tuple[str, float, float]]:
        """(url, sent, answered) of each /generate request answered since the last call,
        perf_counter seconds; the URL that answered it (a router, where one is in front)."""
        logs = {id(t): t.log for t in (self.transport, self._engines)}.values()
        return sorted(
            (url, sent, answered)
            for log in logs
            for url, path, sent, answered in log.drain()
            if path == "/generate"
        )

    # ---------------------------------------------------------------------- scoring

    @property
    def cache(self) -> LogprobCache | None:
        """The teacher-logprob cache, opened on first use (a rollout client never opens it)."""
        if self._cache is None and self.cache_dir:
            with self._lock:
                if self._cache is None:
                    self._cache = LogprobCache(self.cache_dir)
        return self._cache

    def context_limits(self, context_length: int) -> ContextLimits:
        """What the server accepts: its /server_info's `context_length` and
        `max_req_input_len` where it reports them, else `context_length` by SGLang's rules.
        The server is asked once per client."""
        with self._lock:
            if not self._limits_asked:
                self._limits_asked = True
                self._limits = self._reported_limits()
            reported = self._limits
        if reported is None:
            return ContextLimits(context_length)
        context = reported.context_length or context_length
        return ContextLimits(context, reported.max_req_input_len)

    def _reported_limits(self) -> ContextLimits | None:
        # Asked of an engine: behind a router, the router answers /server_info about itself.
        for path in ("/server_info", "/get_server_info"):
            try:
                response = self.http.get(f"{self.engine_urls[0]}{path}", timeout=30)
                info = response.json() if response.status_code == 200 else None
            except (httpx.TransportError, ValueError):
                info = None
            if info is None:  # 404 on servers that predate the name
                continue
            if isinstance(info, dict) and (
                info.get("max_req_input_len") or info.get("context_length")
            ):
                return ContextLimits(info.get("context_length") or 0, info.get("max_req_input_len"))
        return None

    def cache_namespace(self) -> str | None:
        """The teacher-logprob cache key's first part, or None: do not cache (see the module
        docstring for where it comes from)."""
        with self._lock:
            if not self._namespace_known:
                self._namespace_known = True
                info = self.model_info()
                path = info.get("model_path")
                if path and Path(path).is_dir():
                    self._namespace = model_namespace(path)
                    self._weight_version = info.get("weight_version")
                if self._namespace is None:
                    logger.warning(
                        "teacher-logprob cache off: the server's model_path %r is not a "
                        "directory this client can hash and no cache_namespace was given",
                        path,
                    )
            if self._namespace is None:
                return None
            return f"{self._namespace}|{self._weight_version or 'default'}"

    def score(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        progress: str | None = None,
    ) -> list[np.ndarray]:
        """The teacher's log-prob of every response token (float32 arrays, len == len(response))."""
        if len(prompt_ids) != len(response_ids):
            raise ValueError(
                f"prompt_ids has {len(prompt_ids)} rows but response_ids has {len(response_ids)}"
            )
        results: list[np.ndarray | None] = [None] * len(prompt_ids)
        todo = []
        for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
            if len(prompt) == 0:
                raise ValueError(
                    f"prompt_ids[{i}] is empty: the teacher needs at least one prompt token"
                )
            if len(response) == 0:  # not `[-0:]`, which would be the whole sequence
                results[i] = np.zeros(0, dtype=np.float32)
            else:
                todo.append(i)
        keys = {}
        namespace = self.cache_namespace() if self.cache is not None and todo else None
        if namespace is not None:
            keys = {i: LogprobCache.key(namespace, prompt_ids[i], response_ids[i]) for i in todo}
            hits = self.cache.get_many(list(keys.values()))
            for i in todo:
                if keys[i] in hits:
                    results[i] = hits[keys[i]]
            todo = [i for i in todo if results[i] is None]
        todo.sort(key=lambda i: len(prompt_ids[i]))  # see _score_payload

        def payload(start: int, stop: int) -> dict:
            return _score_payload(
                [prompt_ids[i] for i in todo[start:stop]],
                [response_ids[i] for i in todo[start:stop]],
            )

        outputs = self._batched(len(todo), payload, progress)
        fresh = {}
        for i, output in zip(todo, outputs):
            results[i] = fresh[i] = _response_logprobs(
                output, response_ids[i], where=f"sequence {i}"
            )
        if keys and fresh:
            self.cache.put_many({keys[i]: v for i, v in fresh.items()})
        return results  # type: ignore[return-value]

    def score_topk(
        self,
        prompt_ids: list[list[int]],
        response_ids: list[list[int]],
        k: int,
        progress: str | None = None,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """`score` plus the teacher's k most likely tokens at every response position.

        Returns (logprobs [t], topk_ids [t, k] int32, topk_logprobs [t, k] float32) per sample,
        from SGLang's `top_logprobs_num` on the same scoring request. Not cached (the cache
        stores sampled-token log-probs only).
        """
        if k < 1:
            raise ValueError(f"score_topk: k must be >= 1, got {k}")
        empty = (np.zeros(0, np.float32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
        results = [empty] * len(prompt_ids)
        todo = [i for i, response in enumerate(response_ids) if len(response)]
        todo.sort(key=lambda i: len(prompt_ids[i]))  # see _score_payload

        def payload(start: int, stop: int) -> dict:
            rows = todo[start:stop]
            return {
                **_score_payload([prompt_ids[i] for i in rows], [response_ids[i] for i in rows]),
                "top_logprobs_num": k,
            }

        for i, output in zip(todo, self._batched(len(todo), payload, progress)):
            where = f"sequence {i}"
            tops = output["meta_info"].get("input_top_logprobs") or []
            tail = tops[-len(response_ids[i]) :]
            if len(tail) != len(response_ids[i]) or any(
                top is None or len(top) != k for top in tail
            ):
                raise EngineError(
                    f"{where}: the engine did not return {k} input_top_logprobs per response token"
                )
            results[i] = (
                _response_logprobs(output, response_ids[i], where),
                np.asarray([[entry[1] for entry in top] for top in tail], dtype=np.int32),
                np.asarray([[entry[0] for entry in top] for top in tail], dtype=np.float32),
            )
        return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]

    # ------------------------------------------------------------------- management

    def health(self) -> dict[str, bool]:
        """GET /health on every URL (no retries): which servers are up."""
        status = {}
        for url in self.urls:
            try:
                status[url] = self.http.get(f"{url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                status[url] = False
        return status

    def wait_until_healthy(self, timeout: float = 600.0, poll: float = 0.5) -> list[str]:
        """Wait until at least one URL passes /health_generate; returns the healthy URLs."""
        deadline, last = time.monotonic() + timeout, {}
        while True:
            healthy = []
            for url in self.urls:
                try:
                    response = self.http.get(
                        f"{url}/health_generate",
                        timeout=max(min(30.0, deadline - time.monotonic()), 1.0),
                    )
                    last[url] = f"HTTP {response.status_code} {response.text[:200]}"
                    if response.status_code == 200:
                        healthy.append(url)
                except httpx.TransportError as err:
                    last[url] = f"{type(err).__name__}: {err}"
            if healthy:
                return healthy
            if time.monotonic() > deadline:
                raise TimeoutError(f"no engine became healthy within {timeout:.0f}s: {last}")
            time.sleep(poll)

    def model_info(self) -> dict:
        """/model_info of an engine (/get_model_info on servers that predate the name)."""
        for url in self.engine_urls:
            try:
                response = self.http.get(f"{url}/model_info", timeout=30)
                if response.status_code == 404:
                    response = self.http.get(f"{url}/get_model_info", timeout=30)
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                return response.json()
        return self.request("GET", "/get_model_info")  # retries and says what failed

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None
    ) -> list[dict]:
        """Reload weights on EVERY engine (each rollout engine must hold the same policy).

        Like SGLang, an engine's `weight_version` changes only when one is given here. The
        logprob-cache namespace is derived again from the new /model_info when next needed
        (the new checkpoint's content hash, or no cache if that path is not readable here);
        a rollout client that never scores never hashes a checkpoint.
        """
        body = {
            "model_path": str(model_path),
            **({"weight_version": weight_version} if weight_version else {}),
        }
        answers = []
        for url in self.engine_urls:
            try:
                response = self.http.post(
                    f"{url}/update_weights_from_disk", json=body, timeout=None
                )
            except httpx.TransportError as err:
                raise EngineError(
                    f"{url}/update_weights_from_disk: {type(err).__name__}: {err}"
                ) from err
            answer = response.json()
            if response.status_code != 200 or not answer.get("success"):
                raise EngineRequestError(
                    f"{url}/update_weights_from_disk: {answer.get('message', response.text)}",
                    response.status_code,
                )
            answers.append(answer)
        with self._lock:  # new weights: the namespace is derived again, on the next score()
            self._namespace, self._namespace_known = None, False
        return answers

    def flush_cache(self, timeout: float = 0.0) -> None:
        """Flush every engine's prefix cache, waiting up to `timeout` s for in-flight
        requests (an engine with requests in flight refuses: EngineRequestError)."""
        for url in self.engine_urls:
            response = self.http.post(f"{url}/flush_cache", params={"timeout": timeout})
            if response.status_code != 200:
                raise EngineRequestError(
                    f"{url}/flush_cache: HTTP {response.status_code}: {response.text.strip()}",
                    response.status_code,
                )

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.transport.close()
        if self._engines is not self.transport:
            self._engines.close()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _score_payload(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> dict:
    """The teacher scoring request: prompt+response, no new tokens, input log-probs from the
    last token of the batch's shortest prompt on (`_response_logprobs` keeps each
    sequence's last len(response)). One number for the batch, not one per sequence:
    sglang-router 0.3.2 answers 422 to a list (it types the field as i32); the callers sort
    sequences by prompt length, so a batch's prompts differ little."""
    return {
        "input_ids": [
            list(map(int, p)) + list(map(int, r)) for p, r in zip(prompt_ids, response_ids)
        ],
        "sampling_params": {"max_new_tokens": 0, "temperature": 0, "skip_special_tokens": False},
        "return_logprob": True,
        "logprob_start_len": min(len(p) for p in prompt_ids) - 1,
    }


def _response_logprobs(output: dict, response: list[int], where: str) -> np.ndarray:
    """slime's trim: drop input entry 0 (None), keep the last len(response) log-probs."""
    entries = output["meta_info"]["input_token_logprobs"][1:]
    tail = entries[-len(response) :]
    # SGLang reports ids >= vocab_size - 1 as 0 (its multimodal padding clip): tolerate that.
    if len(tail) != len(response) or any(
        int(e[1]) not in (int(t), 0) for e, t in zip(tail, response)
    ):
        raise EngineError(
            f"{where}: the engine's input_token_logprobs do not end with the response tokens"
        )
    if any(e[0] is None for e in tail):
        raise EngineError(f"{where}: the engine returned a null log-prob inside the response")
    return np.asarray([e[0] for e in tail], dtype=np.float32)


def scores_to_table(
    prompt_index: Sequence[int],
    sample_index: Sequence[int],
    logprobs: Sequence[np.ndarray],
    topk_ids: Sequence[np.ndarray] | None = None,
    topk_logprobs: Sequence[np.ndarray] | None = None,
) -> pa.Table:
    """Rows of `opd_core.schemas.TEACHER_LOGPROBS` (top-k columns null unless given)."""
    if not len(prompt_index) == len(sample_index) == len(logprobs):
        raise ValueError(
            f"prompt_index ({len(prompt_index)}), sample_index ({len(sample_index)}) and "
            f"logprobs ({len(logprobs)}) differ in length"
        )
    nested = lambda rows, dtype: (
        [None] * len(logprobs) if rows is None else [np.asarray(r, dtype).tolist() for r in rows]
    )
    return pa.table(
        {
            "prompt_index": pa.array(prompt_index, pa.int64()),
            "sample_index": pa.array(sample_index, pa.int32()),
            "teacher_logprobs": pa.array(
                [np.asarray(v, dtype=np.float32) for v in logprobs], pa.list_(pa.float32())
            ),
            "teacher_topk_ids": pa.array(
                nested(topk_ids, np.int32), pa.list_(pa.list_(pa.int32()))
            ),
            "teacher_topk_logprobs": pa.array(
                nested(topk_logprobs, np.float32), pa.list_(pa.list_(pa.float32()))
            ),
        },
        schema=TEACHER_LOGPROBS,
    )
