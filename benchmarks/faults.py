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
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from tiny_runs import SMALL_BATCHES, TINY_TOY  # noqa: E402 - the tests' plumbing-size runs

ROWS_PER_ROUND = 4 * 2  # SMALL_BATCHES: prompts x samples


@dataclass
class Ran:
    """One command's exit code, output and wall-clock seconds."""

    rc: int
    log: str
    seconds: float


class Bench:
    def __init__(self, root: Path, rounds: int):
        self.root, self.rounds = root, rounds
        self.runs = root / "runs"
        self.home = root / "prefect-home"
        self.started = time.time()

    def overrides(self, run_id: str, artifacts: Path | None = None, rounds: int | None = None):
        return [
            f"rollout.num_rollout={rounds or self.rounds}",
            "train.save_interval=2",
            "eval.num_prompts=4",
            "eval.n_samples=1",
            *SMALL_BATCHES,
            *TINY_TOY,
            f"run.artifacts_dir={artifacts or self.runs}",
            f"run.run_id={run_id}",
        ]

    def env(self) -> dict:
        env = {**os.environ, "PREFECT_HOME": str(self.home), "PYTHONPATH": str(REPO)}
        env.pop("PREFECT_API_URL", None)  # as a user runs it: with a temporary Prefect server
        env.setdefault("OPD_HASH_MEMO", str(self.root / "file_hashes.sqlite"))
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "flows.cli", *args]

    def opd(self, *args: str, prefix: tuple[str, ...] = ()) -> Ran:
        tick = time.perf_counter()
        done = subprocess.run(
            [*prefix, *self.command(*args)],
            cwd=REPO,
            env=self.env(),
            capture_output=True,
            text=True,
        )
        return Ran(done.returncode, done.stdout + done.stderr, time.perf_counter() - tick)

    def run(
        self,
        run_id: str,
        *extra: str,
        artifacts: Path | None = None,
        rounds: int | None = None,
        prefix: tuple[str, ...] = (),
    ) -> Ran:
        """`opd run` on the toy config at this benchmark's size."""
        overrides = self.overrides(run_id, artifacts, rounds)
        return self.opd("run", "--config", "configs/toy.yaml", *overrides, *extra, prefix=prefix)

    def copy(self, run_id: str) -> tuple[Path, dict[int, int]]:
        """A copy of the base run, and its rounds' metrics.json mtimes (to tell what reran)."""
        target = self.runs / run_id
        shutil.copytree(self.runs / "base", target, symlinks=True)
        return target, mtimes(target)

    def orphan_prefect_servers(self) -> list[int]:
        """Temporary Prefect servers of this benchmark's runs still running."""
        found = []
        for process in psutil.process_iter(["cmdline", "create_time"]):
            with contextlib.suppress(psutil.Error):
                cmdline = " ".join(process.info["cmdline"] or [])
                if process.info["create_time"] < self.started or "create_app" not in cmdline:
                    continue
                if process.environ().get("PREFECT_HOME") == str(self.home):
                    found.append(process.pid)
        return found

    def outcome(
        self,
        name: str,
        run_dir: Path,
        ran: Ran,
        before: dict[int, int],
        patterns: list[str],
        rounds: int | None = None,
    ) -> dict:
        after = mtimes(run_dir)
        exports = run_dir / "train" / "checkpoints" / "hf"
        return {
            "scenario": name,
            "user_sees": first_line(ran.log, patterns),
            "exit_code": ran.rc,
            "healed": ran.rc == 0 and (run_dir / "final_eval" / "summary.json").is_file(),
            "rounds_redone": sorted(r for r in before if after.get(r) != before[r]),
            "rounds_new": sorted(r for r in after if r not in before),
            **rows(run_dir, rounds or self.rounds),
            "servers_left": len(servers_of(run_dir)),
            "prefect_servers_left": len(self.orphan_prefect_servers()),
            "hf_exports": sorted(p.name for p in exports.glob("*")),
            "seconds": round(ran.seconds, 1),
        }

    def same_metrics(self, run_dir: Path) -> bool:
        return round_metrics(run_dir) == round_metrics(self.runs / "base")


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
    """Rows lost and duplicated over the rounds that should exist (none if nothing trained)."""
    from opd_core.io import ArtifactError, read_arrow

    if not (run_dir / "train").is_dir():
        return {"rows_lost": None, "rows_duplicated": None}

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
    """The first log line matching the first pattern that matches, without Prefect's prefix."""
    for pattern in patterns:
        for line in log.splitlines():
            if re.search(pattern, line):
                return re.sub(r"^.*?\| (WARNING|ERROR|INFO) +\| ", "", line).strip()[:400]
    return ""


# ------------------------------------------------------------------------ scenarios


def base(bench: Bench) -> dict:
    ran = bench.run("base")
    if ran.rc:
        raise SystemExit(f"the base run failed:\n{ran.log[-4000:]}")
    return bench.outcome("base: a finished run", bench.runs / "base", ran, {}, [r"Student before"])


def changed_lr(bench: Bench) -> list[dict]:
    run_dir, before = bench.copy("lr")
    refused = bench.run("lr", "train.lr=2e-3")
    refused_outcome = bench.outcome(
        "train.lr changed", run_dir, refused, before, [r"TrainingChanged: "]
    )
    restarted = bench.run("lr", "train.lr=2e-3", "--restart-train")
    return [
        refused_outcome,
        bench.outcome(
            "train.lr changed, --restart-train",
            run_dir,
            restarted,
            before,
            [r"train: starting over"],
        ),
    ]


def more_rounds(bench: Bench) -> dict:
    run_dir, before = bench.copy("longer")
    rounds = bench.rounds + 2
    ran = bench.run("longer", rounds=rounds)
    return bench.outcome(
        f"rollout.num_rollout {bench.rounds} -> {rounds}",
        run_dir,
        ran,
        before,
        [r"train: resuming at"],
        rounds=rounds,
    )


def garbage_rollouts(bench: Bench) -> dict:
    run_dir, before = bench.copy("garbage")
    (run_dir / "train" / "round_0003" / "rollouts.arrow").write_bytes(b"not arrow at all")
    ran = bench.run("garbage")
    result = bench.outcome(
        "garbage train/round_0003/rollouts.arrow", run_dir, ran, before, [r"not a cache hit"]
    )
    return result | {
        "then": first_line(ran.log, [r"resuming from round"]),
        "same_metrics": bench.same_metrics(run_dir),
    }


def missing_shard(bench: Bench) -> dict:
    run_dir, before = bench.copy("shard")
    iteration = run_dir / "train" / "checkpoints" / "torch_dist" / f"iter_{bench.rounds:07d}"
    next(iteration.glob("*.distcp")).unlink()
    ran = bench.run("shard")
    result = bench.outcome(
        f"deleted shard of the newest checkpoint ({iteration.name})",
        run_dir,
        ran,
        before,
        [r"checkpoint of round \d+ is damaged"],
    )
    return result | {
        "then": first_line(ran.log, [r"resuming from round"]),
        "same_metrics": bench.same_metrics(run_dir),
    }


def damaged_download(bench: Bench) -> list[dict]:
    run_dir, before = bench.copy("download")
    weights = run_dir / "download" / "models" / "student" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    (run_dir / "download" / "data" / "train.arrow").write_bytes(b"garbage")
    alone = bench.opd("stage", "train", "--run-dir", str(run_dir))
    healed = bench.run("download")
    what = "truncated student model.safetensors + garbage train.arrow"
    return [
        bench.outcome(f"{what}: opd stage train", run_dir, alone, before, [r"input file\(s\) of"]),
        bench.outcome(f"{what}: opd run", run_dir, healed, before, [r"download: not a cache hit"]),
    ]


def killed_driver(bench: Bench) -> list[dict]:
    """SIGKILL `opd run` once round 1 is checkpointed; rerun it; resume a copy elsewhere."""
    run_dir = bench.runs / "killed"
    log_path = bench.root / "killed.log"
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(
            bench.command("run", "--config", "configs/toy.yaml", *bench.overrides("killed")),
            cwd=REPO,
            env=bench.env(),
            stdout=log,
            stderr=log,
        )
    deadline = time.monotonic() + 900
    while _checkpoint_round(run_dir) is None:
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
    described = {}
    for process in children:
        with contextlib.suppress(psutil.Error):
            described[process.pid] = " ".join(process.cmdline()[:4])[:100]
    _, still = psutil.wait_procs(children, timeout=30)  # everything the driver started
    all_gone_s = time.perf_counter() - killed
    left_after_kill = [described.get(p.pid, str(p.pid)) for p in still]
    copies = bench.root / "copies"
    shutil.copytree(run_dir, copies / "moved", symlinks=True)
    before = mtimes(run_dir)
    ran = bench.run("killed")
    rerun = bench.outcome(
        "driver SIGKILLed after round 1's checkpoint; rerun, same run id",
        run_dir,
        ran,
        before,
        [r"stopped \d+ server\(s\) left running", r"train: resuming at"],
    )
    rerun |= {
        "then": first_line(ran.log, [r"train: resuming at"]),
        "prefect_server_alive_after_kill": bool(alive),
        "prefect_server_gone_after_s": round(prefect_gone_s, 1),
        "processes_started_by_the_driver": len(children),
        "all_gone_after_s": round(all_gone_s, 1),
        "processes_left_30s_after_kill": left_after_kill,
        "same_metrics": bench.same_metrics(run_dir),
    }
    shutil.rmtree(run_dir)
    moved_dir = copies / "moved"
    before = mtimes(moved_dir)
    moved = bench.outcome(
        "copy of the killed run dir, original deleted: opd run on the copy",
        moved_dir,
        bench.run("moved", artifacts=copies),
        before,
        [r"train: resuming at"],
    )
    return [rerun, moved | {"same_metrics": bench.same_metrics(moved_dir)}]


def _checkpoint_round(run_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / "train" / "state.json").read_text()).get("checkpoint_round")
    return None


def bad_layout(bench: Bench) -> dict:
    ran = bench.run("tp3", "train.parallel.tensor_model_parallel_size=3")
    return bench.outcome(
        "train.parallel.tensor_model_parallel_size=3 (4 heads)",
        bench.runs / "tp3",
        ran,
        {},
        [r"train.parallel does not fit"],
    )


def disk_full(bench: Bench) -> dict:
    """The whole `opd run` with its run directory on a tmpfs that fills during training."""

    def kib(path: Path) -> int:
        return int(
            subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()[
                0
            ]
        )

    disk = bench.root / "disk"
    disk.mkdir()
    # Everything before train fits, half of what train writes does not.
    quota = f"{kib(bench.runs / 'base') - kib(bench.runs / 'base' / 'train') // 2}k"
    mount = f'mount -t tmpfs -o size={quota} tmpfs {disk} && exec "$@"'
    ran = bench.run("full", artifacts=disk, prefix=("unshare", "--mount", "sh", "-c", mount, "sh"))
    result = bench.outcome(
        f"disk full during training ({quota} tmpfs)",
        disk / "full",
        ran,
        {},
        [r"DiskFullError: ", r"No space left"],
    )
    # The tmpfs, and the run directory on it, vanish with the namespace: rows cannot be counted
    # here (tests/test_errors.py checks what a full disk keeps).
    for key in ("rows_lost", "rows_duplicated"):
        result.pop(key)
    return result | {"log_tail": ran.log.strip().splitlines()[-1][:300]}


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


def merge(previous: list[dict], new: list[dict]) -> list[dict]:
    """`previous` with each scenario `new` has replaced in place; new scenarios appended."""
    by_name = {r["scenario"]: r for r in new}
    out = [by_name.pop(r["scenario"], r) for r in previous]
    return out + [r for r in new if r["scenario"] in by_name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "faults.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="opd-faults-"))
    bench = Bench(root, args.rounds)
    results = [base(bench)]
    # --only: the other scenarios' results of an earlier run stay in the file.
    previous = (
        json.loads(args.out.read_text())["results"] if args.only and args.out.is_file() else []
    )
    for name in args.only or SCENARIOS:
        found = SCENARIOS[name](bench)
        results += found if isinstance(found, list) else [found]
        print(json.dumps(found, indent=1), flush=True)
        merged = merge(previous, results)
        args.out.write_text(json.dumps({"rounds": args.rounds, "results": merged}, indent=2) + "\n")
    print("\n| scenario | user sees | healed | redone | rows lost/dup | left | s |")
    print("|---|---|---|---|---|---|---|")
    for r in json.loads(args.out.read_text())["results"]:
        print(
            f"| {r['scenario']} | {r['user_sees'][:160]} | {r['healed']} | {r['rounds_redone']} | "
            f"{r.get('rows_lost')}/{r.get('rows_duplicated')} | "
            f"{r['servers_left']}+{r['prefect_servers_left']} | {r['seconds']} |"
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
