"""Two OPD rounds of a Qwen3-0.6B-shaped model on one GPU, offline, timed phase by phase.

    scripts/gpu_check.sh                        # on the GPU machine: installs .gpu-wheels/,
                                                # runs this under an 8-minute limit
    python scripts/gpu_check.py --device cpu --tiny   # the same steps on CPU, tiny shapes
                                                      # (tests/test_gpu_check.py runs this)

What it runs, all from this checkout, nothing downloaded:
 1. builds a student (seed 0) and a teacher (seed 1) with Qwen3-0.6B's shape (hidden 1024,
    28 layers, 16/8 heads, head_dim 128, intermediate 3072, vocabulary 151936) through the
    toy models' code (`opd_core.hf_utils.make_tiny_qwen3`: random weights, the toy tokenizer;
    token ids past the tokenizer's few hundred decode to nothing, which is fine for timing);
    `--layers N` builds fewer layers (printed);
 2. converts the student to torch_dist and checks HF-vs-Megatron logits parity, as the
    convert stage does (in a spawned child);
 3. starts a rollout engine (the student) and a teacher server on the device: real SGLang
    when it is importable, else the built-in engine, through the same launcher and flags;
 4. runs two rounds: rollouts (`generate_rollouts`, the round loop's own), teacher scores
    (`EngineClient.score`), old log-probs and GRPO + OPD advantages, one Megatron training
    step (on CUDA: bf16, Megatron DDP + DistributedOptimizer), HF export and the rollout
    engine's weight update (weight_version = round + 1);
 5. prints one table: seconds and tokens/s per phase, peak memory per process, and how
    closely the rollout engine's log-probs agree with the trainer's on the same tokens.

Not checked here: Ray placement and Prefect (neither is installed on that machine, and Ray's
wheel alone is several times the 64 MiB the checkout may carry); the training actor runs in
this process instead of a Ray actor. Placement is tested on CPU with logical GPUs
(tests/test_cluster.py, tests/test_fleet.py).

Exit status: 0 when both rounds ran; 2 with one line naming what is missing (a package, CUDA)
before anything starts; 1 with the failing step otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's opd_core, installed or not

QWEN3_0_6B = dict(
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    vocab_size=151936,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=512,
)
# Imported by the steps below; each comes from the system or from .gpu-wheels/.
REQUIRED = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "yaml",
    "megatron.core",
    "pydantic",
    "pyarrow",
    "fastapi",
    "uvicorn",
    "httpx",
    "tenacity",
    "psutil",
)


class Missing(SystemExit):
    """Something the check needs is not there: exit 2 with one line saying what."""

    def __init__(self, message: str):
        super().__init__(f"gpu_check: {message}")
        self.code = 2


def preflight(device: str, modules: tuple[str, ...] = REQUIRED) -> dict[str, str]:
    """The versions of what the check imports; `Missing` naming every absent module, or CUDA."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a missing parent package (megatron for megatron.core)
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise Missing(
            f"missing {', '.join(missing)} (Python {platform.python_version()}): run "
            "scripts/gpu_check.sh, which installs them from .gpu-wheels/ (`make gpu-wheels` "
            "fills that folder on a machine with network access)"
        )
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Missing(
            f"--device cuda, but torch {torch.__version__} sees no GPU "
            f"(built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "megatron.core", "sglang"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "?")
    if device == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(0)
    return versions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu_check.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU test)")
    parser.add_argument("--layers", type=int, default=None, help="fewer than Qwen3-0.6B's 28")
    parser.add_argument("--engine", choices=("auto", "sglang", "builtin"), default="auto")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per round")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    return parser.parse_args(argv)


class Table:
    """The one table the check prints: a row per step, then summary lines."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, int | None]] = []
        self.notes: list[tuple[str, str]] = []

    def add(self, step: str, seconds: float, tokens: int | None = None) -> None:
        self.rows.append((step, seconds, tokens))

    def note(self, what: str, value: str) -> None:
        self.notes.append((what, value))

    def render(self) -> str:
        lines = [f"{'step':<34}{'seconds':>9}{'tokens':>10}{'tokens/s':>11}"]
        for step, seconds, tokens in self.rows:
            rate = f"{tokens / seconds:>11.0f}" if tokens and seconds > 0 else f"{'':>11}"
            count = f"{tokens:>10d}" if tokens is not None else f"{'':>10}"
            lines.append(f"{step:<34}{seconds:>9.2f}{count}{rate}")
        width = max(len(w) for w, _ in self.notes) if self.notes else 0
        lines += [f"{what:<{width}}  {value}" for what, value in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "steps": [{"step": s, "seconds": t, "tokens": n} for s, t, n in self.rows],
            "notes": dict(self.notes),
        }


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.start = now - self.start, now
        return seconds


def peak_memory_gib(pid: int) -> float:
    """A process's peak resident memory (VmHWM), GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def gpu_memory_gib() -> dict[int, float]:
    """GPU memory in use per process (nvidia-smi), GiB; empty where it cannot tell."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage = {}
    for line in out.strip().splitlines():
        pid, used = (part.strip() for part in line.split(","))
        usage[int(pid)] = int(used) / 1024
    return usage


def server_pids(server) -> list[int]:
    """The server process and its children (the launcher's guard is the group leader)."""
    import psutil

    leader = psutil.Process(server.pid)
    return [leader.pid] + [child.pid for child in leader.children(recursive=True)]


def run(args: argparse.Namespace, table: Table) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from opd_core.algorithm.advantages import compute_advantages
    from opd_core.config import ConvertConfig, OPDRunConfig, ToyConfig
    from opd_core.engine.client import EngineClient
    from opd_core.engine.launcher import launch_server
    from opd_core.evaluation import chat_prompt_ids
    from opd_core.hf_utils import make_tiny_qwen3
    from opd_core.megatron.parallel import destroy_distributed, free_port
    from opd_core.rundir import RunDir
    from opd_core.stages.convert import convert_models
    from opd_core.toy.task import make_toy_splits
    from opd_core.trainer.actor import ActorSpec, TrainActor
    from opd_core.trainer.rollouts import generate_rollouts

    cuda = args.device == "cuda"
    shape = dict(TINY if args.tiny else QWEN3_0_6B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    engine = args.engine
    if engine == "auto":
        engine = "sglang" if cuda and importlib.util.find_spec("sglang") else "builtin"
    max_new = args.max_new_tokens or (16 if args.tiny else 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    table.note("model", ", ".join(f"{k} {v}" for k, v in shape.items() if k != "rope_theta"))
    table.note("engines", f"{engine} (rollout engine + teacher, on {args.device})")

    root = Path(args.out or tempfile.mkdtemp(prefix="opd-gpu-check-"))
    run_dir = RunDir.create(root, "gpu-check")
    timer = Timer()
    make_tiny_qwen3(run_dir.student_hf, seed=0, device=args.device, dtype=dtype, **shape)
    make_tiny_qwen3(run_dir.teacher_hf, seed=1, device=args.device, dtype=dtype, **shape)
    table.add("build student + teacher from seeds", timer.lap())

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:  # as the convert stage
        converted = pool.submit(convert_models, ConvertConfig(), run_dir, None, 0).result()
    parity = converted["parity"]
    table.add("convert to torch_dist + parity", timer.lap())
    table.note("HF vs Megatron logits (fp32)", f"max |diff| {parity['max_abs_logits_diff']:.2e}")

    cfg = OPDRunConfig.model_validate(
        {
            "rollout": {
                "backend": engine,
                "num_gpus_per_engine": 1 if cuda else 0,
                "mem_fraction_static": 0.15 if engine == "sglang" else None,
                "rollout_batch_size": args.prompts,
                "n_samples_per_prompt": args.samples,
                "rollout_max_response_len": max_new,
                "startup_timeout": 300,
            },
            "teacher": {
                "backend": engine,
                "num_gpus_per_engine": 1 if cuda else 0,
                "mem_fraction_static": 0.15 if engine == "sglang" else None,
                "startup_timeout": 300,
            },
            "reward": {"type": "none"},
            "algorithm": {"use_opd": True, "opd_type": "sglang", "opd_kl_coef": 1.0},
            "train": {
                "lr": 1e-5,
                "dtype": "bf16" if cuda else "fp32",
                "global_batch_size": args.prompts * args.samples,
                "micro_batch_size": 8,
            },
            "client": {"cache_dir": None, "timeout": 600},
        }
    )
    # Both servers on this device (the trainer shares it); CPU servers see no GPU.
    env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") if cuda else ""}
    with ThreadPoolExecutor(2) as pool:  # both at once; if one fails, stop the other
        starting = [
            pool.submit(
                launch_server, engine, path, section, run_dir.stage(name) / "server.log", env
            )
            for name, path, section in (
                ("train", run_dir.student_hf, cfg.rollout),
                ("teacher", run_dir.teacher_hf, cfg.teacher),
            )
        ]
    servers = [job.result() for job in starting if job.exception() is None]
    if len(servers) < len(starting):
        for server in servers:
            server.stop()
        raise next(job.exception() for job in starting if job.exception() is not None)
    rollout_server, teacher_server = servers
    actor = None
    try:
        table.add("start rollout engine + teacher", timer.lap())
        spec = ActorSpec.from_config(cfg, run_dir.student_hf, run_dir.student_torch_dist)
        actor = TrainActor()
        actor.setup(0, 1, "127.0.0.1", free_port(), spec)
        wrapper, optimizer = (type(x).__name__ for x in (actor.optim.model, actor.optim.optimizer))
        table.add(f"trainer setup ({wrapper}, {optimizer})", timer.lap())

        train, _ = make_toy_splits(ToyConfig(num_train=max(64, args.prompts), num_eval=16))
        tokenizer = AutoTokenizer.from_pretrained(run_dir.student_hf)
        prompt_ids = chat_prompt_ids(tokenizer, train)
        rollout_client = EngineClient(rollout_server.url, timeout=600)
        teacher_client = EngineClient(teacher_server.url, timeout=600)
        agreement = []
        for round_index in range(args.rounds):
            tag = f"round {round_index}"
            rollouts = generate_rollouts(
                cfg,
                round_index,
                train,
                prompt_ids,
                rollout_client,
                tokenizer,
                context_length=shape["max_position_embeddings"],
                weight_version=str(round_index),
            )
            batch = rollouts.batch()
            response_tokens = sum(len(r) for r in batch.response_ids)
            all_tokens = response_tokens + sum(len(p) for p in batch.prompt_ids)
            table.add(f"{tag} generate", timer.lap(), response_tokens)
            teacher = teacher_client.score(batch.prompt_ids, batch.response_ids)
            table.add(f"{tag} teacher score", timer.lap(), all_tokens)
            batch.old_logprobs = actor.compute_logprobs(batch)
            table.add(f"{tag} trainer log-probs", timer.lap(), all_tokens)
            diffs = np.concatenate(
                [
                    np.abs(np.asarray(r, np.float64) - np.asarray(o, np.float64))
                    for r, o in zip(rollouts.rollout_logprobs, batch.old_logprobs)
                ]
            )
            agreement.append(diffs)
            result = compute_advantages(
                cfg.algorithm,
                rewards=np.zeros(len(batch), np.float32),
                group_ids=np.asarray(rollouts.prompt_index),
                old_logprobs=batch.old_logprobs,
                teacher_logprobs=teacher,
            )
            batch.advantages = result.advantages
            metrics = actor.train_step(batch)
            table.add(f"{tag} train step (loss {metrics['loss']:+.4f})", timer.lap(), all_tokens)
            export = actor.export_hf(str(run_dir.hf_export(round_index)), str(run_dir.student_hf))
            rollout_client.update_weights_from_disk(export, weight_version=str(round_index + 1))
            table.add(f"{tag} export + weight update", timer.lap())
        diffs = np.concatenate(agreement)
        table.note(
            "rollout vs trainer log-probs",
            f"mean |diff| {diffs.mean():.2e}, p99 {np.quantile(diffs, 0.99):.2e}, "
            f"max {diffs.max():.2e} over {diffs.size} tokens",
        )
        memory = [f"trainer {peak_memory_gib(os.getpid()):.1f} GiB RAM"]
        if cuda:
            memory.append(f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB GPU (peak)")
            in_use = gpu_memory_gib()
            for name, server in (("rollout engine", rollout_server), ("teacher", teacher_server)):
                used = sum(in_use.get(pid, 0.0) for pid in server_pids(server))
                memory.append(f"{name} {used:.1f} GiB GPU")
        for name, server in (("rollout engine", rollout_server), ("teacher", teacher_server)):
            rss = max(peak_memory_gib(pid) for pid in server_pids(server))
            memory.append(f"{name} {rss:.1f} GiB RAM")
        table.note("peak memory", ", ".join(memory))
        rollout_client.close()
        teacher_client.close()
        return {
            "out": str(root),
            "agreement_max": float(diffs.max()),
            "parity_max": parity["max_abs_logits_diff"],
            "generated_tokens": sum(n or 0 for s, _, n in table.rows if s.endswith("generate")),
        }
    finally:
        for server in servers:
            server.stop()
        if actor is not None:
            destroy_distributed()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, ever
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    versions = preflight(args.device)
    table = Table()
    table.note("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))
    try:
        summary = run(args, table)
    except Exception as err:
        print(table.render(), flush=True)
        print(
            f"gpu_check: FAILED after {time.perf_counter() - started:.0f}s: "
            f"{type(err).__name__}: {err}",
            file=sys.stderr,
        )
        raise
    table.note("total", f"{time.perf_counter() - started:.0f} s")
    print(table.render())
    results = Path(summary["out"]) / "gpu_check.json"
    results.write_text(json.dumps({"summary": summary, **table.to_dict()}, indent=1))
    print(f"results: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
