"""The run directory: where each stage reads and writes, and when a stage is a cache hit.

    artifacts/<run_id>/
      config.yaml                      the validated config of the last run on this dir
      download/  models/{student,teacher}/  data/{train,eval}.arrow  manifest.json
      convert/   student_torch_dist/  [teacher_torch_dist/]  parity.json
      teacher/   endpoint.json  server.log
      baseline_eval/  samples.arrow  summary.json
      train/     round_NNNN/{rollouts,teacher_logprobs}.arrow, round_NNNN/metrics.json,
                 metrics.arrow, checkpoints/{torch_dist,hf}/..., state/ (resume)
      final_eval/  samples.arrow  summary.json  report.md  curves.png
    artifacts/latest -> <run_id>

A stage is done when `<stage>/_stage.json` exists with the stage's cache key (sha256 of its
input files' hashes, its config sections and the code version) and its outputs are as it
recorded them. The marker stores the stage's result and the size and sha256 of every file
it wrote (`outputs`, keyed by path relative to the run directory), so a damaged, truncated
or missing output is not a cache hit, and a later stage can check the files it reads
against the record of the stage that wrote them (`verify_inputs`). Every path stored in a
marker is relative to the run directory: a copied or moved run directory uses its own files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from opd_core.hash_memo import file_sha256
from opd_core.io import ArtifactError, read_json, sha256_tree, tree_files, write_json

STAGES = ("download", "convert", "teacher", "baseline_eval", "train", "final_eval")
STAGE_MARKER = "_stage.json"

logger = logging.getLogger("opd.rundir")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def create(cls, artifacts_dir: str | Path, run_id: str) -> RunDir:
        root = Path(artifacts_dir) / run_id
        root.mkdir(parents=True, exist_ok=True)
        latest = Path(artifacts_dir) / "latest"
        tmp = latest.with_name(f".latest.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_id)
        os.replace(tmp, latest)
        return cls(root.resolve())

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"run directory not found: {root}")
        return cls(root.resolve())

    def relative(self, path: str | Path) -> str:
        """`path` as stored in the run directory's records: relative to the root when inside
        it (so a copied or moved run directory points at its own files), else absolute."""
        path = Path(path)
        if not path.is_absolute():
            return path.as_posix()
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def resolve(self, stored: str | Path) -> Path:
        """A stored path (`relative`'s form) as a path on this machine."""
        return self.root / stored  # an absolute `stored` stays itself

    def stage(self, name: str) -> Path:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
        return self.root / name

    @property
    def config_file(self) -> Path:
        """The validated config of the last run on this directory."""
        return self.root / "config.yaml"

    # download
    @property
    def student_hf(self) -> Path:
        return self.stage("download") / "models" / "student"

    @property
    def teacher_hf(self) -> Path:
        return self.stage("download") / "models" / "teacher"

    @property
    def train_data(self) -> Path:
        return self.stage("download") / "data" / "train.arrow"

    @property
    def eval_data(self) -> Path:
        return self.stage("download") / "data" / "eval.arrow"

    @property
    def manifest(self) -> Path:
        return self.stage("download") / "manifest.json"

    # convert
    @property
    def student_torch_dist(self) -> Path:
        return self.stage("convert") / "student_torch_dist"

    @property
    def teacher_torch_dist(self) -> Path:
        return self.stage("convert") / "teacher_torch_dist"

    @property
    def parity(self) -> Path:
        return self.stage("convert") / "parity.json"

    # teacher
    @property
    def endpoint(self) -> Path:
        return self.stage("teacher") / "endpoint.json"

    @property
    def teacher_log(self) -> Path:
        return self.stage("teacher") / "server.log"

    # train
    def round_dir(self, round_index: int) -> Path:
        return self.stage("train") / f"round_{round_index:04d}"

    @property
    def train_metrics(self) -> Path:
        """One row per round (opd_core.algorithm.metrics.MetricsLog)."""
        return self.stage("train") / "metrics.arrow"

    @property
    def rollout_log(self) -> Path:
        return self.stage("train") / "rollout_server.log"

    @property
    def train_placement(self) -> Path:
        """Which training actor, rollout engine and teacher replica got which node and GPUs."""
        return self.stage("train") / "placement.json"

    @property
    def torch_dist_checkpoints(self) -> Path:
        """Megatron-LM layout root: iter_XXXXXXX/ per checkpointed round."""
        return self.stage("train") / "checkpoints" / "torch_dist"

    def hf_export(self, round_index: int) -> Path:
        """The student's HF weights after a round (what the rollout engines load)."""
        return self.stage("train") / "checkpoints" / "hf" / f"round_{round_index:04d}"

    @property
    def final_student_hf(self) -> Path:
        return self.stage("train") / "checkpoints" / "hf" / "final"

    # evals
    def eval_summary(self, stage: str) -> Path:
        return self.stage(stage) / "summary.json"

    @property
    def report(self) -> Path:
        return self.stage("final_eval") / "report.md"


# ------------------------------------------------------------------------------- caching


@cache
def code_version() -> str:
    """Hash of the opd_core sources: a code change invalidates every cached stage."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def input_digest(path: Path) -> str:
    """Content hash of one input: a file's sha256, or a hash of every file's in a directory."""
    path = Path(path)
    if path.is_dir():
        return hashlib.sha256(
            json.dumps(sha256_tree(path, file_sha256), sort_keys=True).encode()
        ).hexdigest()
    if path.is_file():
        return file_sha256(path)
    raise FileNotFoundError(f"stage input missing: {path}")


def hash_inputs(paths: list[Path]) -> dict[str, str]:
    """Content hash of each input (a file, or every file of a directory).

    Keyed by position and file name, not by absolute path: a run directory that was moved or
    copied (e.g. from a cluster to a laptop) keeps its cache hits. Unchanged files are not
    reread (`hash_memo`): checkpoints of tens of GB are hashed once, not on every run.
    """
    return {
        f"{position}:{Path(path).name}": input_digest(path) for position, path in enumerate(paths)
    }


def stage_key(config_hash: str, inputs: list[Path], extra: Any = None) -> str:
    payload = {
        "config": config_hash,
        "inputs": hash_inputs(inputs),
        "code": code_version(),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :24
    ]


def file_record(path: Path) -> dict[str, Any]:
    """What is recorded of an output file: its size and sha256 (remembered: `hash_memo`)."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def record_files(root: Path, targets: list[Path]) -> dict[str, dict[str, Any]]:
    """Records of every file of `targets` (files or directories), keyed by path relative to
    the run directory `root`. Hidden files (temporaries), `*.log` and `wandb/` (diagnostics
    that a rerun appends to, or wandb's process keeps writing after the stage, not outputs)
    are left out."""
    files = []
    for target in targets:
        target = Path(target)
        files += tree_files(target) if target.is_dir() else [target] if target.is_file() else []
    relative = {p: p.relative_to(root) for p in files}
    return {
        rel.as_posix(): file_record(p)
        for p, rel in relative.items()
        if p.name != STAGE_MARKER and p.suffix != ".log" and "wandb" not in rel.parts
    }


def check_files(root: Path, records: dict[str, dict[str, Any]]) -> list[str]:
    """What differs from `records` (empty = every file is as recorded): one line per file,
    naming it and what was expected. The size is compared first, the sha256 only when it
    matches (from the memo unless the file changed)."""
    problems = []
    for rel, expected in sorted(records.items()):
        path = root / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel} missing")
            continue
        if size != expected["size"]:
            problems.append(
                f"{rel}: {size} bytes, expected {expected['size']} "
                f"(sha256 {expected['sha256'][:12]})"
            )
        elif (digest := file_sha256(path)) != expected["sha256"]:
            problems.append(
                f"{rel}: sha256 {digest[:12]}, expected {expected['sha256'][:12]} (same size)"
            )
    return problems


def relative_paths(obj: Any, root: Path) -> Any:
    """`obj` (a JSON-able result) with every absolute path inside `root` made relative to it."""
    if isinstance(obj, dict):
        return {k: relative_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [relative_paths(v, root) for v in obj]
    if isinstance(obj, str) and (obj == str(root) or obj.startswith(str(root) + os.sep)):
        return Path(obj).relative_to(root).as_posix() or "."
    return obj


def read_marker(stage_dir: Path) -> dict | None:
    """The stage's marker, or None when it has none (or an unreadable one)."""
    try:
        marker = read_json(Path(stage_dir) / STAGE_MARKER)
    except ArtifactError:
        return None
    return marker if isinstance(marker, dict) else None


def damaged_outputs(stage_dir: Path, root: Path) -> list[str]:
    """The stage's outputs that differ from its marker's records (see `check_files`)."""
    marker = read_marker(stage_dir) or {}
    return check_files(root, marker.get("outputs") or {})


def is_done(stage_dir: Path, key: str, root: Path | None = None) -> bool:
    """The marker holds `key` (and, given the run directory `root`, the outputs are intact)."""
    marker = read_marker(stage_dir)
    if marker is None or marker.get("key") != key:
        return False
    return root is None or not damaged_outputs(stage_dir, root)


def mark_done(stage_dir: Path, key: str, **info: Any) -> None:
    write_json(Path(stage_dir) / STAGE_MARKER, {"key": key, "finished_at": time.time(), **info})


def clear_done(stage_dir: Path) -> None:
    (Path(stage_dir) / STAGE_MARKER).unlink(missing_ok=True)


def run_cached(
    stage_dir: Path,
    key: str,
    build: Callable[[], dict],
    force: bool = False,
    root: Path | None = None,
) -> tuple[dict, bool]:
    """Run `build` unless the stage already finished with this key; returns (result, cached).

    The result dict is stored in the stage marker, so a cache hit returns what the original
    run returned (paths, metrics) without recomputing it. Given the run directory `root`,
    the result's paths are stored relative to it, the marker records every output file, and
    a stage whose outputs were damaged since is not a cache hit (the log says which file).
    """
    stage_dir = Path(stage_dir)
    marker = read_marker(stage_dir)
    if not force and marker is not None and marker.get("key") == key:
        damaged = damaged_outputs(stage_dir, root) if root is not None else []
        if not damaged:
            return marker.get("result", {}), True
        logger.warning(
            "%s: not a cache hit, its outputs changed since it ran (%s); running it again",
            stage_dir.name,
            "; ".join(damaged[:5]) + (f"; {len(damaged) - 5} more" if len(damaged) > 5 else ""),
        )
    clear_done(stage_dir)
    started = time.time()
    result = build()
    info: dict[str, Any] = {"seconds": round(time.time() - started, 3)}
    if root is not None:
        result = relative_paths(result, root)
        info["outputs"] = record_files(root, [stage_dir])
    mark_done(stage_dir, key, result=result, **info)
    return result, False


def verify_inputs(root: Path, inputs: list[Path], reader: str) -> None:
    """Check every file of `inputs` that a stage of this run directory wrote against that
    stage's record; an `ArtifactError` names each damaged file and what was expected.
    Inputs outside the run directory, or written by a stage with no record, are not checked."""
    problems = []
    for path in inputs:
        rel = RunDir(root).relative(path)
        producer = rel.split("/", 1)[0]
        if Path(rel).is_absolute() or producer not in STAGES:
            continue
        records = (read_marker(root / producer) or {}).get("outputs") or {}
        mine = {k: v for k, v in records.items() if k == rel or k.startswith(rel + "/")}
        problems += [f"{line} (recorded by {producer})" for line in check_files(root, mine)]
    if problems:
        raise ArtifactError(
            f"{reader}: input file(s) of {root} damaged since they were written:\n  "
            + "\n  ".join(problems)
            + "\nRun the stage(s) that wrote them again (e.g. `opd run` with the same run.run_id "
            "reruns them, as they are then no cache hit)."
        )
