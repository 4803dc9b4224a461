"""Serial vs streamed scoring on the toy train stage: round seconds, stage seconds, pass@1.

    python -m benchmarks.overlap [--seeds 0 1] [--rounds 30] [--last 10]
                                 [--modes serial streamed serial_all_cores streamed_all_cores]

Download, convert and the baseline eval of configs/toy.yaml run once (the toy models come
from .cache/opd-toy); then for each seed and mode a copy of that run directory gets the
teacher stage's server and the train stage (in this process, one local Ray cluster for all,
as tests/test_self_healing.py does), then the final eval. Modes:

- serial: `rollout.stream_scoring=false`, the toy's one torch thread per server
  (`rollout.cpu_threads` / `teacher.cpu_threads` = 1);
- streamed: streamed scoring, one thread per server;
- serial_all_cores, streamed_all_cores: the same with torch's default threads per server
  (every core: `cpu_threads=null`), which makes the two servers fight over the cores.

Per run: round seconds = the median of the last `--last` rounds' `seconds` (wall time of a
round, train/metrics.arrow), the per-phase medians, "scored": seconds from the round's start
until every teacher score is in (what streaming shortens), the median overlap of scoring
with generation (generate end - score start, when positive), the train stage's wall seconds, the
final greedy pass@1 (our eval), and the load average (os.getloadavg) at start and end: the
machine is shared. Prints one table; writes benchmarks/results/overlap.json (`--reread
--work-dir DIR` recomputes the medians of those runs from their files).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from opd_core.config import load_config
from opd_core.io import read_arrow, read_json, write_json
from opd_core.rundir import RunDir
from opd_core.stages import Convert, Download, Teacher, Train
from opd_core.stages.evaluate import BaselineEval, FinalEval

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "overlap.json"
ALL_CORES = ["rollout.cpu_threads=null", "teacher.cpu_threads=null"]
MODES = {
    "serial": ["rollout.stream_scoring=false"],
    "streamed": ["rollout.stream_scoring=true"],
    "serial_all_cores": ["rollout.stream_scoring=false", *ALL_CORES],
    "streamed_all_cores": ["rollout.stream_scoring=true", *ALL_CORES],
}
PHASES = ("generate", "reward", "score", "train", "sync")


def prepare(root: Path, overrides: list[str]) -> Path:
    """download + convert + baseline eval, once."""
    cfg = load_config(CONFIG, overrides)
    run_dir = RunDir.create(root, "base")
    for stage in (Download, Convert, BaselineEval):
        stage(cfg, run_dir).run()
    return run_dir.root


def run_one(prepared: Path, root: Path, overrides: list[str], last: int) -> dict:
    shutil.copytree(prepared, root, symlinks=True)
    cfg = load_config(CONFIG, overrides)
    run_dir = RunDir.open(root)
    load_start = os.getloadavg()
    with Teacher(cfg, run_dir).serve() as teacher:
        started = time.perf_counter()
        Train(cfg, run_dir).run(teacher=teacher)
        stage_seconds = time.perf_counter() - started
    FinalEval(cfg, run_dir).run()
    return {
        "train_stage_seconds": stage_seconds,
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
        f"{'overlap':>8}{'scored':>7}{'train':>7}{'stage s':>9}{'pass@1':>16}"
        "   load 1-min start -> end"
    )
    for r in rows:
        p = r["phase_seconds"]
        print(
            f"{r['mode']:<19}{r['seed']:>5}{r['round_seconds']:>24.3f}{p['generate']:>7.3f}"
            f"{p['score']:>7.3f}{r['score_overlap_seconds']:>8.3f}"
            f"{r['scored_by_seconds']:>7.3f}{p['train']:>7.3f}"
            f"{r['train_stage_seconds']:>9.1f}{r['pass_at_1_baseline']:>8.3f} -> "
            f"{r['pass_at_1_final']:.3f}   {r['load_average_start'][0]:.2f} -> "
            f"{r['load_average_end'][0]:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--last", type=int, default=50, help="rounds the median is over")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
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
    base = [f"rollout.num_rollout={args.rounds}", f"train.save_interval={args.rounds}"]
    rows = []
    ray.init(include_dashboard=False, num_cpus=8)  # one cluster for every run
    try:
        prepared = prepare(work / "prepared", base)
        for seed in args.seeds:
            for mode in args.modes:
                print(f"[overlap] seed {seed} {mode} ...", flush=True)
                overrides = [*base, f"seed={seed}", *MODES[mode]]
                result = run_one(prepared, work / f"{mode}-s{seed}", overrides, args.last)
                rows.append({"mode": mode, "seed": seed, **result})
                print_table(rows[-1:], args.last)
    finally:
        ray.shutdown()
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
