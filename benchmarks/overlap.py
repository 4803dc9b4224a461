"""Serial vs streamed scoring vs asynchronous rounds on the toy demo: round seconds, flow
seconds, pass@1.

    python -m benchmarks.overlap [--seeds 0 1] [--rounds 100] [--last 50]
                                 [--modes serial streamed async serial_all_cores ...]

Each seed and mode is one whole `opd run --config configs/toy.yaml` (what `make demo` runs,
the toy models from .cache/opd-toy), one after the other, with the mode's overrides. Modes:

- serial: `rollout.stream_scoring=false`, the toy's one torch thread per server
  (`rollout.cpu_threads` / `teacher.cpu_threads` = 1);
- streamed: streamed scoring, one thread per server (the toy's default);
- async: streamed scoring and `rollout.async_rounds=true` (round k+1 generates while round k
  trains); the training actor then takes the cores the servers' threads leave
  (`cluster.actor_threads`), so engine, teacher and actor each have a thread of the 2 cores;
- serial_all_cores, streamed_all_cores: serial and streamed with torch's default threads per
  server (every core: `cpu_threads=null`), which makes the two servers fight over the cores.

Per run: round seconds = the median of the last `--last` rounds' `seconds` (wall time of a
round, train/metrics.arrow), the per-phase medians, "scored": seconds from the round's start
until every teacher score is in (what streaming shortens), the median overlap of scoring
with generation (generate end - score start, when positive), the whole flow's wall seconds,
the train stage's seconds, the final greedy pass@1 (our eval), and the load average
(os.getloadavg) at start and end: the machine is shared. Prints one table; writes
benchmarks/results/overlap.json (`--reread --work-dir DIR` recomputes the medians of those
runs from their files).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.peer_trl import _run_logged, opd_run_command
from opd_core.io import read_arrow, read_json, write_json
from opd_core.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "overlap.json"
ALL_CORES = ["rollout.cpu_threads=null", "teacher.cpu_threads=null"]
MODES = {
    "serial": ["rollout.stream_scoring=false"],
    "streamed": ["rollout.stream_scoring=true"],
    "async": ["rollout.stream_scoring=true", "rollout.async_rounds=true"],
    "serial_all_cores": ["rollout.stream_scoring=false", *ALL_CORES],
    "streamed_all_cores": ["rollout.stream_scoring=true", *ALL_CORES],
}
DEFAULT_MODES = ["serial", "streamed", "async"]
PHASES = ("generate", "reward", "score", "train", "sync")


def run_one(work: Path, mode: str, seed: int, rounds: int, last: int) -> dict:
    """One whole `opd run` of the toy demo in this mode; its timings and pass@1."""
    run_id = f"{mode}-s{seed}"
    command = opd_run_command(seed, rounds, run_id, work, MODES[mode])
    load_start = os.getloadavg()
    started = time.perf_counter()
    _run_logged(command, work / f"{run_id}.log")
    flow_seconds = time.perf_counter() - started
    run_dir = RunDir.open(work / run_id)
    return {
        "flow_seconds": flow_seconds,
        "train_stage_seconds": read_json(run_dir.stage("train") / "_stage.json")["seconds"],
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        **round_stats(run_dir, last),
    }


def round_stats(run_dir: RunDir, last: int) -> dict:
    """Medians over the last `last` rounds of a finished run, and its pass@1."""
    rows = read_arrow(run_dir.train_metrics).to_pylist()[-last:]
    median = lambda values: float(np.median(list(values)))
    return {
        "round_seconds": median(r["seconds"] for r in rows),
        "phase_seconds": {p: median(r[f"time_{p}"] for r in rows) for p in PHASES},
        # From the round's start until every teacher score is in: what streaming shortens.
        "scored_by_seconds": median(r["time_score_end"] for r in rows),
        "score_overlap_seconds": median(
            max(0.0, r["time_generate_end"] - r["time_score_start"]) for r in rows
        ),
        "pass_at_1_baseline": read_json(run_dir.eval_summary("baseline_eval"))["pass_at_1"],
        "pass_at_1_final": read_json(run_dir.eval_summary("final_eval"))["pass_at_1"],
        "timeline_png": str(run_dir.stage("final_eval") / "timeline.png"),
    }


def print_table(rows: list[dict], last: int) -> None:
    print(
        f"\n{'mode':<19}{'seed':>5}{f'round s (med last {last})':>24}{'gen':>7}{'score':>7}"
        f"{'overlap':>8}{'scored':>7}{'train':>7}{'sync':>7}{'flow s':>8}{'pass@1':>16}"
        "   load 1-min start -> end"
    )
    for r in rows:
        p = r["phase_seconds"]
        print(
            f"{r['mode']:<19}{r['seed']:>5}{r['round_seconds']:>24.3f}{p['generate']:>7.3f}"
            f"{p['score']:>7.3f}{r['score_overlap_seconds']:>8.3f}"
            f"{r['scored_by_seconds']:>7.3f}{p['train']:>7.3f}{p['sync']:>7.3f}"
            f"{r['flow_seconds']:>8.1f}{r['pass_at_1_baseline']:>8.3f} -> "
            f"{r['pass_at_1_final']:.3f}   {r['load_average_start'][0]:.2f} -> "
            f"{r['load_average_end'][0]:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--last", type=int, default=50, help="rounds the median is over")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--reread",
        action="store_true",
        help="recompute the round medians of --out's runs from --work-dir, running nothing",
    )
    args = parser.parse_args()
    if args.reread:
        results = read_json(args.out)
        for row in results["rows"]:
            run_dir = RunDir.open(args.work_dir / f"{row['mode']}-s{row['seed']}")
            row.update(round_stats(run_dir, args.last))
        results["median_over_last_rounds"] = args.last
        print_table(results["rows"], args.last)
        write_json(args.out, results)
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="opd-overlap-"))
    work.mkdir(parents=True, exist_ok=True)  # a --work-dir that does not exist yet
    rows = []
    for seed in args.seeds:
        for mode in args.modes:
            print(f"[overlap] seed {seed} {mode} ...", flush=True)
            rows.append(
                {"mode": mode, "seed": seed, **run_one(work, mode, seed, args.rounds, args.last)}
            )
            print_table(rows[-1:], args.last)
    print_table(rows, args.last)
    write_json(
        args.out,
        {
            "config": "configs/toy.yaml",
            "rounds": args.rounds,
            "median_over_last_rounds": args.last,
            "cpu_count": os.cpu_count(),
            "modes": {mode: MODES[mode] for mode in args.modes},
            "rows": rows,
        },
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
