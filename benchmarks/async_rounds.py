"""Serial vs asynchronous rounds (rollout.async_rounds) on the toy demo: seconds and pass@1.

    python -m benchmarks.async_rounds [--rounds 30] [--seeds 0] [--last 10]
                                      [--variants serial async async-1t] [--fresh]

Each variant is `opd run --config configs/toy.yaml seed=S rollout.num_rollout=R` plus:

- `serial`: nothing (the default: generate, score, train, sync one after the other; every
  process keeps torch's default threads, 2 on this machine);
- `async`: `rollout.async_rounds=true`, threads as serial (the rollout engine, the teacher and
  the actor then compete for the same 2 cores while the phases overlap);
- `async-1t`: async, and each process its own thread: `OMP_NUM_THREADS=1` in the run's
  environment (the built-in rollout engine and teacher server inherit it: torch's intra-op
  threads) and `train.ray.actor_num_cpus_per_rank=1` (the actor's `torch.set_num_threads`);
- `serial-1t`: serial with those one-thread settings (to tell the overlap from the threads).

Per run: round seconds (median of the last `--last` rounds' `seconds` in train/metrics.arrow:
the round's wall time on the driver), the train stage's seconds (its _stage.json), the whole
`opd run`, the sum of each phase, greedy pass@1 before and after (baseline_eval, final_eval),
and the load average (os.getloadavg) at the start and end: the machine is shared, so read
seconds next to it. A finished run is kept in `--work-dir` and reused on a rerun (`--fresh`
reruns). Prints one table; writes benchmarks/results/async_rounds.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks.peer_trl import _load, opd_run_command
from opd_core.io import read_arrow, read_json, write_json
from opd_core.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy.yaml"
ONE_THREAD = (["train.ray.actor_num_cpus_per_rank=1"], {"OMP_NUM_THREADS": "1"})
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "serial": ([], {}),
    "async": (["rollout.async_rounds=true"], {}),
    "async-1t": (["rollout.async_rounds=true", *ONE_THREAD[0]], ONE_THREAD[1]),
    "serial-1t": ONE_THREAD,
}
PHASES = ("time_generate", "time_score", "time_train", "time_wait_rollouts", "time_sync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--last", type=int, default=10, help="rounds in the median")
    parser.add_argument(
        "--variants", nargs="+", default=["serial", "async", "async-1t"], choices=list(VARIANTS)
    )
    parser.add_argument("--work-dir", default=str(ROOT / "artifacts" / "bench_async_rounds"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "async_rounds.json"))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    work = Path(args.work_dir).resolve()
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            rows.append(
                run_variant(variant, seed, args, work / f"{variant}-r{args.rounds}-s{seed}")
            )
            print_row(rows[-1])
    print_table(rows)
    write_json(
        Path(args.out),
        {
            "config": str(CONFIG.relative_to(ROOT)),
            "rounds": args.rounds,
            "median_of_last": args.last,
            "cpu_count": os.cpu_count(),
            "rows": rows,
        },
    )


def run_variant(variant: str, seed: int, args, out: Path) -> dict:
    overrides, env = VARIANTS[variant]
    run_id = f"{variant}-s{seed}"
    command = opd_run_command(seed, args.rounds, run_id, out, overrides)
    done = out / "run.json"
    if args.fresh or not done.is_file() or read_json(done)["command"] != command:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        print(f"[async] {variant} seed {seed}: starting (load {_load(os.getloadavg())})")
        load_start = os.getloadavg()
        started = time.perf_counter()
        with (out / "opd.log").open("w") as log:
            subprocess.run(
                command,
                cwd=ROOT,
                env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
            )
        write_json(
            done,
            {
                "command": command,
                "env": env,
                "whole_seconds": time.perf_counter() - started,
                "load_average_start": load_start,
                "load_average_end": os.getloadavg(),
            },
        )
    record = read_json(done)
    run_dir = RunDir.open(out / run_id)
    rounds = read_arrow(run_dir.stage("train") / "metrics.arrow")
    seconds = rounds.column("seconds").to_numpy()
    return {
        "variant": variant,
        "seed": seed,
        "env": record["env"],
        "overrides": overrides,
        "round_seconds_median_last": float(np.median(seconds[-args.last :])),
        "round_seconds_sum": float(seconds.sum()),
        "train_stage_seconds": read_json(run_dir.stage("train") / "_stage.json").get("seconds"),
        "whole_seconds": record["whole_seconds"],
        "phase_seconds": {
            name: float(np.nansum(rounds.column(name).to_numpy(zero_copy_only=False)))
            for name in PHASES
            if name in rounds.column_names
        },
        "pass_at_1_baseline": read_json(run_dir.stage("baseline_eval") / "summary.json")[
            "pass_at_1"
        ],
        "pass_at_1_final": read_json(run_dir.stage("final_eval") / "summary.json")["pass_at_1"],
        "load_average_start": record["load_average_start"],
        "load_average_end": record["load_average_end"],
    }


HEADER = (
    f"{'variant':<10}{'seed':>5}{'round s':>9}{'train stage s':>15}{'whole s':>9}"
    f"{'pass@1':>17}   load average start -> end"
)


def _line(r: dict) -> str:
    return (
        f"{r['variant']:<10}{r['seed']:>5}{r['round_seconds_median_last']:>9.2f}"
        f"{r['train_stage_seconds']:>15.1f}{r['whole_seconds']:>9.1f}"
        f"{r['pass_at_1_baseline']:>9.3f} -> {r['pass_at_1_final']:.3f}   "
        f"{_load(r['load_average_start'])} -> {_load(r['load_average_end'])}"
    )


def print_row(r: dict) -> None:
    print(f"[async] {_line(r)}", flush=True)


def print_table(rows: list[dict]) -> None:
    print(f"\n{HEADER}")
    for r in rows:
        print(_line(r))


if __name__ == "__main__":
    main()
