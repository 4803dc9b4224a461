"""A robust client for SGLang-protocol servers (the real SGLang or the built-in one).

    with EngineClient(["http://127.0.0.1:30000", "http://127.0.0.1:30001"], cache_dir=".cache/t") as client:
        client.wait_until_healthy(600)
        outputs = client.generate(prompt_ids, {"max_new_tokens": 64, "temperature": 1.0})
        teacher_logprobs = client.score(prompt_ids, response_ids, progress="teacher")

One pooled `httpx.Client`; at most `max_concurrency` requests in flight; sequences sent
`batch_size` at a time as one batch request; failover between URLs and retries with backoff
on connection errors, 5xx and malformed answers (never on a 4xx): see `transport.py`.

`score` is teacher scoring as slime does it: prompt+response `input_ids`, `max_new_tokens`
0, `return_logprob`, `logprob_start_len` 0; drop entry 0 (its logprob is None) and keep the
last `len(response)` values. Results are cached under `cache_dir`, keyed by the teacher's
fingerprint (model path + weights fingerprint/version from /get_model_info) and the ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from opd_core.engine.gc_freeze import freeze_long_lived_objects
from opd_core.engine.logprob_cache import LogprobCache
from opd_core.engine.protocol import per_sequence_params
from opd_core.engine.transport import EngineError, EngineRequestError, FailoverTransport
from opd_core.schemas import TEACHER_LOGPROBS

__all__ = ["EngineClient", "EngineError", "EngineRequestError", "scores_to_table"]


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
    ):
        self.transport = FailoverTransport(
            urls, timeout, max_concurrency, max_retries, api_key, backoff_initial, backoff_max
        )
        self.urls, self.http, self.request = (
            self.transport.urls,
            self.transport.http,
            self.transport.request,
        )
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="opd-client")
        self.cache_dir = cache_dir
        self._cache: LogprobCache | None = None
        self._fingerprint: str | None = None
        self._lock = threading.Lock()
        # Decoding big log-prob responses must not rescan every long-lived object (gc_freeze.py).
        freeze_long_lived_objects()

    @classmethod
    def from_config(
        cls, urls: str | Sequence[str], cfg, api_key: str | None = None
    ) -> EngineClient:
        """From an `opd_core.config.ClientConfig`."""
        return cls(
            urls,
            timeout=cfg.timeout,
            max_concurrency=cfg.max_concurrency,
            batch_size=cfg.batch_size,
            max_retries=cfg.max_retries,
            api_key=api_key,
            cache_dir=cfg.cache_dir,
        )

    # ------------------------------------------------------------------- generation

    def generate(
        self,
        input_ids: list[list[int]],
        sampling_params: dict | list[dict],
        return_logprob: bool = False,
        progress: str | None = None,
        **request_fields: Any,
    ) -> list[dict]:
        """SGLang /generate for many sequences; responses in input order.

        `sampling_params` is one dict for all or one per sequence; `request_fields` are other
        /generate fields (logprob_start_len, top_logprobs_num, ...) applied to every sequence.
        A `seed` (or `sampling_seed`) in a shared dict seeds the whole call: sequence i is
        sampled with seed + i, so repeated prompts get different samples and a rerun with the
        same seed reproduces all of them.
        """
        per_sequence = isinstance(sampling_params, list)
        if per_sequence and len(sampling_params) != len(input_ids):
            raise ValueError(
                f"sampling_params: {len(sampling_params)} entries for {len(input_ids)} sequences"
            )
        sampling_params = per_sequence_params(sampling_params, len(input_ids))
        per_sequence = isinstance(sampling_params, list)

        def payload(start: int, stop: int) -> dict:
            return {
                "input_ids": [list(map(int, ids)) for ids in input_ids[start:stop]],
                "sampling_params": sampling_params[start:stop] if per_sequence else sampling_params,
                "return_logprob": return_logprob,
                **request_fields,
            }

        return self._batched(len(input_ids), payload, progress)

    def _batched(self, total: int, make_payload, progress: str | None) -> list[dict]:
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

            answer = self.request("POST", "/generate", make_payload(*span), check=check)
            bar.update(size)
            return answer

        try:
            return [out for chunk in self.pool.map(send, spans) for out in chunk]
        finally:
            bar.close()

    # ---------------------------------------------------------------------- scoring

    @property
    def cache(self) -> LogprobCache | None:
        """The teacher-logprob cache, opened on first use (a rollout client never opens it)."""
        if self._cache is None and self.cache_dir:
            with self._lock:
                if self._cache is None:
                    self._cache = LogprobCache(self.cache_dir)
        return self._cache

    def fingerprint(self) -> str:
        """Identifies the teacher's weights: the cache key's first part."""
        with self._lock:
            if self._fingerprint is None:
                info = self.model_info()
                version = info.get("weights_fingerprint") or info.get("weight_version") or ""
                self._fingerprint = f"{info.get('model_path', '?')}|{version}"
            return self._fingerprint

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
        if self.cache is not None and todo:
            fingerprint = self.fingerprint()
            keys = {i: LogprobCache.key(fingerprint, prompt_ids[i], response_ids[i]) for i in todo}
            hits = self.cache.get_many(list(keys.values()))
            for i in todo:
                if keys[i] in hits:
                    results[i] = hits[keys[i]]
            todo = [i for i in todo if results[i] is None]

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
        if self.cache is not None and fresh:
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

        def payload(start: int, stop: int) -> dict:
            rows = todo[start:stop]
            # Entries from the last prompt token on: the top-k of prompt positions would be
            # thrown away, and at k entries a position they are most of the response's bytes.
            return {
                **_score_payload([prompt_ids[i] for i in rows], [response_ids[i] for i in rows]),
                "logprob_start_len": [len(prompt_ids[i]) - 1 for i in rows],
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
        return self.request("GET", "/get_model_info")

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None
    ) -> list[dict]:
        """Reload weights on EVERY server (each rollout engine must hold the same policy)."""
        body = {
            "model_path": str(model_path),
            **({"weight_version": weight_version} if weight_version else {}),
        }
        answers = []
        for url in self.urls:
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
        with self._lock:
            self._fingerprint = None  # new weights, new cache namespace
        return answers

    def flush_cache(self) -> None:
        for url in self.urls:
            self.http.post(f"{url}/flush_cache").raise_for_status()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.transport.close()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _score_payload(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> dict:
    """slime's teacher scoring request: prompt+response, no new tokens, log-probs from position 0."""
    return {
        "input_ids": [
            list(map(int, p)) + list(map(int, r)) for p, r in zip(prompt_ids, response_ids)
        ],
        "sampling_params": {"max_new_tokens": 0, "temperature": 0, "skip_special_tokens": False},
        "return_logprob": True,
        "logprob_start_len": 0,
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
            f"prompt_index ({len(prompt_index)}), sample_index ({len(sample_index)}) and logprobs ({len(logprobs)}) differ in length"
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
