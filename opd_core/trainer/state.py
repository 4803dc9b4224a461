"""Where a training run stands, in `train/state.json`, so a killed run resumes exactly.

A round counts as resumable once its torch_dist checkpoint (model, optimizer, RNG) is on
disk: a restart continues with the round after the newest checkpoint, from that checkpoint
and its HF export. Rounds finished after it (if `train.save_interval` > 1) are redone, with
the same seeds, so the result is the same as an uninterrupted run.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from opd_core.io import read_json, write_json

STATE_FILE = "state.json"
OWNER_FILE = "run_key.json"  # the cache key of the training run that owns train/


def claim_train_dir(train_dir: Path, key: str) -> bool:
    """Make `train_dir` belong to the training run with cache key `key`; True if it resumes.

    Same key as the run that wrote it (a killed run, rerun unchanged): everything is kept
    and training resumes from `state.json`. Another key (a config section, an input or the
    code changed): the old rounds and checkpoints are cleared, so training starts over
    instead of "resuming" checkpoints of a different run.
    """
    train_dir = Path(train_dir)
    owner = train_dir / OWNER_FILE
    try:
        if read_json(owner).get("key") == key:
            return True
    except (OSError, ValueError):
        pass
    if train_dir.exists():
        shutil.rmtree(train_dir)
    write_json(owner, {"key": key})
    return False


@dataclass
class TrainState:
    train_dir: Path
    checkpoint_round: int | None = None  # newest round with a checkpoint
    checkpoint_dir: str | None = (
        None  # Megatron-LM layout root; that round's step is checkpoint_round + 1
    )
    hf_export: str | None = None  # HF export of that round (what the rollout server loads)
    metrics: dict = field(default_factory=dict)  # that round's metrics

    @classmethod
    def load(cls, train_dir: Path) -> TrainState:
        path = Path(train_dir) / STATE_FILE
        if not path.is_file():
            return cls(Path(train_dir))
        saved = read_json(path)
        return cls(Path(train_dir), **saved)

    @property
    def next_round(self) -> int:
        return 0 if self.checkpoint_round is None else self.checkpoint_round + 1

    def record_checkpoint(
        self, round_index: int, checkpoint_dir: Path, hf_export: Path, metrics: dict
    ) -> None:
        self.checkpoint_round = round_index
        self.checkpoint_dir = str(checkpoint_dir)
        self.hf_export = str(hf_export)
        self.metrics = metrics
        saved = asdict(self)
        saved.pop("train_dir")
        write_json(self.train_dir / STATE_FILE, saved)
