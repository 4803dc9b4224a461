"""Where a training run stands, in `train/state.json`, so a killed run resumes exactly.

A round counts as resumable once its torch_dist checkpoint (model, optimizer, RNG) is on
disk: a restart continues with the round after the newest checkpoint, from that checkpoint
and its HF export. Rounds finished after it (if `train.save_interval` > 1) are redone, with
the same seeds, so the result is the same as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from opd_core.io import read_json, write_json

STATE_FILE = "state.json"


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
