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

A stage is done when `<stage>/_stage.json` exists with the stage's cache key: sha256 of its
input files' hashes, its config sections and the code version. Same key = nothing to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from opd_core.hash_memo import file_sha256
from opd_core.io import read_json, sha256_tree, write_json

STAGES = ("download", "convert", "teacher", "baseline_eval", "train", "final_eval")
STAGE_MARKER = "_stage.json"


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


def hash_inputs(paths: list[Path]) -> dict[str, str]:
    """Content hash of each input (a file, or every file of a directory).

    Keyed by position and file name, not by absolute path: a run directory that was moved or
    copied (e.g. from a cluster to a laptop) keeps its cache hits. Unchanged files are not
    reread (`hash_memo`): checkpoints of tens of GB are hashed once, not on every run.
    """
    out = {}
    for position, path in enumerate(paths):
        path = Path(path)
        if path.is_dir():
            digest = hashlib.sha256(
                json.dumps(sha256_tree(path, file_sha256), sort_keys=True).encode()
            ).hexdigest()
        elif path.is_file():
            digest = file_sha256(path)
        else:
            raise FileNotFoundError(f"stage input missing: {path}")
        out[f"{position}:{path.name}"] = digest
    return out


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


def is_done(stage_dir: Path, key: str) -> bool:
    marker = Path(stage_dir) / STAGE_MARKER
    if not marker.is_file():
        return False
    try:
        return read_json(marker).get("key") == key
    except ValueError:
        return False


def mark_done(stage_dir: Path, key: str, **info: Any) -> None:
    write_json(Path(stage_dir) / STAGE_MARKER, {"key": key, "finished_at": time.time(), **info})


def clear_done(stage_dir: Path) -> None:
    (Path(stage_dir) / STAGE_MARKER).unlink(missing_ok=True)


def run_cached(
    stage_dir: Path, key: str, build: Callable[[], dict], force: bool = False
) -> tuple[dict, bool]:
    """Run `build` unless the stage already finished with this key; returns (result, cached).

    The result dict is stored in the stage marker, so a cache hit returns what the original
    run returned (paths, metrics) without recomputing it.
    """
    marker = Path(stage_dir) / STAGE_MARKER
    if not force and is_done(stage_dir, key):
        return read_json(marker).get("result", {}), True
    clear_done(stage_dir)
    started = time.time()
    result = build()
    mark_done(stage_dir, key, result=result, seconds=round(time.time() - started, 3))
    return result, False
