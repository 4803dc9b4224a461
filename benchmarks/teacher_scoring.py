"""Teacher-scoring throughput: server with concurrent batched requests vs one request per
sample vs a direct in-process batched forward.

    python -m benchmarks.teacher_scoring [--rollouts 256] [--shapes 32x8,64x4,128x2]

All three score the same rollouts (random token ids; prompt ~40 and response ~16 tokens)
with the same toy Qwen3 teacher (hidden 96, 3 layers) and report scored tokens per second
(prompt + response tokens through the model). The server is the built-in one, started as
its own process by the launcher, exactly as the teacher stage does it.

The batched path is swept over request shapes, `BATCHxCONCURRENCY` (sequences per request x
requests in flight, i.e. `client.batch_size` x `client.max_concurrency`): on a CPU server
the HTTP and JSON work of each request runs on the same cores as the forward, so the shape
matters there (on a GPU server it does not). All paths are timed alternately, best of
`--trials` fresh servers x `--repeats`. Targets: server_batched (the best shape) >= 0.8 x
in_process, and >= 5 x per_sample. Writes benchmarks/results/teacher_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM

from opd_core.config import TeacherConfig
from opd_core.engine.client import EngineClient
from opd_core.engine.launcher import launch_server
from opd_core.hf_utils import make_tiny_qwen3

RESULTS = Path(__file__).parent / "results" / "teacher_scoring.json"


def make_rollouts(count: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(3, vocab, rng.integers(prompt_len - 4, prompt_len + 5)).tolist()
        for _ in range(count)
    ]
    responses = [
        rng.integers(3, vocab, rng.integers(response_len - 4, response_len + 5)).tolist()
        for _ in range(count)
    ]
    return prompts, responses


@torch.inference_mode()
def score_in_process(model, prompts, responses, batch_size: int) -> list[np.ndarray]:
    """The floor: left-padded batched forwards, log_softmax, gather. No HTTP, no JSON."""
    results = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            p + r
            for p, r in zip(
                prompts[start : start + batch_size], responses[start : start + batch_size]
            )
        ]
        longest = max(map(len, rows))
        ids = torch.zeros((len(rows), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, longest - len(row) :] = torch.tensor(row)
            mask[i, longest - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
        shifted = logits[:, :-1].float()  # column c predicts the token in column c+1
        logprobs = shifted.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2) - torch.logsumexp(
            shifted, dim=-1
        )
        for i, response in enumerate(responses[start : start + batch_size]):
            results.append(logprobs[i, longest - 1 - len(response) :].numpy())
    return results


def seconds_of(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


class InProcessScorer:
    """`score_in_process` in its own fresh process, timed on request.

    The 2-core box is noisy per process (one process can run ~30 % slower than the next for
    its whole life), so the in-process path gets fresh processes just as the server path
    gets fresh servers, and neither is measured in the benchmark's own process.
    """

    def __init__(self, model_dir: Path, prompts, responses, batch_size: int):
        spawn = mp.get_context("spawn")
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(
            target=_scorer_main,
            daemon=True,
            args=(child, str(model_dir), prompts, responses, batch_size),
        )
        self.process.start()
        self.conn.recv()  # loaded and warmed up

    def time_once(self) -> tuple[float, list[np.ndarray]]:
        self.conn.send(True)
        return self.conn.recv()

    def __enter__(self) -> InProcessScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.conn.send(False)
        self.process.join(timeout=30)


def _scorer_main(conn, model_dir: str, prompts, responses, batch_size: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    score_in_process(model, prompts, responses, batch_size)
    conn.send("ready")
    while conn.recv():
        conn.send(seconds_of(lambda: score_in_process(model, prompts, responses, batch_size)))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(n) for n in part.split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(
            f"--shapes: expected BATCHxCONCURRENCY[,...] like 32x8,128x2, got {text!r}"
        )
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--response-len", type=int, default=16)
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=parse_shapes("32x8,64x4,128x2"),
        help="request shapes to sweep: sequences per request x requests in flight",
    )
    parser.add_argument(
        "--max-batch", type=int, default=64, help="server's max sequences per forward"
    )
    parser.add_argument("--trials", type=int, default=3, help="fresh server processes")
    parser.add_argument("--repeats", type=int, default=4, help="timings of each path per trial")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_qwen3(
            Path(tmp) / "teacher",
            hidden_size=96,
            num_hidden_layers=3,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
        )
        prompts, responses = make_rollouts(
            args.rollouts, args.prompt_len, args.response_len, vocab=384
        )
        tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
        cfg = TeacherConfig(
            startup_timeout=120, extra_args=["--max-running-requests", str(args.max_batch)]
        )

        # Best time of each path over trials x repeats, the paths alternating: every path gets
        # the same number of tries, in the same fresh processes' lifetimes, spread over the
        # same stretch of time.
        paths = [("server", shape) for shape in args.shapes] + ["per_sample", "in_process"]
        best = {path: float("inf") for path in paths}
        for trial in range(args.trials):
            with (
                launch_server(
                    "builtin", model_dir, cfg, Path(tmp) / f"server{trial}.log"
                ) as server,
                ExitStack() as stack,
                InProcessScorer(model_dir, prompts, responses, args.max_batch) as in_process,
            ):
                clients = {
                    ("server", (batch, concurrency)): stack.enter_context(
                        EngineClient(server.url, batch_size=batch, max_concurrency=concurrency)
                    )
                    for batch, concurrency in args.shapes
                }
                for client in clients.values():  # warm-up: connections, the server's first batches
                    client.score(prompts, responses)
                for _ in range(args.repeats):
                    for path, client in clients.items():
                        seconds, scores = seconds_of(lambda: client.score(prompts, responses))  # noqa: B023 - called at once
                        best[path] = min(best[path], seconds)
                    seconds, reference = in_process.time_once()
                    best["in_process"] = min(best["in_process"], seconds)
                with EngineClient(
                    server.url, batch_size=1, max_concurrency=1
                ) as client:  # slow: once per trial
                    seconds, _ = seconds_of(lambda: client.score(prompts, responses))  # noqa: B023
                    best["per_sample"] = min(best["per_sample"], seconds)

    best_shape = min(args.shapes, key=lambda shape: best["server", shape])
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(scores, reference))
    results = {
        "server_batched": tokens / best["server", best_shape],
        "per_sample": tokens / best["per_sample"],
        "in_process": tokens / best["in_process"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")

    table = Table(
        title=f"teacher scoring: {args.rollouts} rollouts, {tokens} tokens, "
        f"best of {args.trials} servers x {args.repeats} "
        f"(max |diff| server vs in-process {max_diff:.1e})"
    )
    for column in ("path", "request shape", "seconds", "tokens/s", "vs in_process"):
        table.add_column(column, justify="left" if column == "path" else "right")
    rows = [
        (
            "server_batched" + (" (best)" if shape == best_shape else ""),
            f"{shape[0]}x{shape[1]}",
            best["server", shape],
        )
        for shape in args.shapes
    ]
    rows += [
        ("per_sample", "1x1", best["per_sample"]),
        ("in_process", f"{args.max_batch} per forward", best["in_process"]),
    ]
    for name, shape, seconds in rows:
        table.add_row(
            name,
            shape,
            f"{seconds:.3f}",
            f"{tokens / seconds:,.0f}",
            f"{best['in_process'] / seconds:.2f}x",
        )
    console = Console()
    console.print(table)
    ok_a = results["server_batched"] >= 0.8 * results["in_process"]
    ok_b = results["server_batched"] >= 5 * results["per_sample"]
    console.print(
        f"server_batched >= 0.8 x in_process: {'yes' if ok_a else 'NO'}   "
        f"server_batched >= 5 x per_sample: {'yes' if ok_b else 'NO'} "
        f"({results['server_batched'] / results['per_sample']:.1f}x)"
    )
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
