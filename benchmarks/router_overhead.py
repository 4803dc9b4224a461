"""What sglang-router costs: `--requests` small /generate calls direct to an engine vs
through the router (in front of the same engine, and in front of two).

    python -m benchmarks.router_overhead [--requests 256] [--concurrency 1,8] [--trials 3]

Engines are built-in servers started by the launcher, exactly as the pipeline starts them;
the router is sglang-router started by `opd_core.engine.router.launch_router`. Each call is
a 3-token prompt and 1 greedy new token on the toy Qwen3, so the numbers are the HTTP and
routing overhead, not the model. The paths are timed alternately, best of `--trials`.
Writes benchmarks/results/router_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from opd_core.config import TeacherConfig
from opd_core.engine.launcher import launch_server
from opd_core.engine.router import launch_router
from opd_core.hf_utils import make_tiny_qwen3

RESULTS = Path(__file__).parent / "results" / "router_overhead.json"
BODY = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1, "temperature": 0}}


def run(url: str, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    with httpx.Client(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)
    ) as http:

        def one(_: int) -> None:
            started = time.perf_counter()
            response = http.post("/generate", json=BODY)
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "requests_per_s": round(requests / seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        model = make_tiny_qwen3(Path(tmp) / "model", max_position_embeddings=64)
        cfg = TeacherConfig(startup_timeout=300)
        engines = [
            stack.enter_context(launch_server("builtin", model, cfg, Path(tmp) / f"e{i}.log"))
            for i in range(2)
        ]
        one = stack.enter_context(
            launch_router([engines[0].url], log_path=Path(tmp) / "router1.log")
        )
        two = stack.enter_context(
            launch_router([e.url for e in engines], log_path=Path(tmp) / "router2.log")
        )
        paths = {
            "direct (1 engine)": engines[0].url,
            "router -> 1 engine": one.url,
            "router -> 2 engines": two.url,
        }
        for url in paths.values():  # warm up: first forwards, connections
            run(url, 32, 4)
        best: dict[tuple[str, int], dict] = {}
        for _ in range(args.trials):
            for concurrency in levels:
                for name, url in paths.items():
                    result = run(url, args.requests, concurrency)
                    key = (name, concurrency)
                    if key not in best or result["requests_per_s"] > best[key]["requests_per_s"]:
                        best[key] = result

    table = Table(title=f"{args.requests} small /generate calls (best of {args.trials})")
    for column in ("path", "concurrency", "requests/s", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column == "path" else "right")
    rows = []
    for (name, concurrency), result in best.items():
        rows.append({"path": name, "concurrency": concurrency, **result})
        table.add_row(
            name,
            str(concurrency),
            str(result["requests_per_s"]),
            str(result["p50_ms"]),
            str(result["p95_ms"]),
        )
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"requests": args.requests, "trials": args.trials, "rows": rows}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
