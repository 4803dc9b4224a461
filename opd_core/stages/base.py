"""What every pipeline stage is: an object that owns its inputs, config sections, cache key and run.

    stage = Train(cfg, run_dir)
    stage.is_cached()                             # the flow asks before starting a teacher
    outcome = stage.run(teacher=fleet)           # cache check, then the stage's own work
    outcome.result, outcome.cached, outcome.key

A stage's cache key is the content hash of its input files, the hash of its config sections
and the code version (`opd_core.rundir.stage_key`); a stage whose key is recorded in
`<stage>/_stage.json`, and whose outputs are still as that marker records them (size and
sha256 of every file), is a cache hit and returns the stored result. Before its own work a
stage checks its inputs against the records of the stages that wrote them, so a damaged
file is an error naming it, not a failure deep inside the work. Results are stored with
paths relative to the run directory. Prefect tasks in `tasks/` wrap `run` with retries and
UI artifacts; nothing here imports Prefect, so a notebook goes through the same key and
resume checks as the flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from opd_core.config import OPDRunConfig
from opd_core.rundir import RunDir, is_done, run_cached, stage_key, verify_inputs

__all__ = ["CachedStage", "Stage", "StageOutcome"]


@dataclass(frozen=True)
class StageOutcome:
    name: str
    # What the stage returned, paths relative to the run directory (stored in its marker, so a
    # hit returns it).
    result: dict[str, Any]
    cached: bool
    key: str
    out_dir: Path


class Stage:
    """A stage of one run: its name, the config and run directory it works on."""

    name: ClassVar[str]

    def __init__(self, cfg: OPDRunConfig, run_dir: RunDir):
        self.cfg, self.run_dir = cfg, run_dir

    @property
    def out_dir(self) -> Path:
        return self.run_dir.stage(self.name)

    @property
    def teacher_checkpoint(self) -> Path | None:
        """The Megatron teacher's torch_dist (opd_type=megatron), else None. A relative
        `opd_teacher_load` (e.g. `convert/teacher_torch_dist`) is resolved against the run
        directory, so it names the convert stage's own output. The one place it is resolved."""
        if self.cfg.algorithm.teacher_source != "megatron":
            return None
        path = Path(self.cfg.algorithm.opd_teacher_load)
        return path if path.is_absolute() else self.run_dir.root / path


class CachedStage(Stage):
    """A stage that is a function of files: skipped when its cache key is unchanged."""

    # The config sections a stage's results depend on (its fields in NOT_IN_CACHE_KEY aside).
    sections: ClassVar[tuple[str, ...]] = ()

    def inputs(self) -> list[Path]:
        """Files and directories whose content the stage's results depend on."""
        return []

    def config_hash(self) -> str:
        return self.cfg.section_hash(*self.sections)

    @cached_property
    def key(self) -> str:
        """The cache key, computed once per stage object (inputs are hashed once)."""
        return stage_key(self.config_hash(), self.inputs())

    def is_cached(self) -> bool:
        try:
            return is_done(self.out_dir, self.key, self.run_dir.root)
        except FileNotFoundError:  # an input is missing: not cached, and `run` will say which
            return False

    def run(self, **kwargs: Any) -> StageOutcome:
        """The stored result when the key is unchanged and the outputs are intact, else
        `build(**kwargs)`'s, once the inputs are checked against their writers' records."""

        def checked_build() -> dict[str, Any]:
            verify_inputs(self.run_dir.root, self.inputs(), self.name)
            return self.build(**kwargs)

        result, cached = run_cached(self.out_dir, self.key, checked_build, root=self.run_dir.root)
        return StageOutcome(self.name, result, cached, self.key, self.out_dir)

    def build(self, **kwargs: Any) -> dict[str, Any]:
        """The stage's work; returns a small JSON-able summary."""
        raise NotImplementedError
