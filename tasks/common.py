"""What every stage task shares: the cache-or-run step and what it shows in the Prefect UI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from opd_core.rundir import RunDir, run_cached, stage_key


def cached_stage(
    name: str,
    run_dir: RunDir,
    config_hash: str,
    inputs: list[Path],
    build: Callable[[], dict],
    key: str | None = None,
) -> dict:
    """Run `build` unless the stage's inputs (by content) and config are unchanged.

    `key`: the stage key if the caller already computed it (saves hashing the inputs twice).
    """
    logger = get_run_logger()
    key = key or stage_key(config_hash, inputs)
    result, cached = run_cached(run_dir.stage(name), key, build)
    logger.info(
        "%s: %s (%s)", name, "cache hit, nothing to do" if cached else "done", run_dir.stage(name)
    )
    create_markdown_artifact(
        f"**{name}** {'(cache hit)' if cached else 'finished'}\n\nOutputs: `{run_dir.stage(name)}`\n\nCache key: `{key}`",
        key=_artifact_key(f"{name}-stage"),
        description=f"{name} outputs",
    )
    return {**result, "cached": cached}


class StageProgress:
    """A Prefect progress artifact for a long stage (0-100 %, updated as work finishes)."""

    def __init__(self, name: str, total: int):
        self.total = max(total, 1)
        self.artifact_id = create_progress_artifact(
            0.0, key=_artifact_key(f"{name}-progress"), description=f"{name} progress"
        )

    def update(self, done: int, description: str | None = None) -> None:
        update_progress_artifact(
            self.artifact_id, 100.0 * done / self.total, description=description
        )


def _artifact_key(text: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower())
