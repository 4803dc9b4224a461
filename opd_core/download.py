"""The download stage's logic: model dirs and prompt splits into the run directory.

    summary = run_download(cfg, run_dir)
    # download/models/{student,teacher}/   HF dirs (config.json, *.safetensors, tokenizer)
    # download/data/train.arrow            PROMPTS (the train set, after the pre-flight check)
    # download/data/eval.arrow             EVAL_PROMPTS (every eval benchmark, in config order)
    # download/manifest.json               sha256 of every file above, where each came from,
    #                                      the resolved data fields and the pre-flight report

A model source is `toy` (the built-in toy models, built or taken from their cache),
`hf:<repo id>` (huggingface_hub.snapshot_download of config, weights and tokenizer only, at
`models.revision`), or a local HF directory (validated, then copied). Data sources are
whatever `opd_core.data.load_prompts` accepts: `data.train` and each of `eval.benchmarks`.
Then the pre-flight check (opd_core/preflight.py) compares student and teacher and fits the
prompts to the context, before any later stage spends GPU time. Every write is atomic, so a
failed download leaves the previous complete files (or none), never a half-copied model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from opd_core.config import DATASET_FIELDS, DatasetSpec, OPDRunConfig
from opd_core.data import describe_source, load_prompts
from opd_core.datasets import template_text
from opd_core.errors import NotRetryable
from opd_core.io import atomic_path, copy_tree, sha256_tree, write_arrow, write_json
from opd_core.preflight import run_preflight
from opd_core.rundir import STAGE_MARKER, RunDir
from opd_core.schemas import EVAL_PROMPTS, PROMPTS

__all__ = [
    "ModelSourceError",
    "download_config_hash",
    "fetch_model",
    "run_download",
    "validate_model_dir",
]

MANIFEST = "manifest.json"
# What a model dir needs for every stage: the config, weights and a tokenizer (no optimizer
# states, no original/ consolidated checkpoints, no other framework's weights).
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "merges.txt",
    "vocab.*",
    "*.model",
    "*.tiktoken",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ModelSourceError(NotRetryable, ValueError):
    """A model source is unusable; the message names the source and the missing file."""


def validate_model_dir(path: str | Path, what: str = "model") -> Path:
    """Check an HF model dir has config.json, its weights and a tokenizer; return it."""
    path = Path(path)
    if not path.is_dir():
        raise ModelSourceError(
            f"{what}: {path} is not a directory (expected toy, hf:<repo id>, or a local HF "
            "model dir)"
        )
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{what}: {path / 'config.json'} is missing")
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ModelSourceError(f"{what}: {path / 'config.json'} is not valid JSON ({err})") from err
    index = path / "model.safetensors.index.json"
    if index.is_file():
        # A sharded checkpoint: every shard the index names must be there.
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing or not shards:
            raise ModelSourceError(
                f"{what}: {path} is missing weight shard(s) "
                f"{missing or ['(index names none)']} listed in {index.name}"
            )
    elif not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ModelSourceError(
            f"{what}: {path / 'model.safetensors'} is missing (no *.safetensors weights in {path})"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelSourceError(
            f"{what}: {path / 'tokenizer.json'} is missing (no tokenizer files in {path})"
        )
    return path


def fetch_model(source: str, dest: Path, cfg: OPDRunConfig, role: str) -> dict[str, Any]:
    """Put the model named by `source` at `dest` (atomically); return what was done."""
    what = f"models.{role}"
    if source == "toy":
        from opd_core.toy.models import build_toy_models

        toy = build_toy_models(cfg.toy)
        built = toy.teacher_dir if role == "teacher" else toy.student_dir
        copy_tree(validate_model_dir(built, what), dest)
        pass_at_1 = toy.teacher_pass_at_1 if role == "teacher" else toy.student_pass_at_1
        return {"source": "toy", "built_from": str(built), "toy_pass_at_1": pass_at_1}
    if source.startswith("hf:"):
        repo_id = source[3:].strip()
        if not repo_id:
            raise ModelSourceError(f"{what}: {source!r} is not of the form hf:<repo id>")
        from huggingface_hub import snapshot_download

        with atomic_path(dest) as tmp:
            try:
                snapshot_download(
                    repo_id,
                    revision=cfg.models.revision,
                    allow_patterns=HUB_PATTERNS,
                    local_dir=tmp,
                )
            except Exception as err:  # offline, unknown repo, gated: one clear error
                raise ModelSourceError(
                    f"{what}: could not download {repo_id} (revision {cfg.models.revision}): {err}"
                ) from err
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping
            validate_model_dir(tmp, f"{what} ({source})")
        return {"source": source, "revision": cfg.models.revision}
    copy_tree(validate_model_dir(source, what), dest)
    return {"source": str(Path(source).resolve())}


def download_config_hash(cfg: OPDRunConfig) -> str:
    """The config part of the download stage's cache key: what it fetches and checks.

    The models, the train data, which rows each eval benchmark has (not how it is sampled:
    changing eval.n_samples reruns the evals, not a 64 GB download), the toy task, the
    pre-flight options and the rollout lengths the pre-flight check fits prompts to.
    """
    payload = {
        "sections": cfg.section_hash("models", "data", "toy", "preflight"),
        "eval_data": [
            b.model_dump(mode="json", include=set(DATASET_FIELDS)) for b in cfg.eval.benchmarks
        ],
        "rollout": [cfg.rollout.rollout_max_response_len, cfg.rollout.rollout_max_prompt_len],
        "eval_max_new_tokens": [
            cfg.eval.settings_for(b).max_new_tokens for b in cfg.eval.benchmarks
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _dataset_record(spec: DatasetSpec, table: pa.Table, kept: int) -> dict[str, Any]:
    return {
        **spec.model_dump(mode="json"),
        "template_text": template_text(spec.template),
        "rows": table.num_rows,
        "kept": kept,
    }


def run_download(cfg: OPDRunConfig, run_dir: RunDir) -> dict[str, Any]:
    """Models and prompts into `download/`, checked by the pre-flight check (preflight.py)."""
    started = time.perf_counter()
    stage_dir = run_dir.stage("download")
    models = {
        "student": fetch_model(cfg.models.student, run_dir.student_hf, cfg, "student"),
        "teacher": fetch_model(cfg.models.teacher, run_dir.teacher_hf, cfg, "teacher"),
    }
    train_spec = cfg.data.train
    train = load_prompts(train_spec, cfg.toy)
    evals = {b.name: load_prompts(b, cfg.toy) for b in cfg.eval.benchmarks}
    sources = {"train": describe_source(train_spec)}
    sources.update({b.name: describe_source(b) for b in cfg.eval.benchmarks})
    kept_train, kept_evals, preflight = run_preflight(
        cfg, run_dir.student_hf, run_dir.teacher_hf, train, evals, sources
    )
    # How the prompts are to be rendered travels with them: a changed chat_template_kwargs
    # changes these files' hashes, so every stage that renders them reruns.
    metadata = {"chat_template_kwargs": json.dumps(cfg.data.chat_template_kwargs, sort_keys=True)}
    write_arrow(run_dir.train_data, kept_train, PROMPTS.with_metadata(metadata))
    eval_table = pa.concat_tables(
        table.drop_columns(["location"]).append_column(
            "benchmark", pa.array([name] * table.num_rows, pa.string())
        )
        for name, table in kept_evals.items()
    )
    write_arrow(run_dir.eval_data, eval_table, EVAL_PROMPTS.with_metadata(metadata))
    data = {
        "train": _dataset_record(train_spec, train, kept_train.num_rows),
        "eval": {
            b.name: _dataset_record(b, evals[b.name], kept_evals[b.name].num_rows)
            for b in cfg.eval.benchmarks
        },
        "chat_template_kwargs": cfg.data.chat_template_kwargs,
    }
    files = {
        rel: digest
        for rel, digest in sha256_tree(stage_dir).items()
        if rel not in (MANIFEST, STAGE_MARKER)
    }
    manifest = {"models": models, "data": data, "preflight": preflight, "files": files}
    write_json(stage_dir / MANIFEST, manifest)
    return {
        "student": str(run_dir.student_hf),
        "teacher": str(run_dir.teacher_hf),
        "num_train": kept_train.num_rows,
        "num_eval": eval_table.num_rows,
        "eval_benchmarks": {name: table.num_rows for name, table in kept_evals.items()},
        "dropped": {
            "train": train.num_rows - kept_train.num_rows,
            "eval": {name: evals[name].num_rows - t.num_rows for name, t in kept_evals.items()},
        },
        "manifest": str(stage_dir / MANIFEST),
        "models": models,
        "seconds": round(time.perf_counter() - started, 3),
    }
