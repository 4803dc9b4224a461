"""Hostile requests against a built-in engine server: what status codes they get, and what
they do to the valid requests sent at the same time.

    python -m benchmarks.hostile_requests --label after                 # this checkout
    python -m benchmarks.hostile_requests --label before --checkout /tmp/old_opd

Starts `python -m opd_core.engine.server` from `--checkout` (default: this one) on a toy
model the script builds, and runs five scenarios against it:

- storm: `--count` hypothesis-generated hostile requests (`hostile_requests()`: wrong types,
  huge and negative numbers, 2**63, NaN/inf as strings, huge lists, deep nesting, unicode,
  invalid JSON, wrong content types, oversized bodies, bad weight updates, wrong methods and
  paths), one at a time, while a thread keeps sending valid greedy requests and compares
  them with their answers from before the storm; then whether /health is still 200;
- top_k: 80 concurrent valid requests with a few `top_k = 2**63` requests among them, as in
  issue 14 (5 trials): how many of the valid ones failed;
- big_text: one 10 MB `text` body while /health is polled: the slowest /health answer;
- nonexistent: `python -m opd_core.engine.server --model-path /nonexistent`: seconds until
  the process exits (capped at `--exit-cap`).

The request generator is also the property-based suite's (tests/test_engine_hostile.py).
Writes benchmarks/results/hostile_requests.json (one entry per `--label`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "hostile_requests.json"
ROOT = Path(__file__).resolve().parent.parent

# The toy model every engine test uses: vocabulary 384, context 64.
VOCAB, CONTEXT = 384, 64
VALID = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
VALID_PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [20], [30, 31]]


@dataclass(frozen=True)
class HostileRequest:
    kind: str  # what makes it hostile: the row of the status table
    method: str
    path: str
    body: bytes | None = None
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})

    def send(self, http: httpx.Client, url: str) -> int | str:
        """The status code, or the name of the transport error (a broken server)."""
        try:
            response = http.request(
                self.method, url + self.path, content=self.body, headers=self.headers
            )
            return response.status_code
        except httpx.TransportError as err:
            return type(err).__name__


def _json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


# ------------------------------------------------------------------------------ values

SAMPLING_FIELDS = {
    "max_new_tokens": "int",
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "min_p": "float",
    "stop": "strs",
    "stop_token_ids": "ints",
    "ignore_eos": "bool",
    "skip_special_tokens": "bool",
    "no_stop_trim": "bool",
    "sampling_seed": "int",
    "n": "int",
    "frequency_penalty": "float",
    "repetition_penalty": "float",
    "min_new_tokens": "int",
}
TOP_FIELDS = {
    "input_ids": "ints",
    "text": "str",
    "return_logprob": "bool",
    "logprob_start_len": "int",
    "top_logprobs_num": "int",
    "return_text_in_logprobs": "bool",
    "stream": "bool",
    "rid": "str",
    "sampling_params": "object",
}
EXTREME_INTS = [
    2**63,
    2**63 - 1,
    2**64 - 1,
    -(2**63),
    -(2**63) - 1,
    2**31,
    -(2**31) - 1,
    10**30,
    -1,
    -2,
    0,
    CONTEXT,
    CONTEXT + 1,
    VOCAB,
]
EXTREME_FLOATS = [1e308, -1e308, 5e-324, -0.0, 1e-7, 1.0000001, -1.0, 2.5, 1e30]
NON_FINITE_STRINGS = ["NaN", "nan", "inf", "-inf", "Infinity", "-Infinity", "1e999", "0x10"]
WRONG = {
    "int": st.one_of(
        st.sampled_from(NON_FINITE_STRINGS),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
        st.lists(st.integers(0, 9), max_size=3),
        st.just({"a": 1}),
        st.text(max_size=5),
    ),
    "float": st.one_of(
        st.sampled_from(NON_FINITE_STRINGS),
        st.booleans(),
        st.lists(st.floats(0, 1), max_size=3),
        st.just({"x": 0.5}),
        st.text(max_size=5),
    ),
    "bool": st.one_of(st.integers(-2, 2), st.sampled_from(["true", "false", "yes", ""])),
    "str": st.one_of(st.integers(), st.booleans(), st.lists(st.integers(), max_size=3)),
    "strs": st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=3)),
    "ints": st.one_of(
        st.text(max_size=8),
        st.lists(st.text(max_size=3), min_size=1, max_size=3),
        st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=3),
        st.lists(st.booleans(), min_size=1, max_size=3),
        st.just({"0": 1}),
    ),
    "object": st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
}


def _with(path: tuple[str, ...], value) -> dict:
    """VALID with `path` (e.g. ("sampling_params", "top_k")) set to `value`."""
    body = json.loads(json.dumps(VALID))
    target = body
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return body


def _field_path(fields: dict[str, str]):
    prefix = ("sampling_params",) if fields is SAMPLING_FIELDS else ()
    return st.sampled_from(sorted(fields)).map(lambda name: (prefix + (name,), fields[name]))


# ------------------------------------------------------------------------- strategies


@st.composite
def _wrong_type(draw):
    path, kind = draw(st.one_of(_field_path(SAMPLING_FIELDS), _field_path(TOP_FIELDS)))
    return HostileRequest("wrong_type", "POST", "/generate", _json(_with(path, draw(WRONG[kind]))))


@st.composite
def _extreme_number(draw):
    path, kind = draw(st.one_of(_field_path(SAMPLING_FIELDS), _field_path(TOP_FIELDS)))
    if kind not in ("int", "float"):
        path, kind = ("sampling_params", "top_k"), "int"
    value = draw(st.sampled_from(EXTREME_INTS + (EXTREME_FLOATS if kind == "float" else [])))
    return HostileRequest("extreme_number", "POST", "/generate", _json(_with(path, value)))


@st.composite
def _non_finite(draw):
    name = draw(st.sampled_from(["temperature", "top_p", "min_p", "repetition_penalty"]))
    if draw(st.booleans()):  # as a JSON string
        value = draw(st.sampled_from(NON_FINITE_STRINGS))
        return HostileRequest(
            "non_finite", "POST", "/generate", _json(_with(("sampling_params", name), value))
        )
    literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"]))
    body = b'{"input_ids": [1, 2], "sampling_params": {"%s": %s}}' % (name.encode(), literal)
    return HostileRequest("non_finite", "POST", "/generate", body)


@st.composite
def _huge_list(draw):
    size = draw(st.sampled_from([CONTEXT + 1, 1000, 50_000, 200_000]))
    which = draw(st.sampled_from(["prompt", "batch", "stop", "stop_token_ids", "rid", "params"]))
    if which == "prompt":
        body = {"input_ids": [7] * size, "sampling_params": {"max_new_tokens": 1}}
    elif which == "batch":
        body = {"input_ids": [[7]] * size, "sampling_params": {"max_new_tokens": 1}}
    elif which == "stop":
        body = _with(("sampling_params", "stop"), ["x"] * size)
    elif which == "stop_token_ids":
        body = _with(("sampling_params", "stop_token_ids"), [3] * size)
    elif which == "rid":
        body = _with(("rid",), "r" * size)
    else:  # one sequence, a parameter list of the wrong length
        body = _with(("sampling_params",), [{"max_new_tokens": 1}] * size)
    return HostileRequest(f"huge_list:{which}", "POST", "/generate", _json(body))


@st.composite
def _deep_nesting(draw):
    depth = draw(st.sampled_from([3, 64, 1000, 5000, 100_000]))
    where = draw(st.sampled_from(["input_ids", "sampling_params", "text"]))
    nested = b"[" * depth + b"1" + b"]" * depth
    return HostileRequest(
        "deep_nesting", "POST", "/generate", b'{"%s": %s}' % (where.encode(), nested)
    )


@st.composite
def _unicode(draw):
    choice = draw(st.integers(0, 4))
    if choice == 0:  # any unicode text as a prompt (may well be valid: then it is answered)
        text = draw(st.text(min_size=1, max_size=40))
        body = _json({"text": text, "sampling_params": {"max_new_tokens": 1}})
    elif choice == 1:  # a lone surrogate, escaped: not valid JSON text
        body = b'{"text": "\\ud800x", "sampling_params": {"max_new_tokens": 1}}'
    elif choice == 2:  # invalid UTF-8 bytes
        body = b'{"text": "\xc0\xaf\xff\xfe", "sampling_params": {"max_new_tokens": 1}}'
    elif choice == 3:  # unicode where an id or a number belongs
        value = draw(st.text(min_size=1, max_size=5))
        body = _json(_with(("sampling_params", "max_new_tokens"), value))
    else:  # a text longer than the context can hold
        body = _json({"text": "汉字 🙂 " * 200, "sampling_params": {"max_new_tokens": 1}})
    return HostileRequest("unicode", "POST", "/generate", body)


@st.composite
def _invalid_json(draw):
    valid = _json(VALID)
    body = draw(
        st.one_of(
            st.binary(max_size=64),
            st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
            st.sampled_from(
                [b"", b"{", b"[", b"null", b"[]", b"{}", b'"text"', b"123", b'{"a":}', b"[1,2,]"]
            ),
        )
    )
    return HostileRequest("invalid_json", "POST", "/generate", body)


@st.composite
def _content_type(draw):
    content_type = draw(
        st.sampled_from(
            [
                None,
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/xml",
                "application/octet-stream",
                "",
                "json",
            ]
        )
    )
    headers = {} if content_type is None else {"content-type": content_type}
    return HostileRequest("content_type", "POST", "/generate", _json(VALID), headers)


@st.composite
def _oversized(draw, limit: int):
    extra = draw(st.sampled_from([1, 1000, limit]))
    if draw(st.booleans()):
        body = b'{"text": "' + b"a" * (limit + extra) + b'"}'
    else:
        count = (limit + extra) // 2 + 1
        body = b'{"input_ids": [' + b"1," * count + b"1]}"
    return HostileRequest("oversized", "POST", "/generate", body)


@st.composite
def _bad_sampling(draw):
    """Values of the right type that are out of range, or parameters that do not exist."""
    name, value = draw(
        st.sampled_from(
            [
                ("top_k", 0),
                ("top_k", -5),
                ("top_k", 2**63),
                ("top_k", 2**40),
                ("top_p", 0.0),
                ("top_p", 1.5),
                ("min_p", -0.1),
                ("min_p", 2.0),
                ("temperature", -1.0),
                ("max_new_tokens", -1),
                ("max_new_tokens", 2**63 - 1),
                ("max_new_tokens", CONTEXT),
                ("n", 0),
                ("n", -1),
                ("n", 10**9),
                ("stop", ["x" * 100_000]),
                ("stop_token_ids", [VOCAB]),
                ("stop_token_ids", [-1]),
                ("sampling_seed", 2**64),
                ("frequency_penalty", 5.0),
                ("repetition_penalty", 0.0),
                ("min_new_tokens", -1),
                ("regex", "("),
                ("temprature", 0.5),
                ("seed", 1),
                ("max_tokens", 3),
            ]
        )
    )
    return HostileRequest(
        "bad_sampling", "POST", "/generate", _json(_with(("sampling_params", name), value))
    )


@st.composite
def _bad_request_shape(draw):
    body = draw(
        st.sampled_from(
            [
                {"input_ids": [1, VOCAB]},
                {"input_ids": [-1]},
                {"input_ids": [[1], [2, 10**12]]},
                {"input_ids": []},
                {"input_ids": [[]]},
                {"input_ids": [[1], 2]},
                {"input_ids": [1], "text": "a"},
                {},
                {"sampling_params": {"max_new_tokens": 1}},
                {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5},
                {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": -2},
                {"input_ids": [1], "return_logprob": True, "top_logprobs_num": 10**9},
                {"input_ids": [1], "return_logprob": True, "top_logprobs_num": -1},
                {"input_ids": [[1], [2]], "sampling_params": [{}, {}, {}]},
                {"input_ids": [[1], [2]], "return_logprob": [True]},
                {"input_ids": [[1], [2]], "rid": ["a", "a"]},
                {"input_ids": [[1], [2]], "rid": ["a"]},
                {"input_ids": [1], "rid": ["a", "b"]},
                {"input_ids": [1], "sampling_params": [{}]},
                {
                    "input_ids": list(range(1, CONTEXT - 2)),
                    "sampling_params": {"max_new_tokens": 9},
                },
                {"input_ids": [1], "return_hidden_states": True},
                {"input_ids": [1], "token_ids_logprob": [1, 2]},
                {"input_ids": [1], "image_data": "http://x/y.png"},
                {"input_ids": [[1], [2]], "sampling_params": [{"n": 2}, {"n": 3}]},
                {"input_ids": [[1]], "return_logprob": [True], "sampling_params": {"n": 2}},
                [1, 2, 3],
                "input_ids",
                None,
            ]
        )
    )
    return HostileRequest("bad_shape", "POST", "/generate", _json(body))


@st.composite
def _bad_weight_update(draw, broken_model: str | None):
    paths = ["/nonexistent", "", "/", "/etc/passwd", "x" * 5000, "../../..", "\u0000"]
    if broken_model:
        paths.append(broken_model)
    body = draw(
        st.one_of(
            st.sampled_from(paths).map(lambda p: {"model_path": p}),
            st.sampled_from([{}, {"path": "/x"}, {"model_path": 5}, {"model_path": None}, [1]]),
            st.sampled_from(paths).map(lambda p: {"model_path": p, "weight_version": 7}),
        )
    )
    return HostileRequest("bad_weights", "POST", "/update_weights_from_disk", _json(body))


@st.composite
def _wrong_route(draw):
    method, path = draw(
        st.sampled_from(
            [
                ("GET", "/generate"),
                ("DELETE", "/generate"),
                ("PATCH", "/update_weights_from_disk"),
                ("POST", "/health"),
                ("PUT", "/model_info"),
                ("GET", "/nope"),
                ("POST", "/v1/unknown"),
                ("GET", "/flush_cache?timeout=abc"),
                ("POST", "/flush_cache?timeout=-1"),
                ("GET", "/" + "a" * 5000),
                ("GET", "/generate/%00"),
            ]
        )
    )
    return HostileRequest("wrong_route", method, path, _json(VALID) if method != "GET" else None)


def hostile_requests(
    body_limit: int = 1 << 20, broken_model: str | None = None
) -> st.SearchStrategy[HostileRequest]:
    """Every kind of hostile request above; `body_limit` is the server's body size limit (the
    oversized ones go just over it), `broken_model` a model dir with a truncated weight file."""
    kinds = [
        _wrong_type(),
        _extreme_number(),
        _non_finite(),
        _huge_list(),
        _deep_nesting(),
        _unicode(),
        _invalid_json(),
        _content_type(),
        _oversized(body_limit),
        _bad_sampling(),
        _bad_request_shape(),
        _bad_weight_update(broken_model),
        _wrong_route(),
    ]
    # sampled_from + flatmap, not one_of: one_of favours its first branches.
    return st.sampled_from(kinds).flatmap(lambda kind: kind)


def draw_requests(count: int, **kwargs) -> list[HostileRequest]:
    """`count` requests from `hostile_requests(**kwargs)`, the same ones on every run."""
    drawn: list[HostileRequest] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile_requests(**kwargs))
    def collect(request: HostileRequest) -> None:
        drawn.append(request)

    collect()
    return drawn


# ------------------------------------------------------------------------- scenarios


class ValidTraffic:
    """A thread that keeps sending valid greedy requests (one every `pause` s) and compares
    each answer with the answer to the same request sent alone before (`expected`)."""

    def __init__(self, url: str, expected: dict[int, list[int]], pause: float = 0.05):
        self.url, self.expected, self.pause = url, expected, pause
        self.sent, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self._stop.is_set():
                i = self.sent % len(VALID_PROMPTS)
                body = {"input_ids": VALID_PROMPTS[i], "sampling_params": GREEDY}
                self.sent += 1
                try:
                    response = http.post(f"{self.url}/generate", json=body)
                    if response.status_code != 200:
                        self.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    elif response.json()["output_ids"] != self.expected[i]:
                        self.failures.append(f"prompt {i}: different output")
                except httpx.TransportError as err:
                    self.failures.append(type(err).__name__)
                self._stop.wait(self.pause)

    def __enter__(self) -> ValidTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


GREEDY = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}


def greedy_outputs(url: str) -> dict[int, list[int]]:
    with httpx.Client(timeout=60) as http:
        return {
            i: http.post(
                f"{url}/generate", json={"input_ids": p, "sampling_params": GREEDY}
            ).json()["output_ids"]
            for i, p in enumerate(VALID_PROMPTS)
        }


def storm(url: str, requests: list[HostileRequest]) -> dict:
    expected = greedy_outputs(url)
    by_kind: dict[str, Counter] = {}
    started = time.perf_counter()
    with ValidTraffic(url, expected) as valid, httpx.Client(timeout=120) as http:
        for request in requests:
            kind = request.kind.split(":")[0]
            by_kind.setdefault(kind, Counter())[str(request.send(http, url))] += 1
    seconds = time.perf_counter() - started
    total = sum(by_kind.values(), Counter())
    return {
        "requests": len(requests),
        "seconds": round(seconds, 1),
        "status_codes": dict(sorted(total.items())),
        "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "valid_sent": valid.sent,
        "valid_failed": len(valid.failures),
        "valid_failures": valid.failures[:5],
        "healthy_after": _status(url, "/health_generate") == 200,
    }


def top_k_scenario(url: str, trials: int = 5, valid: int = 80, hostile: int = 3) -> dict:
    """Issue 14's case: top_k = 2**63 in a few requests batched with valid ones."""
    bad = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 4, "top_k": 2**63}}
    good = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 4, "temperature": 0.7}}
    failed, bad_codes = 0, Counter()
    with httpx.Client(timeout=120) as http, ThreadPoolExecutor(32) as pool:
        for _ in range(trials):
            bodies = [good] * valid
            for j in range(hostile):
                bodies.insert((j + 1) * valid // (hostile + 1), bad)
            codes = list(pool.map(lambda b: _post(http, url, b), bodies))
            failed += sum(code != 200 for body, code in zip(bodies, codes) if body is good)
            bad_codes.update(str(code) for body, code in zip(bodies, codes) if body is bad)
    return {
        "trials": trials,
        "valid_per_trial": valid,
        "valid_failed": failed,
        "top_k_2**63_status": dict(bad_codes),
    }


def big_text_scenario(url: str, megabytes: int = 10) -> dict:
    """The slowest /health answer while one `megabytes` MB text request is being handled."""
    body = json.dumps({"text": "What is 12 + 34? " * (megabytes * 2**20 // 17)}).encode()
    result: dict = {}

    def send_big() -> None:
        started = time.perf_counter()
        with httpx.Client(timeout=300) as http:
            code = http.post(
                f"{url}/generate", content=body, headers={"content-type": "application/json"}
            ).status_code
        result.update(big_status=code, big_seconds=round(time.perf_counter() - started, 2))

    sender = threading.Thread(target=send_big)
    sender.start()
    latencies = []
    with httpx.Client(timeout=60) as http:
        while sender.is_alive():
            started = time.perf_counter()
            try:
                code = http.get(f"{url}/health").status_code
            except httpx.TransportError as err:
                code = type(err).__name__
            latencies.append((time.perf_counter() - started, code))
            time.sleep(0.05)
    sender.join()
    worst = max(latencies) if latencies else (0.0, None)
    return {
        **result,
        "health_polls": len(latencies),
        "health_max_seconds": round(worst[0], 3),
        "health_codes": dict(Counter(str(c) for _, c in latencies)),
    }


def nonexistent_scenario(checkout: Path, cap: float) -> dict:
    command = [sys.executable, "-m", "opd_core.engine.server", "--model-path", "/nonexistent"]
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        env=_env(checkout),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        code = process.wait(timeout=cap)
        seconds = round(time.perf_counter() - started, 2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code, seconds = None, None
    output = process.stdout.read().decode(errors="replace").strip().splitlines()
    fatal = [line for line in output if "nonexistent" in line and "rror" in line]
    return {
        "exit_code": code,
        "seconds_to_exit": seconds,
        "cap_seconds": cap,
        "log_line": (fatal or output or [""])[-1][:300],
    }


def _post(http: httpx.Client, url: str, body) -> int | str:
    try:
        return http.post(f"{url}/generate", json=body).status_code
    except httpx.TransportError as err:
        return type(err).__name__


def _status(url: str, path: str) -> int | str:
    try:
        return httpx.get(url + path, timeout=30).status_code
    except httpx.TransportError as err:
        return type(err).__name__


def _env(checkout: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}


def start_server(checkout: Path, model: Path, port: int, extra: list[str], log: Path):
    command = [
        sys.executable,
        "-m",
        "opd_core.engine.server",
        "--model-path",
        str(model),
        "--port",
        str(port),
        *extra,
    ]
    process = subprocess.Popen(
        command, env=_env(checkout), stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while _status(url, "/health_generate") != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process, url


def broken_model_dir(model: Path, where: Path) -> Path:
    """A copy of `model` whose safetensors file is cut in half."""
    import shutil

    broken = where / "broken_model"
    shutil.copytree(model, broken, dirs_exist_ok=True)
    for weights in broken.glob("*.safetensors"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True, help="e.g. before / after")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="whose server to start")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--body-limit", type=int, default=1 << 20)
    parser.add_argument(
        "--server-args", default="", help="extra server flags, e.g. '--max-body-bytes 1048576'"
    )
    parser.add_argument("--exit-cap", type=float, default=60.0)
    parser.add_argument("--scenarios", default="storm,top_k,big_text,nonexistent")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from opd_core.engine.launcher import free_port
    from opd_core.hf_utils import make_tiny_qwen3

    chosen = args.scenarios.split(",")
    results: dict = {"checkout": str(args.checkout), "server_args": args.server_args}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_qwen3(Path(tmp) / "model", max_position_embeddings=CONTEXT)
        broken = broken_model_dir(model, Path(tmp))
        if set(chosen) & {"storm", "top_k", "big_text"}:
            process, url = start_server(
                args.checkout,
                model,
                free_port(),
                args.server_args.split(),
                Path(tmp) / "server.log",
            )
            try:
                if "storm" in chosen:
                    requests = draw_requests(
                        args.count, body_limit=args.body_limit, broken_model=str(broken)
                    )
                    results["storm"] = storm(url, requests)
                if "top_k" in chosen:
                    results["top_k"] = top_k_scenario(url)
                if "big_text" in chosen:
                    results["big_text"] = big_text_scenario(url)
            finally:
                process.terminate()
                process.wait(timeout=30)
        if "nonexistent" in chosen:
            results["nonexistent"] = nonexistent_scenario(args.checkout, args.exit_cap)

    print_tables(args.label, results)
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    saved[args.label] = results
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(saved, indent=2) + "\n")


def print_tables(label: str, results: dict) -> None:
    console = Console()
    if "storm" in results:
        storm_result = results["storm"]
        codes = sorted({c for row in storm_result["by_kind"].values() for c in row})
        table = Table(
            title=f"{label}: {storm_result['requests']} hostile requests, by status code "
            f"({storm_result['seconds']} s)"
        )
        table.add_column("kind")
        for code in codes:
            table.add_column(code, justify="right")
        for kind, row in storm_result["by_kind"].items():
            table.add_row(kind, *(str(row.get(c, "")) for c in codes))
        table.add_row("all", *(str(storm_result["status_codes"].get(c, "")) for c in codes))
        console.print(table)
        console.print(
            f"valid requests during the storm: {storm_result['valid_sent']} sent, "
            f"{storm_result['valid_failed']} failed; healthy after: "
            f"{storm_result['healthy_after']}"
        )
    for name in ("top_k", "big_text", "nonexistent"):
        if name in results:
            console.print(f"{name}: {json.dumps(results[name])}")


if __name__ == "__main__":
    main()
