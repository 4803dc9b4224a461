"""Ours vs TRL's on-policy distillation on the toy demo: same models, prompts, budget, schedule.

    make bench-peer          # creates .venv-trl once, then runs this
    python -m benchmarks.peer_trl [--seeds 0 1] [--systems trl ours ours-async] [--rounds N]
                                  [--fresh]

For each seed, one after the other: TRL 1.16's `DistillationTrainer` (benchmarks/trl_distill.py,
in its own venv), then ours, `opd run --config configs/toy.yaml seed=S run.run_id=...`. Both
get the toy teacher and student that `build_toy_models(cfg.toy)` builds (cached in
.cache/opd-toy), the prompts of the project's round sampling (round r takes
`rollout_batch_size` prompts drawn with `np.random.default_rng([seed, r])`, each
`n_samples_per_prompt` times: 64 x 4 = 256 samples a step), the same budget (100 steps, 16
new tokens at temperature 1), the same lr for every step (our schedule, computed here by
megatron's OptimizerParamScheduler as the actors run it: 3e-3 peak, 10 warmup steps, cosine
to 3e-4), AdamW (0.9, 0.98, eps 1e-8), grad-norm clip 1, fp32 and 2 torch threads. TRL trains
with beta = 1, the full-vocabulary reverse KL, on every batch generated on-policy; ours with
the toy config (top-8 OPD). Both students are then scored by our evaluation code (the eval
stages' `evaluate_benchmarks`: greedy pass@1 with our verifier on the toy eval split).

Seconds: TRL's train = `trainer.train()`; its whole run = the TRL script (start-up, model
loading, training, saving) plus its baseline and final evaluation. Ours: train = the sum of
the rounds' `seconds` in train/metrics.arrow (the train stage's wall time is recorded too);
whole run = the `opd run` process. Gain per 100 s = (final - baseline pass@1) / train seconds
x 100. The load average (os.getloadavg) is recorded at every run's start and end.

Each finished (system, seed) is kept in `--work-dir`/<system>-s<seed>/peer_result.json and
skipped on a rerun, as is a finished TRL training or `opd run` whose result was not read yet
(`--fresh` reruns everything), so a killed benchmark resumes. Prints one table and writes
benchmarks/results/peer_trl.json with the ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from opd_core.config import OPDRunConfig, load_config
from opd_core.io import read_arrow, read_json, write_json
from opd_core.megatron.optim import build_optimizer
from opd_core.rundir import RunDir
from opd_core.schemas import PROMPTS
from opd_core.stages import BaselineEval, Download
from opd_core.trainer.rollouts import round_draw

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy.yaml"
TRL_SCRIPT = ROOT / "benchmarks" / "trl_distill.py"
RESULT = "peer_result.json"
# Our variants: extra `opd run` overrides. ours-async: asynchronous rounds (round k+1 made while
# round k trains) with one torch thread per training rank, so the three processes (engine,
# teacher and actor: the toy config gives the servers one thread each) overlap on 2 cores.
OURS = {
    "ours": [],
    "ours-async": ["rollout.async_rounds=true"],  # the actor's threads: cluster.actor_threads
}
# What of a run's output reaches the console: TRL's logged steps, our rounds' summaries, errors.
PROGRESS = re.compile(r"\{'loss'|^trl: |round \d+: |Error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--systems", nargs="+", default=["trl", "ours"], choices=["trl", *OURS])
    parser.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    parser.add_argument("--work-dir", default=str(ROOT / "artifacts" / "peer_trl"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peer_trl.json"))
    parser.add_argument("--fresh", action="store_true", help="rerun finished (system, seed)s")
    parser.add_argument(
        "--rounds", type=int, help="steps for both (default: the config's num_rollout, 100)"
    )
    args = parser.parse_args()
    if "trl" in args.systems and not Path(args.trl_python).is_file():
        sys.exit(f"{args.trl_python} not found: `make bench-peer` creates the TRL venv")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    rows = []
    for seed in args.seeds:
        for system in args.systems:
            out = work / f"{system}-s{seed}"
            if (out / RESULT).is_file() and not args.fresh:
                print(f"[peer] {system} seed {seed}: done before, kept ({out / RESULT})")
                rows.append(read_json(out / RESULT))
                continue
            if args.fresh:
                shutil.rmtree(out, ignore_errors=True)
            print(f"[peer] {system} seed {seed}: starting (load {_load(os.getloadavg())})")
            run = run_trl if system == "trl" else partial(run_ours, variant=system)
            row = {"system": system, "seed": seed, "load_average_start": os.getloadavg()}
            overrides = [f"seed={seed}"]
            if args.rounds:
                overrides.append(f"rollout.num_rollout={args.rounds}")
            row.update(run(load_config(CONFIG, overrides), out, args))
            row["load_average_end"] = os.getloadavg()
            row["gain"] = row["pass_at_1_final"] - row["pass_at_1_baseline"]
            row["gain_per_100s"] = 100 * row["gain"] / row["train_seconds"]
            write_json(out / RESULT, row)
            rows.append(row)
            print(
                f"[peer] {system} seed {seed}: train {row['train_seconds']:.1f} s, whole "
                f"{row['whole_seconds']:.1f} s, pass@1 {row['pass_at_1_baseline']:.3f} -> "
                f"{row['pass_at_1_final']:.3f}",
                flush=True,
            )
    summary = summarize(rows)
    print_table(rows, summary)
    write_json(
        Path(args.out),
        {"config": str(CONFIG.relative_to(ROOT)), "rounds": args.rounds, **summary, "rows": rows},
    )


# ----------------------------------------------------------------------------------- TRL


def run_trl(cfg: OPDRunConfig, out: Path, args) -> dict:
    seed = cfg.seed
    # Models and splits exactly as our download stage writes them (toy models from the cache).
    data = RunDir(out.parent / f"data-s{seed}")
    Download(cfg, data).run()
    train = read_arrow(data.train_data, PROMPTS)
    job = {
        "student_dir": str(data.student_hf),
        "teacher_dir": str(data.teacher_hf),
        "steps": step_prompts(cfg, train),
        "lr": cfg.train.lr,
        "lrs": lr_schedule(cfg),
        "seed": seed,
        "threads": 2,
        "batch_size": cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt,
        "max_new_tokens": cfg.rollout.rollout_max_response_len,
        "temperature": cfg.rollout.rollout_temperature,
        "top_p": cfg.rollout.rollout_top_p,
        "adam_beta1": cfg.train.adam_beta1,
        "adam_beta2": cfg.train.adam_beta2,
        "adam_epsilon": 1e-8,  # opd_core.megatron.optim's AdamW
        "weight_decay": cfg.train.weight_decay,
        "clip_grad": cfg.train.clip_grad,
        "out_dir": str(out),
    }
    done = out / "script_seconds.json"  # written once the TRL script finished
    if not done.is_file() or read_json(out / "job.json") != job:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        write_json(out / "job.json", job)
        started = time.perf_counter()
        _run_logged([args.trl_python, str(TRL_SCRIPT), str(out / "job.json")], out / "trl.log")
        write_json(done, {"seconds": time.perf_counter() - started})
    else:
        print(f"[peer] trl seed {seed}: training finished before, evaluating it")
    script_seconds = read_json(done)["seconds"]
    trl = read_json(out / "result.json")

    # Our evaluation of both ends, on the download's eval split (samples + summary under
    # out/<stage>/).
    evals = {}
    for stage, model_dir in (("baseline_eval", data.student_hf), ("final_eval", out / "model")):
        tick = time.perf_counter()
        summary = ModelEval(cfg, data, stage, model_dir, out / stage).build()
        evals[stage] = (summary["pass_at_1"], time.perf_counter() - tick)
        print(f"[peer] trl seed {seed}: {stage} pass@1 {summary['pass_at_1']:.3f}", flush=True)
    eval_seconds = sum(seconds for _, seconds in evals.values())
    return {
        "train_seconds": trl["train_seconds"],
        "whole_seconds": script_seconds + eval_seconds,
        "script_seconds": script_seconds,
        "eval_seconds": eval_seconds,
        "pass_at_1_baseline": evals["baseline_eval"][0],
        "pass_at_1_final": evals["final_eval"][0],
        "steps": trl["global_step"],
    }


class ModelEval(BaselineEval):
    """The eval stage's work on any model dir, written to `out_dir` (not a pipeline stage)."""

    def __init__(
        self, cfg: OPDRunConfig, run_dir: RunDir, name: str, model_dir: Path, out_dir: Path
    ):
        super().__init__(cfg, run_dir)
        self.name, self._model_dir, self._out_dir = name, Path(model_dir), Path(out_dir)

    @property
    def model_dir(self) -> Path:
        return self._model_dir

    @property
    def out_dir(self) -> Path:
        return self._out_dir


def step_prompts(cfg: OPDRunConfig, prompts: pa.Table) -> list[list[list[dict]]]:
    """Every round's prompt messages, in the order our rollout sends them (`round_draw`)."""
    messages = prompts.column("prompt").to_pylist()
    return [
        [messages[row] for row in round_draw(cfg, round_index, len(messages))[0]]
        for round_index in range(cfg.rollout.num_rollout)
    ]


def lr_schedule(cfg: OPDRunConfig) -> list[float]:
    """The lr of each optimizer step, as our actors' scheduler sets it (`cfg.lr_schedule`)."""
    optimizer = build_optimizer(torch.nn.Linear(1, 1), cfg.train, cfg.lr_schedule)
    lrs = []
    for _ in range(cfg.rollout.num_rollout):  # one optimizer step per round
        lrs.append(optimizer.lr)
        optimizer.scheduler.step(1)
    return lrs


# ---------------------------------------------------------------------------------- ours


def opd_run_command(
    seed: int, rounds: int, run_id: str, artifacts_dir: Path, overrides: list[str]
) -> list[str]:
    """`opd run` of the toy demo config (this venv's `opd`) with a seed, a round count, a run
    directory and more overrides."""
    return [
        str(Path(sys.executable).with_name("opd")),
        "run",
        "--config",
        str(CONFIG),
        f"seed={seed}",
        f"rollout.num_rollout={rounds}",
        f"run.run_id={run_id}",
        f"run.artifacts_dir={artifacts_dir}",
        *overrides,
    ]


def run_ours(cfg: OPDRunConfig, out: Path, args, variant: str = "ours") -> dict:
    run_id = f"{variant}-s{cfg.seed}"
    command = opd_run_command(cfg.seed, cfg.rollout.num_rollout, run_id, out, OURS[variant])
    done = out / "run_seconds.json"  # written once `opd run` finished
    if not done.is_file() or read_json(done)["command"] != command:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        started = time.perf_counter()
        _run_logged(command, out / "opd.log")
        write_json(done, {"seconds": time.perf_counter() - started, "command": command})
    else:
        print(f"[peer] ours seed {cfg.seed}: the run finished before, reading it")
    whole_seconds = read_json(done)["seconds"]
    run_dir = RunDir.open(out / run_id)
    rounds = read_arrow(run_dir.stage("train") / "metrics.arrow")
    # The cached stages' markers hold their wall time (the teacher stage is a server: none).
    stage_seconds = {
        stage: read_json(marker).get("seconds")
        for stage in ("download", "convert", "baseline_eval", "train", "final_eval")
        if (marker := run_dir.stage(stage) / "_stage.json").is_file()
    }
    return {
        "train_seconds": float(np.sum(rounds.column("seconds").to_numpy())),
        "train_stage_seconds": stage_seconds.get("train"),
        "stage_seconds": stage_seconds,
        "phase_seconds": {
            name: float(np.sum(rounds.column(name).to_numpy()))
            for name in ("time_generate", "time_score", "time_train", "time_sync")
            if name in rounds.column_names
        },
        "whole_seconds": whole_seconds,
        "pass_at_1_baseline": read_json(run_dir.stage("baseline_eval") / "summary.json")[
            "pass_at_1"
        ],
        "pass_at_1_final": read_json(run_dir.stage("final_eval") / "summary.json")["pass_at_1"],
        "steps": rounds.num_rows,
    }


# ------------------------------------------------------------------------------- helpers


def _run_logged(command: list[str], log: Path) -> None:
    """Run `command`, its output to `log` and every line with a step or round to the console."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with (
        log.open("w") as sink,
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as process,
    ):
        for line in process.stdout:
            sink.write(line)
            sink.flush()  # the log can be followed while the run goes
            if PROGRESS.search(line):
                print(f"    {line.rstrip()[:160]}", flush=True)
    if process.returncode:
        raise RuntimeError(f"{command[0]} ... failed ({process.returncode}); see {log}")


def summarize(rows: list[dict]) -> dict:
    """Per system: total gain over total train seconds (seeds pooled), mean whole-run seconds;
    and each of ours / TRL for both."""
    systems = {}
    for system in ("trl", *OURS):
        mine = [row for row in rows if row["system"] == system]
        if mine:
            systems[system] = {
                "gain_per_100s": 100
                * sum(r["gain"] for r in mine)
                / sum(r["train_seconds"] for r in mine),
                "mean_train_seconds": float(np.mean([r["train_seconds"] for r in mine])),
                "mean_whole_seconds": float(np.mean([r["whole_seconds"] for r in mine])),
                "mean_pass_at_1_final": float(np.mean([r["pass_at_1_final"] for r in mine])),
                "seeds": [r["seed"] for r in mine],
            }
    out: dict = {"systems": systems, "ratios": {}}
    for variant in OURS:
        if variant in systems and "trl" in systems:
            ours, trl = systems[variant], systems["trl"]
            out["ratios"][variant] = {
                "gain_per_train_second": ours["gain_per_100s"] / trl["gain_per_100s"],
                "whole_run": ours["mean_whole_seconds"] / trl["mean_whole_seconds"],
                "train_seconds": ours["mean_train_seconds"] / trl["mean_train_seconds"],
            }
    return out


def print_table(rows: list[dict], summary: dict) -> None:
    print(
        f"\n{'system':<11}{'seed':>5}{'train s':>9}{'whole s':>9}{'pass@1':>17}"
        f"{'gain/100 s':>12}   load average start -> end"
    )
    for r in rows:
        print(
            f"{r['system']:<11}{r['seed']:>5}{r['train_seconds']:>9.1f}{r['whole_seconds']:>9.1f}"
            f"{r['pass_at_1_baseline']:>9.3f} -> {r['pass_at_1_final']:.3f}"
            f"{r['gain_per_100s']:>+12.3f}   {_load(r['load_average_start'])} -> "
            f"{_load(r['load_average_end'])}"
        )
    for variant, ratio in summary["ratios"].items():
        print(
            f"{variant} / TRL: gain per training second {ratio['gain_per_train_second']:.2f}x, "
            f"train seconds {ratio['train_seconds']:.2f}x, whole run {ratio['whole_run']:.2f}x"
        )


def _load(load) -> str:
    return "/".join(f"{value:.2f}" for value in load)


if __name__ == "__main__":
    main()
