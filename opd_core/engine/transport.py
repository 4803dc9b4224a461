"""HTTP transport to one or more engine URLs: pooled connections, failover, retries with backoff.

    transport = FailoverTransport(["http://a:30000", "http://b:30000"], timeout=120,
                                  max_concurrency=16)
    answer = transport.request("POST", "/generate", payload, check=validate_shape)

Each request tries every URL in turn (failover), starting from a rotating offset so that
healthy servers share the load; a URL that just failed goes last for a few seconds. If all
fail with a connection error, a timeout, a 5xx or a malformed answer, it waits (exponential
backoff with jitter, tenacity) and tries again, up to `max_retries` times, then raises
`EngineError`. A 4xx is the caller's mistake: no retry, an `EngineRequestError` with the
server's message.

Every answered request is logged as (url, path, sent, answered) in `transport.log`
(perf_counter seconds; `RequestLog.drain()` takes them): when each URL was busy, for the
round timeline. Behind a router that URL is the router's.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

try:  # orjson (a Prefect dependency) decodes the big logprob lists several times faster
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

_COOLDOWN_S = 5.0  # how long a URL that failed is tried after the others


class EngineError(RuntimeError):
    """The engine could not be reached or kept answering wrongly, after all retries."""


class EngineRequestError(EngineError):
    """The engine rejected the request (HTTP 4xx); retrying would not help."""

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


class _Retryable(Exception):
    pass


class RequestLog:
    """(url, path, sent, answered) of answered requests, perf_counter seconds, thread-safe.
    Bounded: a client nobody drains keeps only the newest `maxlen`."""

    def __init__(self, maxlen: int = 100_000):
        self._entries: deque[tuple[str, str, float, float]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def record(self, url: str, path: str, sent: float, answered: float) -> None:
        with self._lock:
            self._entries.append((url, path, sent, answered))

    def drain(self) -> list[tuple[str, str, float, float]]:
        """The entries so far, removed from the log."""
        with self._lock:
            entries = list(self._entries)
            self._entries.clear()
        return entries


class FailoverTransport:
    def __init__(
        self,
        urls: str | Sequence[str],
        timeout: float = 120.0,
        max_concurrency: int = 16,
        max_retries: int = 5,
        api_key: str | None = None,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
    ):
        if isinstance(urls, str):
            urls = urls.split(",")
        self.urls = [u.strip().rstrip("/") for u in urls if u.strip()]
        if not self.urls:
            raise ValueError("urls: give at least one engine URL")
        self.max_retries, self.backoff_initial, self.backoff_max = (
            max_retries,
            backoff_initial,
            backoff_max,
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            timeout=timeout,
            headers=headers,
            limits=httpx.Limits(
                max_connections=max_concurrency, max_keepalive_connections=max_concurrency
            ),
        )
        self._offset = itertools.count()
        self._failed_at: dict[str, float] = {}
        self.log = RequestLog()

    def _candidates(self) -> list[str]:
        start = next(self._offset) % len(self.urls)
        rotated = self.urls[start:] + self.urls[:start]
        now = time.monotonic()
        # Stable sort: URLs that failed recently go last, the rest keep the rotation.
        return sorted(rotated, key=lambda u: now - self._failed_at.get(u, -1e9) < _COOLDOWN_S)

    def _once(self, method: str, path: str, payload: Any) -> httpx.Response:
        """One pass over all URLs; _Retryable if none gave a usable answer."""
        errors = []
        for url in self._candidates():
            sent = time.perf_counter()
            try:
                response = self.http.request(method, url + path, json=payload)
            except httpx.TransportError as err:  # refused, reset, timed out
                self._failed_at[url] = time.monotonic()
                errors.append(f"{url}: {type(err).__name__}: {err}")
                continue
            if response.status_code >= 500:
                self._failed_at[url] = time.monotonic()
                errors.append(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
                continue
            if response.status_code >= 400:
                raise EngineRequestError(
                    f"{url}{path}: HTTP {response.status_code}: {response.text[:1000]}",
                    response.status_code,
                )
            self.log.record(url, path, sent, time.perf_counter())
            return response
        raise _Retryable("; ".join(errors))

    def request(self, method: str, path: str, payload: Any = None, check=None) -> Any:
        """Send with failover and retries; returns the decoded JSON (or text) answer.

        `check(answer)` may raise ValueError for an answer of the wrong shape: that counts as
        a failed attempt, like a 5xx, so one garbled response does not crash a long run.
        """
        retrying = Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential_jitter(initial=self.backoff_initial, max=self.backoff_max),
            retry=retry_if_exception_type(_Retryable),
        )
        try:
            for attempt in retrying:
                with attempt:
                    response = self._once(method, path, payload)
                    try:
                        answer = (
                            _loads(response.content)
                            if "json" in response.headers.get("content-type", "")
                            else response.text
                        )
                        if check is not None:
                            check(answer)
                    except ValueError as err:
                        raise _Retryable(f"{response.url}: malformed answer: {err}") from err
                    return answer
        except RetryError as err:
            cause = err.last_attempt.exception()
            raise EngineError(
                f"{method} {path} failed after {self.max_retries + 1} attempts on {self.urls}: "
                f"{cause}"
            ) from None

    def close(self) -> None:
        self.http.close()
