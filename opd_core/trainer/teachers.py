"""The teacher as the round loop sees it: one `score(batch)`, over HTTP or inside the actors.

    teacher = open_teacher(cfg, teacher_servers, trainer, run_dir.teacher_hf)  # None: no OPD
    scores = teacher.score(batch, label="round 3 teacher")  # TeacherScores
    scores.attach(batch)                                     # top-k OPD: the ids the loss needs

- `ServerTeacher` (opd_type=sglang): SGLang-protocol servers (real SGLang or the built-in
  engine) score prompt + response with max_new_tokens 0, as slime does; see EngineClient.
- `MegatronTeacher` (opd_type=megatron): the frozen teacher each training actor holds.

With `opd_topk: k` both also return the teacher's k most likely tokens per position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from opd_core.algorithm.batch import TrainBatch
from opd_core.config import OPDRunConfig
from opd_core.engine.client import EngineClient, scores_to_table
from opd_core.engine.fleet import ServerFleet
from opd_core.engine.logprob_cache import model_namespace
from opd_core.trainer.group import TrainerGroup

__all__ = ["MegatronTeacher", "ServerTeacher", "Teacher", "TeacherScores", "open_teacher"]


@dataclass
class TeacherScores:
    """The teacher's log-probs of one round's responses, aligned with `response_ids`."""

    logprobs: list[np.ndarray]
    topk_ids: list[np.ndarray] | None = None  # top-k OPD: [len(response), k] int32
    topk_logprobs: list[np.ndarray] | None = None  # top-k OPD: [len(response), k] float32

    def attach(self, batch: TrainBatch) -> None:
        """Give the batch what the actor reads: the top-k loss's ids and log-probs (top-k OPD),
        and the sampled tokens' log-probs (its `opd_reverse_kl` metric)."""
        batch.teacher_topk_ids, batch.teacher_topk_logprobs = self.topk_ids, self.topk_logprobs
        batch.teacher_logprobs = self.logprobs

    @classmethod
    def concat(cls, parts: Sequence[TeacherScores]) -> TeacherScores:
        """The rows of `parts`, one after the other (top-k only if every part has it)."""
        logprobs = [row for part in parts for row in part.logprobs]
        if not parts or any(part.topk_ids is None for part in parts):
            return cls(logprobs)
        return cls(
            logprobs,
            [row for part in parts for row in part.topk_ids],
            [row for part in parts for row in part.topk_logprobs],
        )

    def table(self, prompt_index: Sequence[int], sample_index: Sequence[int]) -> pa.Table:
        """Rows of `teacher_logprobs.arrow`."""
        return scores_to_table(
            prompt_index, sample_index, self.logprobs, self.topk_ids, self.topk_logprobs
        )


class Teacher(Protocol):
    def score(self, batch: TrainBatch, label: str | None) -> TeacherScores: ...

    def close(self) -> None: ...


class ServerTeacher:
    """opd_type=sglang: the teacher servers at `client`'s URLs."""

    def __init__(self, client: EngineClient, topk: int = 0):
        self.client, self.topk = client, topk

    def score(self, batch: TrainBatch, label: str | None) -> TeacherScores:
        """`label` names the progress bar (None: no bar)."""
        prompts, responses = batch.prompt_ids, batch.response_ids
        if self.topk:
            label = label and f"{label} top-{self.topk}"
            return TeacherScores(*self.client.score_topk(prompts, responses, self.topk, label))
        return TeacherScores(self.client.score(prompts, responses, progress=label))

    def close(self) -> None:
        self.client.close()


class MegatronTeacher:
    """opd_type=megatron: the frozen teacher inside every training actor."""

    def __init__(self, trainer: TrainerGroup, topk: int = 0):
        self.trainer, self.topk = trainer, topk

    def score(self, batch: TrainBatch, label: str | None) -> TeacherScores:
        if self.topk:
            return TeacherScores(*self.trainer.teacher_topk(batch, self.topk))
        return TeacherScores(self.trainer.teacher_logprobs(batch))

    def close(self) -> None:
        pass  # the trainer group owns the actors


def open_teacher(
    cfg: OPDRunConfig,
    servers: ServerFleet | Sequence[str] | None,
    trainer: TrainerGroup,
    teacher_dir: Path,
) -> Teacher | None:
    """The teacher `cfg.algorithm.teacher_source` asks for (None = no OPD). `servers`: the
    teacher stage's fleet (its client waits out a replica's relaunch) or the URLs of servers
    run elsewhere. The train stage checks that a server teacher has them before anything
    starts. `teacher_dir` (the downloaded teacher) keys the teacher-logprob cache by the
    content of its weights: real SGLang reports neither a fingerprint nor a changed
    weight_version."""
    source, topk = cfg.algorithm.teacher_source, cfg.algorithm.opd_topk
    if source == "none":
        return None
    if source == "megatron":
        return MegatronTeacher(trainer, topk)
    namespace = model_namespace(teacher_dir)
    if isinstance(servers, ServerFleet):
        return ServerTeacher(servers.client(cfg.client, cache_namespace=namespace), topk)
    client = EngineClient.from_config(
        servers, cfg.client, api_key=cfg.teacher.api_key, cache_namespace=namespace
    )
    return ServerTeacher(client, topk)
