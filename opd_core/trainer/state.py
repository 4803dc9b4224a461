"""Where a training run stands, in `train/state.json`, so a killed run resumes exactly.

    state = TrainState.load(run_dir.stage("train"))
    notes = state.rewind_to_intact(cfg.rollout.rounds)   # to the newest intact checkpoint
    state.next_round                                     # where the rounds continue

A round counts as resumable once its torch_dist checkpoint (model, optimizer, RNG) is on
disk: a restart continues with the round after the newest checkpoint, from that checkpoint
and its HF export. Rounds finished after it (if `train.save_interval` > 1) are redone, with
the same seeds, so the result is the same as an uninterrupted run.

The rollout engines of a resumed run start from `rollout_export`: that HF export, or with
`rollout.async_rounds` the one before it (round n's rollouts come from the policy after
n-1 steps there; see `rollout_weight_version`), which pruning then keeps.

Every checkpoint is recorded when it is written: the size and sha256 of each file of its
torch_dist iteration and of its HF export (and rollout export), and of each file of the
rounds it concludes (`round_NNNN/`). Resuming checks them, newest checkpoint first, and
falls back to the newest one that is intact with every round before it intact, saying which
("checkpoint of round 19 is damaged (...); resuming from round 9's"); the rounds after it
are redone. Paths are stored relative to the run directory, so a copied or moved run
directory resumes from its own files; a state.json of an older version (absolute paths)
still loads, its paths mapped onto this run directory.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_core.io import read_json, write_json
from opd_core.megatron.checkpoint import iteration_dir_name
from opd_core.rundir import RunDir, check_files, record_files

STATE_FILE = "state.json"


@dataclass
class TrainState:
    train_dir: Path
    checkpoint_round: int | None = None  # newest round with a checkpoint
    # Megatron-LM layout root (absolute here, relative to the run directory in state.json);
    # that round's step is checkpoint_round + 1.
    checkpoint_dir: str | None = None
    hf_export: str | None = None  # HF export of that round (the policy after its step)
    # What the rollout engines load to resume (None = the converted student): that same
    # export, or with rollout.async_rounds the one before it (see `rollout_weight_version`).
    rollout_export: str | None = None
    metrics: dict = field(default_factory=dict)  # that round's metrics
    # Every resume point, oldest first: {"round", "metrics", "checkpoint": {file: record},
    # "rounds": {file: record}} (the rounds since the previous checkpoint).
    checkpoints: list[dict] = field(default_factory=list)

    @property
    def run_dir(self) -> RunDir:
        return RunDir(Path(self.train_dir).parent)

    @classmethod
    def load(cls, train_dir: Path) -> TrainState:
        path = Path(train_dir) / STATE_FILE
        state = cls(Path(train_dir))
        if not path.is_file():
            return state
        saved = read_json(path)
        state.checkpoint_round = saved.get("checkpoint_round")
        state.metrics = saved.get("metrics") or {}
        state.checkpoint_dir = state._own_path(saved.get("checkpoint_dir"))
        state.hf_export = state._own_path(saved.get("hf_export"))
        # A state.json without it (serial rounds, an older version): the checkpoint's export.
        state.rollout_export = state._own_path(saved.get("rollout_export", saved.get("hf_export")))
        state.checkpoints = saved.get("checkpoints") or []
        if not state.checkpoints and state.checkpoint_round is not None:
            # An older state.json: one resume point, with no file records to check.
            entry = {"round": state.checkpoint_round, "metrics": state.metrics}
            state.checkpoints = [entry | {"checkpoint": {}, "rounds": {}}]
        return state

    def _own_path(self, stored: str | None) -> str | None:
        """A stored path on this run directory. Relative: under it. Absolute (an older
        state.json): if it names another run directory's `train/...`, the same file here."""
        if stored is None:
            return None
        path = Path(stored)
        if path.is_absolute():
            parts = path.parts
            starts = [
                i for i in range(1, len(parts)) if parts[i - 1 : i + 1] == ("train", "checkpoints")
            ]
            if not starts:
                return stored
            return str(Path(self.train_dir, *parts[starts[-1] :]))
        return str(self.run_dir.resolve(path))

    @property
    def next_round(self) -> int:
        return 0 if self.checkpoint_round is None else self.checkpoint_round + 1

    def record_checkpoint(
        self,
        round_index: int,
        checkpoint_dir: Path,
        hf_export: Path,
        metrics: dict,
        async_rounds: bool = False,
    ) -> None:
        """Record round `round_index`'s checkpoint (written under `checkpoint_dir` at step
        round_index + 1) and its HF export, with the records of their files and of the
        rounds since the previous checkpoint. Also what the rollout engines load to resume
        from it (`rollout_export`): that export, or with `async_rounds` the previous round's
        (None for round 0: the converted student), whose files are recorded with it."""
        root = self.run_dir.root
        rollout: Path | None = Path(hf_export)
        if async_rounds:  # the rollouts of the round after it come from the policy before it
            rollout = self.run_dir.hf_export(round_index - 1) if round_index else None
        iteration = Path(checkpoint_dir) / iteration_dir_name(round_index + 1)
        since = self.checkpoints[-1]["round"] + 1 if self.checkpoints else 0
        rounds = [self.run_dir.round_dir(r) for r in range(since, round_index + 1)]
        files = [iteration, Path(hf_export)] + ([Path(rollout)] if rollout is not None else [])
        self.checkpoints = [c for c in self.checkpoints if c["round"] < round_index]
        self.checkpoints.append(
            {
                "round": round_index,
                "metrics": metrics,
                "checkpoint": record_files(root, list(dict.fromkeys(files))),
                "rounds": record_files(root, rounds),
                "rollout_export": None if rollout is None else self.run_dir.relative(rollout),
            }
        )
        self.checkpoint_round = round_index
        self.checkpoint_dir = str(checkpoint_dir)
        self.hf_export = str(hf_export)
        self.rollout_export = None if rollout is None else str(rollout)
        self.metrics = metrics
        self.save()

    def save(self) -> None:
        run_dir = self.run_dir
        write_json(
            Path(self.train_dir) / STATE_FILE,
            {
                "checkpoint_round": self.checkpoint_round,
                "checkpoint_dir": None
                if self.checkpoint_dir is None
                else run_dir.relative(self.checkpoint_dir),
                "hf_export": None if self.hf_export is None else run_dir.relative(self.hf_export),
                "rollout_export": None
                if self.rollout_export is None
                else run_dir.relative(self.rollout_export),
                "metrics": self.metrics,
                "checkpoints": self.checkpoints,
            },
        )

    @property
    def resume_rounds(self) -> list[int]:
        """The rounds whose checkpoint (and HF export) a restart can resume from."""
        return [c["round"] for c in self.checkpoints]

    def rewind_to_intact(self, rounds: int) -> list[str]:
        """Make the newest usable checkpoint the resume point; returns what was found (empty
        when the newest checkpoint is used as it is).

        Usable: its round < `rounds` (a run made shorter ends at a checkpoint it reached),
        its files as recorded, and the files of every round up to it as recorded (a damaged
        round's rows are regenerated by redoing it). Checkpoints after the chosen one are
        forgotten (their rounds are redone); none usable = start from round 0.
        """
        root = self.run_dir.root
        damaged_rounds: list[str] = []
        for entry in self.checkpoints:  # oldest first: a damaged round rules out what follows
            problems = check_files(root, entry.get("rounds") or {})
            entry["_usable_rounds"] = not damaged_rounds and not problems
            damaged_rounds += problems
        notes: list[str] = []
        chosen = None
        for entry in reversed(self.checkpoints):
            if entry["round"] >= rounds:
                notes.append(
                    f"the checkpoint of round {entry['round']} is past the {rounds} rounds "
                    "now configured"
                )
                continue
            if not entry["_usable_rounds"]:
                notes.append(
                    f"rounds up to {entry['round']} have damaged files "
                    f"({'; '.join(damaged_rounds[:3])})"
                )
                continue
            problems = self._checkpoint_problems(entry)
            if problems:
                notes.append(
                    f"checkpoint of round {entry['round']} is damaged ({'; '.join(problems[:3])})"
                )
                continue
            chosen = entry
            break
        for entry in self.checkpoints:
            entry.pop("_usable_rounds", None)
        if not notes:
            return []
        newest = self.checkpoints[-1]["round"] if self.checkpoints else None
        if chosen is None:
            self.checkpoints = []
            self.checkpoint_round = self.checkpoint_dir = self.hf_export = None
            self.rollout_export = None
            self.metrics = {}
            notes.append("no intact checkpoint left: training starts again at round 0")
        else:
            self.checkpoints = [c for c in self.checkpoints if c["round"] <= chosen["round"]]
            self.checkpoint_round = chosen["round"]
            self.checkpoint_dir = str(self.run_dir.torch_dist_checkpoints)
            self.hf_export = str(self.run_dir.hf_export(chosen["round"]))
            self.rollout_export = self._rollout_export_of(chosen)
            self.metrics = chosen.get("metrics") or {}
            first, last = chosen["round"] + 1, min(newest, rounds - 1)
            redo = (
                "nothing to redo"
                if last < first
                else f"redoing round {first}"
                if last == first
                else f"redoing rounds {first}-{last}"
            )
            notes.append(f"resuming from round {chosen['round']}'s checkpoint, {redo}")
        self.save()
        return notes

    def _checkpoint_problems(self, entry: dict[str, Any]) -> list[str]:
        """What is wrong with a resume point's files; one recorded before file records
        existed is only checked for its torch_dist metadata and HF config."""
        root = self.run_dir.root
        if entry.get("checkpoint"):
            return check_files(root, entry["checkpoint"])
        needed = [
            self.run_dir.torch_dist_checkpoints
            / iteration_dir_name(entry["round"] + 1)
            / "metadata.json",
            self.run_dir.hf_export(entry["round"]) / "config.json",
        ]
        return [f"{self.run_dir.relative(p)} missing" for p in needed if not p.is_file()]

    def _rollout_export_of(self, entry: dict[str, Any]) -> str | None:
        """A resume point's rollout export (an entry written before they were recorded: its
        own HF export, as serial rounds resume)."""
        if "rollout_export" in entry:
            return self._own_path(entry["rollout_export"])
        return str(self.run_dir.hf_export(entry["round"]))

    def prune_hf_exports(self, keep: int, current_round: int) -> list[Path]:
        """Delete the HF exports of rounds before `current_round` that are neither among the
        last `keep` rounds nor what a resume point loads (its own export, and the rollout
        engines' when that is another) (`final` is never touched); `keep` 0 keeps all.
        Returns what was deleted."""
        if keep <= 0:
            return []
        wanted = set(range(current_round - keep + 1, current_round + 1)) | set(self.resume_rounds)
        needed = {
            Path(path).resolve()
            for path in (self._rollout_export_of(c) for c in self.checkpoints)
            if path is not None
        }
        exports = self.run_dir.hf_export(0).parent
        deleted = []
        for path in sorted(exports.glob("round_*")):
            index = path.name.removeprefix("round_")
            if index.isdigit() and int(index) not in wanted and path.resolve() not in needed:
                shutil.rmtree(path)
                deleted.append(path)
        return deleted


def rollout_weight_version(next_round: int, async_rounds: bool) -> int:
    """The weights the rollouts of round `next_round` come from, in policy updates: round k's
    are the policy after k steps (serial), or after max(k-1, 0) with rollout.async_rounds
    (generated while round k-1 trained). A run resumed at `next_round` starts its rollout
    engines there: `TrainState.rollout_export` holds those weights."""
    return max(next_round - 1, 0) if async_rounds else next_round
