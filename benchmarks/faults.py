"""Faults and bad input on a run directory, as a user meets them: `opd run` / `opd stage` in a
subprocess (with its own temporary Prefect server and local Ray cluster), one scenario each.

    python -m benchmarks.faults [--rounds 6] [--only kill disk_full ...]

Every scenario starts from a copy of one finished run (tiny toy models, 4 prompts x 2
samples, `train.save_interval=2`), breaks one thing, runs the command and records: what the
user sees first (the error's first line, or the log line that says what was done), whether
the run ended well by itself (exit 0 and a final summary), which rounds were redone, rows
lost or duplicated (rollout + teacher rows vs 8 per round, keyed by prompt and sample), the
processes left behind (model servers naming the run directory, temporary Prefect servers of
this benchmark), HF exports on disk, and the wall-clock seconds. Prints a table and writes
benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from tiny_runs import SMALL_BATCHES, TINY_TOY  # noqa: E402 - the tests' plumbing-size runs

ROWS_PER_ROUND = 4 * 2  # SMALL_BATCHES: prompts x samples


class Bench:
    def __init__(self, root: Path, rounds: int):
        self.root, self.rounds = root, rounds
        self.home = root / "prefect-home"
        self.started = time.time()

    def overrides(self, run_id: str, artifacts: Path | None = None, rounds: int | None = None):
        return [
            f"rollout.num_rollout={rounds or self.rounds}",
            "train.save_interval=2",
            "eval.num_prompts=4",
            "eval.k=1",
            *SMALL_BATCHES,
            *TINY_TOY,
            f"run.artifacts_dir={artifacts or self.root / 'runs'}",
            f"run.run_id={run_id}",
        ]

    def env(self) -> dict:
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PYTHONPATH": str(REPO)}
        env.pop("PREFECT_API_URL", None)
        env.setdefault("OPD_HASH_MEMO", str(self.root / "file_hashes.sqlite"))
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "flows.cli", *args]

    def opd(self, args: list[str], prefix: list[str] | None = None) -> tuple[int, str, float]:
        tick = time.perf_counter()
        done = subprocess.run(
            [*(prefix or []), *self.command(*args)],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
        )
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - tick

    def copy(self, run_id: str) -> Path:
        target = self.root / "runs" / run_id
        shutil.copytree(self.root / "runs" / "base", target, symlinks=True)
        return target

    def orphan_prefect_servers(self) -> list[int]:
        found = []
        for process in psutil.process_iter(["cmdline", "create_time"]):
            with contextlib.suppress(psutil.Error):
                if process.info["create_time"] < self.started:
                    continue
                if "prefect.server.api.server:create_app" not in " ".join(
                    process.info["cmdline"] or []
                ):
                    continue
                if process.environ().get("PREFECT_HOME") == str(self.home):
                    found.append(process.pid)
        return found


def servers_of(run_dir: Path) -> list[int]:
    out = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(run_dir) in cmdline and "--model-path" in cmdline:
            out.append(process.pid)
    return out


def mtimes(run_dir: Path) -> dict[int, int]:
    return {
        int(p.parent.name[6:]): p.stat().st_mtime_ns
        for p in (run_dir / "train").glob("round_*/metrics.json")
    }


def rows(run_dir: Path, rounds: int) -> dict:
    """Rows lost and duplicated over the rounds that should exist."""
    from opd_core.io import ArtifactError, read_arrow

    lost = duplicated = 0
    for index in range(rounds):
        round_dir = run_dir / "train" / f"round_{index:04d}"
        for name in ("rollouts.arrow", "teacher_logprobs.arrow"):
            try:
                table = read_arrow(round_dir / name)
                keys = list(
                    zip(table["prompt_index"].to_pylist(), table["sample_index"].to_pylist())
                )
            except (ArtifactError, KeyError):
                keys = []
            lost += max(0, ROWS_PER_ROUND - len(set(keys)))
            duplicated += len(keys) - len(set(keys))
    return {"rows_lost": lost, "rows_duplicated": duplicated}


def round_metrics(run_dir: Path) -> dict[int, dict]:
    out = {}
    for path in sorted((run_dir / "train").glob("round_*/metrics.json")):
        metrics = json.loads(path.read_text())
        out[metrics["round"]] = {
            k: v for k, v in metrics.items() if k != "seconds" and not k.startswith("time_")
        }
    return out


def first_line(log: str, patterns: list[str]) -> str:
    for pattern in patterns:
        for line in log.splitlines():
            if re.search(pattern, line):
                return re.sub(r"^.*?\| (WARNING|ERROR|INFO) +\| ", "", line).strip()[:400]
    return ""


def outcome(
    bench: Bench,
    name: str,
    run_dir: Path,
    rc: int,
    log: str,
    seconds: float,
    before: dict[int, int],
    patterns: list[str],
    rounds: int | None = None,
) -> dict:
    rounds = rounds or bench.rounds
    after = mtimes(run_dir) if run_dir.exists() else {}
    exports = (
        sorted(p.name for p in (run_dir / "train" / "checkpoints" / "hf").glob("*"))
        if run_dir.exists()
        else []
    )
    return {
        "scenario": name,
        "user_sees": first_line(log, patterns),
        "exit_code": rc,
        "healed": rc == 0 and (run_dir / "final_eval" / "summary.json").is_file(),
        "rounds_redone": sorted(r for r in before if after.get(r) != before[r]),
        "rounds_new": sorted(r for r in after if r not in before),
        **(rows(run_dir, rounds) if run_dir.exists() else {}),
        "servers_left": len(servers_of(run_dir)),
        "prefect_servers_left": len(bench.orphan_prefect_servers()),
        "hf_exports": exports,
        "seconds": round(seconds, 1),
    }


# ------------------------------------------------------------------------ scenarios


def base(bench: Bench) -> dict:
    rc, log, seconds = bench.opd(["run", "--config", "configs/toy.yaml", *bench.overrides("base")])
    if rc:
        raise SystemExit(f"the base run failed:\n{log[-4000:]}")
    run_dir = bench.root / "runs" / "base"
    return outcome(
        bench, "base: a finished run", run_dir, rc, log, seconds, {}, [r"Student before"]
    )


def changed_lr(bench: Bench) -> list[dict]:
    run_dir = bench.copy("lr")
    before = mtimes(run_dir)
    args = ["run", "--config", "configs/toy.yaml", *bench.overrides("lr"), "train.lr=2e-3"]
    rc, log, seconds = bench.opd(args)
    refused = outcome(
        bench, "train.lr changed", run_dir, rc, log, seconds, before, [r"TrainingChanged: "]
    )
    rc, log, seconds = bench.opd([*args, "--restart-train"])
    restarted = outcome(
        bench,
        "train.lr changed, --restart-train",
        run_dir,
        rc,
        log,
        seconds,
        before,
        [r"train: starting over"],
    )
    return [refused, restarted]


def more_rounds(bench: Bench) -> dict:
    run_dir = bench.copy("longer")
    before = mtimes(run_dir)
    rounds = bench.rounds + 2
    rc, log, seconds = bench.opd(
        ["run", "--config", "configs/toy.yaml", *bench.overrides("longer", rounds=rounds)]
    )
    return outcome(
        bench,
        f"rollout.num_rollout {bench.rounds} -> {rounds}",
        run_dir,
        rc,
        log,
        seconds,
        before,
        [r"train: resuming at"],
        rounds=rounds,
    )


def garbage_rollouts(bench: Bench) -> dict:
    run_dir = bench.copy("garbage")
    before = mtimes(run_dir)
    (run_dir / "train" / "round_0003" / "rollouts.arrow").write_bytes(b"not arrow at all")
    rc, log, seconds = bench.opd(
        ["run", "--config", "configs/toy.yaml", *bench.overrides("garbage")]
    )
    result = outcome(
        bench,
        "garbage train/round_0003/rollouts.arrow",
        run_dir,
        rc,
        log,
        seconds,
        before,
        [r"not a cache hit", r"resuming from"],
    )
    result["same_metrics"] = round_metrics(run_dir) == round_metrics(bench.root / "runs" / "base")
    return result


def missing_shard(bench: Bench) -> dict:
    run_dir = bench.copy("shard")
    before = mtimes(run_dir)
    iteration = run_dir / "train" / "checkpoints" / "torch_dist" / f"iter_{bench.rounds:07d}"
    next(iteration.glob("*.distcp")).unlink()
    rc, log, seconds = bench.opd(["run", "--config", "configs/toy.yaml", *bench.overrides("shard")])
    result = outcome(
        bench,
        f"deleted shard of the newest checkpoint ({iteration.name})",
        run_dir,
        rc,
        log,
        seconds,
        before,
        [r"checkpoint of round \d+ is damaged"],
    )
    result["then"] = first_line(log, [r"resuming from round"])
    result["same_metrics"] = round_metrics(run_dir) == round_metrics(bench.root / "runs" / "base")
    return result


def damaged_download(bench: Bench) -> list[dict]:
    run_dir = bench.copy("download")
    before = mtimes(run_dir)
    weights = run_dir / "download" / "models" / "student" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    (run_dir / "download" / "data" / "train.arrow").write_bytes(b"garbage")
    config = bench.overrides("download")[:-2]  # the stored config.yaml has the run's settings
    rc, log, seconds = bench.opd(["stage", "train", "--run-dir", str(run_dir)])
    alone = outcome(
        bench,
        "truncated student model.safetensors + garbage train.arrow: opd stage train",
        run_dir,
        rc,
        log,
        seconds,
        before,
        [r"input file\(s\) of", r"Error"],
    )
    alone["detail"] = first_line(log, [r"model.safetensors: \d+ bytes"])
    rc, log, seconds = bench.opd(
        [
            "run",
            "--config",
            "configs/toy.yaml",
            *config,
            f"run.artifacts_dir={bench.root / 'runs'}",
            "run.run_id=download",
        ]
    )
    healed = outcome(
        bench,
        "the same, opd run",
        run_dir,
        rc,
        log,
        seconds,
        before,
        [r"download: not a cache hit"],
    )
    return [alone, healed]


def killed_driver(bench: Bench) -> list[dict]:
    artifacts = bench.root / "runs"
    run_dir = artifacts / "killed"
    args = bench.command("run", "--config", "configs/toy.yaml", *bench.overrides("killed"))
    log_path = bench.root / "killed.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(args, cwd=REPO, env=bench.env(), stdout=log, stderr=log)
    deadline = time.monotonic() + 900
    state = run_dir / "train" / "state.json"
    while True:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state.read_text()).get("checkpoint_round") is not None:
                break
        if driver.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the run to kill ended early:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    children = psutil.Process(driver.pid).children(recursive=True)
    prefect = [p for p in children if "create_app" in " ".join(p.cmdline())]
    os.kill(driver.pid, signal.SIGKILL)
    killed = time.perf_counter()
    driver.wait()
    _, alive = psutil.wait_procs(prefect, timeout=30)
    prefect_gone_s = time.perf_counter() - killed
    time.sleep(2)
    left_after_kill = []
    for process in children:
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE:
                left_after_kill.append(" ".join(process.cmdline()[:4])[:100])
    copy = bench.root / "copies"
    shutil.copytree(run_dir, copy / "moved", symlinks=True)
    before = mtimes(run_dir)
    rc, log, seconds = bench.opd(
        ["run", "--config", "configs/toy.yaml", *bench.overrides("killed")]
    )
    rerun = outcome(
        bench,
        "driver SIGKILLed after round 0's checkpoint; rerun, same run id",
        run_dir,
        rc,
        log,
        seconds,
        before,
        [r"stopped \d+ server\(s\) left running", r"train: resuming"],
    )
    rerun.update(
        prefect_server_alive_after_kill=bool(alive),
        prefect_server_gone_after_s=round(prefect_gone_s, 1),
        processes_left_after_kill=left_after_kill,
        same_metrics=round_metrics(run_dir) == round_metrics(bench.root / "runs" / "base"),
    )
    shutil.rmtree(run_dir)
    before = mtimes(copy / "moved")
    rc, log, seconds = bench.opd(
        ["run", "--config", "configs/toy.yaml", *bench.overrides("moved", artifacts=copy)]
    )
    moved = outcome(
        bench,
        "copy of the killed run dir, original deleted: opd run on the copy",
        copy / "moved",
        rc,
        log,
        seconds,
        before,
        [r"train: resuming at"],
    )
    moved["same_metrics"] = round_metrics(copy / "moved") == round_metrics(
        bench.root / "runs" / "base"
    )
    return [rerun, moved]


def bad_layout(bench: Bench) -> dict:
    rc, log, seconds = bench.opd(
        [
            "run",
            "--config",
            "configs/toy.yaml",
            *bench.overrides("tp3"),
            "train.parallel.tensor_model_parallel_size=3",
        ]
    )
    return outcome(
        bench,
        "train.parallel.tensor_model_parallel_size=3 (4 heads)",
        bench.root / "runs" / "tp3",
        rc,
        log,
        seconds,
        {},
        [r"train.parallel does not fit"],
    )


def disk_full(bench: Bench) -> dict:
    """The whole `opd run` with its run directory on a tmpfs that fills during training."""
    size_kb = int(
        subprocess.run(
            ["du", "-sk", str(bench.root / "runs" / "base")], capture_output=True, text=True
        ).stdout.split()[0]
    )
    train_kb = int(
        subprocess.run(
            ["du", "-sk", str(bench.root / "runs" / "base" / "train")],
            capture_output=True,
            text=True,
        ).stdout.split()[0]
    )
    disk = bench.root / "disk"
    disk.mkdir()
    quota = f"{size_kb - train_kb // 2}k"  # everything before train fits, half of train does not
    shell = f'mount -t tmpfs -o size={quota} tmpfs {disk} && exec "$@"'
    args = ["run", "--config", "configs/toy.yaml", *bench.overrides("full", artifacts=disk)]
    rc, log, seconds = bench.opd(args, prefix=["unshare", "--mount", "sh", "-c", shell, "sh"])
    result = outcome(
        bench,
        f"disk full during training ({quota} tmpfs)",
        disk / "full",
        rc,
        log,
        seconds,
        {},
        [r"DiskFullError: ", r"No space left", r"Error"],
    )
    result["log_tail"] = log.strip().splitlines()[-1][:300]
    return result


SCENARIOS = {
    "lr": changed_lr,
    "more_rounds": more_rounds,
    "garbage_rollouts": garbage_rollouts,
    "missing_shard": missing_shard,
    "damaged_download": damaged_download,
    "kill": killed_driver,
    "layout": bad_layout,
    "disk_full": disk_full,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "faults.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="opd-faults-"))
    bench = Bench(root, args.rounds)
    results = [base(bench)]
    for name in args.only or SCENARIOS:
        found = SCENARIOS[name](bench)
        results += found if isinstance(found, list) else [found]
        print(json.dumps(found, indent=1), flush=True)
        args.out.write_text(
            json.dumps({"rounds": args.rounds, "results": results}, indent=2) + "\n"
        )
    print("\n| scenario | user sees | healed | redone | rows lost/dup | left | s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scenario']} | {r['user_sees'][:160]} | {r['healed']} | {r['rounds_redone']} | "
            f"{r.get('rows_lost')}/{r.get('rows_duplicated')} | "
            f"{r['servers_left']}+{r['prefect_servers_left']} | {r['seconds']} |"
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
