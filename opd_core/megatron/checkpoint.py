"""Megatron-LM checkpoint layout on disk, and loading/saving a GPTModel in it.

    <root>/latest_checkpointed_iteration.txt     "7" (or "release")
    <root>/iter_0000007/                         dist_checkpointing (torch_dist) files
    <root>/release/                              a converted model with no training step

    save_model(model, root, step)            # every rank calls it; written atomically
    load_model(model, root, step=None)       # any TP or PP size: dist_checkpointing reshards
    read_global_tensors(root, step=None)     # no process group, no model: plain tensors

`read_global_tensors` uses torch.distributed.checkpoint directly (metadata + a load into
empty tensors), so exporting to HF works on a machine without Megatron parallel state.

megatron-core is imported inside `save_model` / `load_model` only: the HF export
(`opd convert torch-dist-to-hf`) imports this module and runs without it (importing
megatron.core takes seconds and loads all of megatron.core.models;
tests/test_megatron_convert.py::test_cli_export_runs_without_process_group checks).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from opd_core.io import ArtifactError, disk_full_error, is_disk_full, write_text

TRACKER = "latest_checkpointed_iteration.txt"
# A copy of the HF config (and tokenizer) in every checkpoint root, so a torch_dist
# checkpoint says which architecture it holds (the megatron-mode teacher needs this).
HF_CONFIG_DIR = "hf_config"
# Tokenizer and generation files: copied into HF_CONFIG_DIR and next to exported weights.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
)


def iteration_dir_name(step: int | None) -> str:
    return "release" if step is None else f"iter_{step:07d}"


def resolve_iteration_dir(root: str | Path, step: int | None = None) -> Path:
    """The directory of `step`, or of the step named by the tracker file when step is None."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactError(f"checkpoint directory not found: {root}")
    if step is None:
        tracker = root / TRACKER
        if not tracker.is_file():
            # Megatron-LM also accepts a bare dist_checkpointing dir (metadata.json inside).
            if (root / "metadata.json").is_file():
                return root
            raise ArtifactError(f"{tracker} is missing: not a Megatron-LM checkpoint directory")
        text = tracker.read_text().strip()
        step = None if text == "release" else int(text)
    path = root / iteration_dir_name(step)
    if not (path / "metadata.json").is_file():
        available = sorted(
            p.name for p in root.iterdir() if p.name.startswith(("iter_", "release"))
        )
        raise ArtifactError(
            f"no torch_dist checkpoint at {path} (available: {available or 'none'})"
        )
    return path


def list_steps(root: str | Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in Path(root).glob("iter_*") if p.name[5:].isdigit())


def save_model(
    model,
    root: str | Path,
    step: int | None,
    extra: Callable[[Path], None] | None = None,
    sharded_extra: dict | None = None,
) -> Path:
    """Collective: every rank writes its shards. The iteration dir appears only when complete.

    `extra(tmp_dir)` runs on every rank before the rename (side files such as optimizer and RNG
    state); `sharded_extra` is merged into the sharded state dict (Megatron optimizer state).
    A full disk raises `DiskFullError` naming `root`, with the previous checkpoints and the
    tracker untouched and the partial temporary directory deleted.
    """
    from megatron.core import dist_checkpointing  # not at the top: see the module docstring

    root = Path(root)
    final = root / iteration_dir_name(step)
    # Same temp name on every rank (dist_checkpointing writes one shared directory).
    tmp = root / f".{final.name}.tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = model.sharded_state_dict()
    if sharded_extra:
        state.update(sharded_extra)
    try:
        dist_checkpointing.save(state, str(tmp))
        if extra is not None:
            extra(tmp)
    except BaseException as err:  # dist_checkpointing's CheckpointException is a BaseException
        full = is_disk_full(err, root)  # before the temporary files are deleted
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        kept = f"the previous checkpoints in {root} are kept" + (
            f" (newest: step {(root / TRACKER).read_text().strip()})"
            if (root / TRACKER).is_file()
            else ""
        )
        raise disk_full_error(root, f"checkpoint {final.name}", kept) from err
    _barrier()
    if rank0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_text(root / TRACKER, "release" if step is None else str(step))
    _barrier()
    return final


def load_model(model, root: str | Path, step: int | None = None) -> Path:
    """Load a torch_dist checkpoint into `model` (any TP/PP size: dist_checkpointing reshards)."""
    from megatron.core import dist_checkpointing  # not at the top: see the module docstring

    path = resolve_iteration_dir(root, step)
    sharded = model.sharded_state_dict()
    _check_same_tensors(sharded, path)
    try:
        state = dist_checkpointing.load(sharded, str(path))
    except Exception as err:
        raise ArtifactError(
            f"cannot load {path} into this model (different architecture or sizes?): "
            f"{type(err).__name__}: {err}"
        ) from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ArtifactError(
            f"{path}: missing parameters {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return path


def _check_same_tensors(sharded: dict, path: Path) -> None:
    """Refuse a checkpoint of another architecture before dist_checkpointing does something odd.
    Collective when distributed: the model's tensors are those of all its pipeline stages.

    dist_checkpointing silently ignores stored tensors the model does not ask for (an untied
    lm_head loaded into a tied model would vanish), so compare names and shapes first.
    """
    stored = {
        name: tuple(meta.size)
        for name, meta in dcp.FileSystemReader(str(path))
        .read_metadata()
        .state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata) and not name.startswith("optimizer")
    }
    wanted = {}
    for item in sharded.values():
        if type(item).__name__ == "ShardedTensor":
            wanted[item.key] = tuple(item.global_shape)
        elif type(item).__name__ == "ShardedTensorFactory":
            wanted.setdefault(item.key, None)
    whole_model = set(wanted)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Under PP a rank asks only for its stage's tensors.
        stages: list = [None] * dist.get_world_size()
        dist.all_gather_object(stages, sorted(wanted))
        whole_model = set().union(*stages)
    problems = [
        f"{name}: in the checkpoint, not in the model" for name in sorted(set(stored) - whole_model)
    ]
    problems += [
        f"{name}: in the model, not in the checkpoint" for name in sorted(set(wanted) - set(stored))
    ]
    problems += [
        f"{name}: checkpoint shape {stored[name]}, model shape {shape}"
        for name, shape in wanted.items()
        if shape is not None and name in stored and stored[name] != shape
    ]
    if problems:
        raise ArtifactError(
            f"{path} does not hold this model (wrong HF config?):\n  " + "\n  ".join(problems[:8])
        )


def read_global_tensors(root: str | Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a torch_dist checkpoint at their global shapes. No process group needed."""
    path = resolve_iteration_dir(root, step)
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    state = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def store_hf_config(root: str | Path, hf_dir: str | Path) -> None:
    """Copy config.json and tokenizer files of `hf_dir` to `<root>/hf_config/`."""
    target = Path(root) / HF_CONFIG_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in HF_SIDE_FILES:
        if (Path(hf_dir) / name).is_file():
            shutil.copy2(Path(hf_dir) / name, target / name)


def stored_hf_config_dir(root: str | Path) -> Path:
    path = Path(root) / HF_CONFIG_DIR
    if not (path / "config.json").is_file():
        raise ArtifactError(
            f"{path / 'config.json'} is missing: convert the checkpoint with hf_to_torch_dist "
            "(it stores the HF config next to the weights)"
        )
    return path
