"""Stage `train`: the OPD rounds (rollout -> teacher scoring -> Megatron update in Ray actors).

    stage = Train(cfg, run_dir)
    stage.check_claim(restart=False)      # the flow, before it starts a teacher: refuse early
    stage.run(teacher=fleet_or_urls, restart_train=False)

Cached on the converted student, the train split, the teacher (its HF dir, or its torch_dist
in megatron mode) and the training config sections.

Its resume rule: `train/` belongs to one training setup, recorded in `train/run_key.json`:
the training config (as dotted fields, without `rollout.num_rollout`), the hashes of the
inputs, and their hash, the owner key (and, for the log, the code version). The same owner
again resumes from
`train/state.json` at its newest intact checkpoint: a killed run rerun unchanged, or the same
run made longer (`rollout.num_rollout` 30 -> 32 continues at round 30, the lr schedule
following the current config from the restored step), also after an opd upgrade (the code
version is logged, not part of the owner: a code change must not cost finished rounds, and
the stage's cache key, which does hold it, still makes the stage and final_eval run). Another
owner: if `train/` holds no
finished round, training starts over (logged, with what changed); if it does, the stage
refuses with what changed ("train.lr: 0.001 -> 0.0005; inputs: download/data/train.arrow
changed") and deletes nothing, unless it is asked to (`restart_train`: `opd run
--restart-train`, `opd stage train --restart-train`, the flow parameter `restart_train`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

from opd_core.io import ArtifactError, DiskFullError, read_json, write_json
from opd_core.megatron import checkpoint
from opd_core.megatron.convert import load_hf_config
from opd_core.megatron.model import check_parallel_layout
from opd_core.rundir import code_version, input_digest, verify_inputs
from opd_core.stages.base import CachedStage
from opd_core.trainer.loop import RoundCallback, TeacherServers, run_rounds
from opd_core.trainer.state import TrainState

OWNER_FILE = "run_key.json"  # the training setup that owns train/ (see the module docstring)
# Config fields a finished round does not depend on: changing them continues the same run.
OWNER_EXEMPT = frozenset({"rollout.num_rollout"})

logger = logging.getLogger("opd.stages.train")


class TrainingChanged(ValueError):
    """train/ holds finished rounds of another training setup; nothing was deleted."""


class Train(CachedStage):
    name = "train"
    sections = ("seed", "rollout", "reward", "algorithm", "train")

    def inputs(self) -> list[Path]:
        teacher = self.teacher_checkpoint or self.run_dir.teacher_hf
        return [self.run_dir.student_torch_dist, self.run_dir.train_data, teacher]

    # ---------------------------------------------------------------- who owns train/

    @cached_property
    def owner(self) -> dict[str, Any]:
        """This training setup: {"key", "config": {dotted field: value}, "inputs": {path:
        sha256}, "code"}; the key hashes config and inputs (see the module docstring)."""
        config = {
            name: value
            for name, value in _dotted(self.cfg.sections_dump(*self.sections)).items()
            if name not in OWNER_EXEMPT
        }
        inputs = {self.run_dir.relative(p): input_digest(p) for p in self.inputs()}
        record = {"config": config, "inputs": inputs}
        key = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode())
        return {"key": key.hexdigest()[:24], **record, "code": code_version()}

    def held_by(self) -> dict[str, Any] | None:
        """The owner record in train/ (None if there is none, or it is unreadable)."""
        try:
            held = read_json(self.out_dir / OWNER_FILE)
        except ArtifactError:
            return None
        return held if isinstance(held, dict) else None

    def resumes(self) -> bool:
        """True when `train/` holds rounds of this same training setup (they are kept)."""
        held = self.held_by()
        # An owner file written before owner records existed holds the stage's cache key.
        return held is not None and held.get("key") in (self.owner["key"], self.key)

    def finished_rounds(self) -> list[int]:
        """Rounds in train/ that ran to the end (their metrics.json is written last)."""
        return sorted(
            int(path.parent.name.removeprefix("round_"))
            for path in self.out_dir.glob("round_*/metrics.json")
            if path.parent.name.removeprefix("round_").isdigit()
        )

    def changes(self) -> list[str]:
        """What differs between the setup that owns train/ and this one, one line each."""
        held = self.held_by()
        if held is None:
            return [f"no {OWNER_FILE} says which training setup wrote train/"]
        if "config" not in held:
            return [f"train/ was written by an older opd ({OWNER_FILE} holds no config)"]
        mine = self.owner
        old_config, new_config = held["config"], mine["config"]
        out = [
            f"{name}: {_show(old_config, name)} -> {_show(new_config, name)}"
            for name in sorted(set(old_config) | set(new_config))
            if old_config.get(name, _ABSENT) != new_config.get(name, _ABSENT)
        ]
        for path in sorted(set(held["inputs"]) | set(mine["inputs"])):
            old, new = held["inputs"].get(path), mine["inputs"].get(path)
            if old != new:
                what = "added" if old is None else "removed" if new is None else "changed"
                out.append(f"inputs: {path} {what}")
        if held.get("code") != mine["code"]:
            out.append(f"code: opd_core changed (version {held.get('code')} -> {mine['code']})")
        return out or ["(nothing recorded differs)"]

    def check_inputs(self) -> None:
        """Every file training reads, against the records of the stages that wrote it (the
        rollout engines start from the student's HF weights: read, though not in the key)."""
        verify_inputs(self.run_dir.root, [*self.inputs(), self.run_dir.student_hf], self.name)

    def check_claim(self, restart: bool = False) -> None:
        """Raise `TrainingChanged` if this setup would have to delete finished rounds of
        another one and `restart` is not given. Deletes nothing. Damaged inputs are named
        first (`ArtifactError`): they would otherwise read as another setup's inputs."""
        self.check_inputs()
        self._refuse_unless(restart)

    def _refuse_unless(self, restart: bool) -> None:
        if restart or self.resumes():
            return
        finished = self.finished_rounds()
        if not finished:
            return
        raise TrainingChanged(
            f"{self.out_dir} holds {len(finished)} finished round(s) "
            f"({_ranges(finished)}) of another training setup; this config differs: "
            + "; ".join(self.changes())
            + ". Nothing was deleted. To delete them and train again from round 0: "
            "`opd run ... --restart-train`, `opd stage train --run-dir DIR --restart-train`, "
            "or the flow parameter restart_train=true. To keep them: another run.run_id."
        )

    def claim(self, restart: bool = False) -> bool:
        """Make `train/` belong to this setup; True if it resumes. Another setup's rounds and
        checkpoints are cleared only when there are no finished rounds, or `restart`; else
        `TrainingChanged` (so training never "resumes" checkpoints of a different run)."""
        self.check_inputs()
        if self.resumes():
            held_code = (self.held_by() or {}).get("code")
            if held_code not in (None, self.owner["code"]):
                logger.warning(
                    "train: opd_core changed since these rounds ran (version %s -> %s); "
                    "continuing them with the new code",
                    held_code,
                    self.owner["code"],
                )
            write_json(self.out_dir / OWNER_FILE, self.owner)  # an older record upgraded
            return True
        self._refuse_unless(restart)
        if self.out_dir.exists():
            finished = self.finished_rounds()
            logger.warning(
                "train: starting over, %s; %s",
                f"deleting {len(finished)} finished round(s) as asked (restart_train)"
                if finished
                else "train/ holds no finished round",
                "; ".join(self.changes()),
            )
            shutil.rmtree(self.out_dir)
        write_json(self.out_dir / OWNER_FILE, self.owner)
        return False

    # ------------------------------------------------------------------- the work

    def check_layout(self) -> None:
        """train.parallel against the models' config.json, as soon as they are downloaded
        (a hub model's shapes are known only then; toy and local ones at config validation)."""
        parallel = self.cfg.train.parallel
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        if tp == pp == 1:
            return
        models = {"the student": self.run_dir.student_hf}
        if self.teacher_checkpoint is not None:
            stored = self.teacher_checkpoint / checkpoint.HF_CONFIG_DIR
            models["the teacher"] = stored if stored.is_dir() else self.run_dir.teacher_hf
        for what, hf_dir in models.items():
            check_parallel_layout(load_hf_config(hf_dir), tp, pp, f"{what} ({hf_dir})")

    def build(
        self,
        teacher: TeacherServers = None,
        on_round: RoundCallback | None = None,
        restart_train: bool = False,
    ) -> dict[str, Any]:
        """`teacher`: the teacher stage's fleet, or the URLs of teacher servers run elsewhere."""
        if self.cfg.algorithm.teacher_source == "server" and not teacher:
            raise ValueError(
                "algorithm.opd_type=sglang needs a teacher server: run the teacher stage first"
            )
        if self.claim(restart_train):
            state = TrainState.load(self.out_dir)
            for note in state.rewind_to_intact(self.cfg.rollout.rounds):
                logger.warning("train: %s", note)
            if state.checkpoint_round is not None:
                logger.info(
                    "train: resuming at round %d of %d, from round %d's checkpoint",
                    state.next_round,
                    self.cfg.rollout.rounds,
                    state.checkpoint_round,
                )
        keep = self.cfg.train.keep_hf_exports

        def after_round(round_index: int, metrics: dict) -> None:
            # The round's export is loaded by the engines and its checkpoint (if any) recorded.
            TrainState.load(self.out_dir).prune_hf_exports(keep, round_index)
            if on_round:
                on_round(round_index, metrics)

        try:
            return run_rounds(
                self.cfg, self.run_dir, teacher, self.teacher_checkpoint, on_round=after_round
            )
        except Exception as err:
            # A full disk during a checkpoint is raised in a training actor; Ray wraps it in
            # its task error (`.cause`), whose first line is the actor's name. Say it plainly.
            if isinstance(getattr(err, "cause", None), DiskFullError):
                raise err.cause from err
            raise


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3} (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for name, value in tree.items():
        out.update(_dotted(value, f"{prefix}.{name}" if prefix else name))
    return out


_ABSENT = object()


def _show(config: dict[str, Any], name: str) -> str:
    return json.dumps(config[name]) if name in config else "(absent)"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "rounds 0-2, 5"."""
    spans: list[list[int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
    return f"round{'s' if len(indices) > 1 else ''} {text}"
