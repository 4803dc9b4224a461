"""The download stage's logic: model dirs and prompt splits into the run directory.

    summary = run_download(cfg, run_dir)
    # download/models/{student,teacher}/   HF dirs (config.json, *.safetensors, tokenizer)
    # download/data/{train,eval}.arrow      PROMPTS tables
    # download/manifest.json                sha256 of every file above, and where it came from

A model source is `toy` (the built-in toy models, built or taken from their cache),
`hf:<repo id>` (huggingface_hub.snapshot_download of config, weights and tokenizer only, at
`models.revision`), or a local HF directory (validated, then copied). Data sources are
whatever `opd_core.data.load_prompts` accepts. Every write is atomic, so a failed download
leaves the previous complete files (or none), never a half-copied model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from opd_core.config import OPDRunConfig
from opd_core.data import load_prompts
from opd_core.io import atomic_path, copy_tree, sha256_tree, write_arrow, write_json
from opd_core.rundir import STAGE_MARKER, RunDir
from opd_core.schemas import PROMPTS

__all__ = ["ModelSourceError", "fetch_model", "run_download", "validate_model_dir"]

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


class ModelSourceError(ValueError):
    """A model source is unusable; the message names the source and the missing file."""


def validate_model_dir(path: str | Path, what: str = "model") -> Path:
    """Check an HF model dir has config.json, its weights and a tokenizer; return it."""
    path = Path(path)
    if not path.is_dir():
        raise ModelSourceError(
            f"{what}: {path} is not a directory (expected toy, hf:<repo id>, or a local HF model dir)"
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
                f"{what}: {path} is missing weight shard(s) {missing or ['(index names none)']} listed in {index.name}"
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


def run_download(cfg: OPDRunConfig, run_dir: RunDir) -> dict[str, Any]:
    started = time.perf_counter()
    stage_dir = run_dir.stage("download")
    models = {
        "student": fetch_model(cfg.models.student, run_dir.student_hf, cfg, "student"),
        "teacher": fetch_model(cfg.models.teacher, run_dir.teacher_hf, cfg, "teacher"),
    }
    d = cfg.data
    splits = {
        "train": (d.train, d.train_split, d.max_train_prompts, run_dir.train_data),
        "eval": (d.eval, d.eval_split, d.max_eval_prompts, run_dir.eval_data),
    }
    data = {}
    for name, (source, split, limit, path) in splits.items():
        table = load_prompts(source, split, d.input_key, d.label_key, limit, cfg.toy)
        write_arrow(path, table, PROMPTS)
        data[name] = {"source": source, "split": split, "rows": table.num_rows}
    files = {
        rel: digest
        for rel, digest in sha256_tree(stage_dir).items()
        if rel not in (MANIFEST, STAGE_MARKER)
    }
    manifest = {"models": models, "data": data, "files": files}
    write_json(stage_dir / MANIFEST, manifest)
    return {
        "student": str(run_dir.student_hf),
        "teacher": str(run_dir.teacher_hf),
        "num_train": data["train"]["rows"],
        "num_eval": data["eval"]["rows"],
        "manifest": str(stage_dir / MANIFEST),
        "models": models,
        "seconds": round(time.perf_counter() - started, 3),
    }
