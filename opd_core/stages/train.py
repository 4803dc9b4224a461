"""Stage `train`: the OPD rounds (rollout -> teacher scoring -> Megatron update in Ray actors).

Cached on the converted student, the train split, the teacher (its HF dir, or its torch_dist
in megatron mode) and the training config sections. Its resume rule: `train/` belongs to the
training run whose cache key is in `train/run_key.json`; the same key again (a killed run,
rerun unchanged) resumes from `train/state.json`, another key starts over.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from opd_core.io import read_json, write_json
from opd_core.stages.base import CachedStage
from opd_core.trainer.loop import RoundCallback, TeacherServers, run_rounds

OWNER_FILE = "run_key.json"  # the cache key of the training run that owns train/


class Train(CachedStage):
    name = "train"
    sections = ("seed", "rollout", "reward", "algorithm", "train")

    def inputs(self) -> list[Path]:
        teacher = self.teacher_checkpoint or self.run_dir.teacher_hf
        return [self.run_dir.student_torch_dist, self.run_dir.train_data, teacher]

    def resumes(self) -> bool:
        """True when `train/` holds rounds of this same training run (they are kept)."""
        try:
            return read_json(self.out_dir / OWNER_FILE).get("key") == self.key
        except (OSError, ValueError):
            return False

    def claim(self) -> bool:
        """Make `train/` belong to this run; True if it resumes. Another run's rounds and
        checkpoints are cleared, so training never "resumes" checkpoints of a different run."""
        if self.resumes():
            return True
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        write_json(self.out_dir / OWNER_FILE, {"key": self.key})
        return False

    def build(
        self, teacher: TeacherServers = None, on_round: RoundCallback | None = None
    ) -> dict[str, Any]:
        """`teacher`: the teacher stage's fleet, or the URLs of teacher servers run elsewhere."""
        if self.cfg.algorithm.teacher_source == "server" and not teacher:
            raise ValueError(
                "algorithm.opd_type=sglang needs a teacher server: run the teacher stage first"
            )
        self.claim()
        return run_rounds(
            self.cfg, self.run_dir, teacher, self.teacher_checkpoint, on_round=on_round
        )
