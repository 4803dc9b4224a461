"""What every stage task shares: running a stage and showing it in the Prefect UI."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from opd_core.stages import CachedStage


def run_stage(stage: CachedStage, **kwargs: Any) -> dict:
    """`stage.run(**kwargs)`, logged and published as a markdown artifact; its result dict
    plus `cached`."""
    outcome = stage.run(**kwargs)
    state = "cache hit, nothing to do" if outcome.cached else "done"
    get_run_logger().info("%s: %s (%s)", outcome.name, state, outcome.out_dir)
    create_markdown_artifact(
        f"**{outcome.name}** {'(cache hit)' if outcome.cached else 'finished'}\n\n"
        f"Outputs: `{outcome.out_dir}`\n\nCache key: `{outcome.key}`",
        key=artifact_key(f"{outcome.name}-stage"),
        description=f"{outcome.name} outputs",
    )
    return {**outcome.result, "cached": outcome.cached}


class StageProgress:
    """A Prefect progress artifact for a long stage (0-100 %, updated as work finishes)."""

    def __init__(self, name: str, total: int):
        self.total = max(total, 1)
        self.artifact_id = create_progress_artifact(
            0.0, key=artifact_key(f"{name}-progress"), description=f"{name} progress"
        )

    def update(self, done: int, description: str | None = None) -> None:
        update_progress_artifact(
            self.artifact_id, 100.0 * done / self.total, description=description
        )


def artifact_key(text: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower())
