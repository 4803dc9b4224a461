"""The OPD training rounds, driver side: generate -> reward -> score -> advantages -> step -> sync.

    summary = run_rounds(cfg, run_dir, teacher_urls=["http://127.0.0.1:30000"], on_round=print)

`opd_core.stages.train.Train` calls this after its cache-key and resume checks; call the
stage, not this, from a notebook. One round (slime's loop, one rollout per round) is
`Rounds.run_round`:

 1. generate: the rollout engines (SGLang protocol, holding the latest student weights) sample
    `n_samples_per_prompt` responses for `rollout_batch_size` prompts;
 2. reward: verifier / none / a user function -> `rollouts.arrow`;
 3. score: the teacher scores every response token, over HTTP (opd_type sglang) or inside the
    training actors (opd_type megatron) -> `teacher_logprobs.arrow`;
 4. advantages: the actors recompute the student's log-probs ("old" log-probs), the
    estimator turns rewards into advantages, and the OPD term is applied (opd_core.algorithm.opd);
 5. step: the actors take the policy step(s);
 6. sync: the actors export HF weights and every rollout engine reloads them.

Everything a round produces is written before the next starts, and `state.json` records the
last checkpointed round, so a killed run resumes where it stopped (see `TrainState`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opd_core.algorithm.advantages import AdvantageResult, compute_advantages
from opd_core.algorithm.batch import TrainBatch
from opd_core.algorithm.metrics import MetricsLog, round_metrics
from opd_core.algorithm.rewards import load_reward_fn
from opd_core.config import OPDRunConfig
from opd_core.engine.client import EngineClient
from opd_core.engine.fleet import start_servers
from opd_core.evaluation import chat_prompt_ids
from opd_core.io import read_arrow, write_arrow, write_json
from opd_core.rundir import RunDir
from opd_core.schemas import PROMPTS, ROLLOUTS
from opd_core.trainer.group import TrainerGroup
from opd_core.trainer.state import TrainState
from opd_core.trainer.teachers import Teacher, TeacherScores, open_teacher
from opd_core.verifier import is_correct

RoundCallback = Callable[[int, dict], None]


def run_rounds(
    cfg: OPDRunConfig,
    run_dir: RunDir,
    teacher_urls: list[str] | None,
    teacher_checkpoint: Path | None = None,
    on_round: RoundCallback | None = None,
) -> dict:
    """Run (or resume) every round; returns the last round's metrics and where the model is.

    `teacher_checkpoint`: the Megatron teacher (opd_type=megatron), resolved by the stage.
    """
    state = TrainState.load(run_dir.stage("train"))
    with Rounds(cfg, run_dir, teacher_urls, teacher_checkpoint, state) as rounds:
        last_metrics = state.metrics
        for round_index in range(state.next_round, cfg.rollout.rounds):
            last_metrics = rounds.run_round(round_index)
            if on_round:
                on_round(round_index, last_metrics)
        final_hf = rounds.trainer.export_hf(run_dir.final_student_hf)
    return {"final_hf": str(final_hf), "rounds": cfg.rollout.rounds, "last_metrics": last_metrics}


@dataclass
class Rollouts:
    """One round's samples, in request order (prompt i's n samples are consecutive)."""

    prompt_index: list[int] = field(default_factory=list)
    sample_index: list[int] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    response_text: list[str] = field(default_factory=list)
    rollout_logprobs: list[list[float]] = field(default_factory=list)
    finish_reason: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    # What reward functions see, one dict per sample (prompt messages, text, label, ids).
    samples: list[dict] = field(default_factory=list)

    def table(self, round_index: int, rewards: np.ndarray) -> pa.Table:
        """Rows of `rollouts.arrow` (opd_core.schemas.ROLLOUTS)."""
        columns = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}
        return pa.table({"round": [round_index] * len(rewards), **columns, "reward": rewards})

    def batch(self) -> TrainBatch:
        return TrainBatch(prompt_ids=self.prompt_ids, response_ids=self.response_ids)


class PhaseTimer:
    """Seconds per phase of a round: `with timer("generate"): ...` -> {"time_generate": s}."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"time_{phase}"] = time.perf_counter() - tick


class Rounds:
    """What every round uses: prompts, reward, rollout engines, trainer and teacher.

    A context manager: entering starts the rollout engines (with the newest checkpointed
    weights) and the training actors (resumed from that checkpoint); leaving stops them all.
    """

    def __init__(
        self,
        cfg: OPDRunConfig,
        run_dir: RunDir,
        teacher_urls: list[str] | None,
        teacher_checkpoint: Path | None,
        state: TrainState,
    ):
        self.cfg, self.run_dir, self.state = cfg, run_dir, state
        self.teacher_urls, self.teacher_checkpoint = teacher_urls, teacher_checkpoint
        self.prompts = read_arrow(run_dir.train_data, PROMPTS)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(run_dir.student_hf)
        self.prompt_ids = chat_prompt_ids(
            self.tokenizer, self.prompts, cfg.data.chat_template_kwargs
        )
        self.reward_fn = load_reward_fn(cfg.reward)
        self._stack = ExitStack()

    def __enter__(self) -> Rounds:
        cfg, run_dir, state = self.cfg, self.run_dir, self.state
        with self._stack as stack:
            self.metrics_log = MetricsLog(
                run_dir.train_metrics,
                loggers=cfg.algorithm.loggers,
                wandb_project=cfg.algorithm.wandb_project,
                run_name=run_dir.root.name,
            )
            stack.callback(self.metrics_log.close)
            # Resume from the newest checkpointed round, else start from the converted student.
            engines = stack.enter_context(
                start_servers(
                    "rollout",
                    cfg.rollout,
                    state.hf_export or run_dir.student_hf,
                    run_dir.rollout_log,
                    count=cfg.rollout.num_engines,
                )
            )
            self.rollout_client = stack.enter_context(
                EngineClient.from_config(engines.urls, cfg.client, api_key=cfg.rollout.api_key)
            )
            self.trainer = stack.enter_context(
                TrainerGroup(
                    cfg,
                    hf_config_dir=run_dir.student_hf,
                    ckpt_dir=run_dir.student_torch_dist,
                    teacher_ckpt_dir=self.teacher_checkpoint,
                )
            )
            self.teacher: Teacher | None = open_teacher(
                cfg, self.teacher_urls, self.trainer, run_dir.teacher_hf
            )
            if self.teacher is not None:
                stack.callback(self.teacher.close)
            if state.checkpoint_dir is not None:  # model, optimizer, RNG and iteration
                self.trainer.load_checkpoint(state.checkpoint_dir, step=state.checkpoint_round + 1)
            self._stack = stack.pop_all()  # entered whole: keep it open until __exit__
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # -------------------------------------------------------------------- one round

    def run_round(self, round_index: int) -> dict:
        """Generate, reward, score, advantages, step, sync; returns the round's metrics row."""
        round_dir, timer = self.run_dir.round_dir(round_index), PhaseTimer()
        with timer("generate"):
            rollouts = self.generate(round_index)
        with timer("score"):
            rewards = self.reward(rollouts)
            write_arrow(
                round_dir / "rollouts.arrow", rollouts.table(round_index, rewards), ROLLOUTS
            )
            batch = rollouts.batch()
            scores = self.score(round_index, batch)
            if scores is not None:
                table = scores.table(rollouts.prompt_index, rollouts.sample_index)
                write_arrow(round_dir / "teacher_logprobs.arrow", table)
        with timer("train"):
            advantages = self.advantages(batch, rollouts, rewards, scores)
            train_metrics = self.trainer.train_step(batch)
        with timer("sync"):
            export_dir = self.sync(round_index)
        metrics = {
            "round": round_index,
            **round_metrics(
                rewards, rollouts.correct, [len(r) for r in batch.response_ids], advantages
            ),
            **train_metrics,
            **timer.seconds,
            "seconds": sum(timer.seconds.values()),
        }
        write_json(round_dir / "metrics.json", metrics)
        self.metrics_log.append(metrics)
        if self._is_checkpoint_round(round_index):
            root = self.run_dir.torch_dist_checkpoints
            self.trainer.save_checkpoint(root, step=round_index + 1)
            self.state.record_checkpoint(round_index, root, export_dir, metrics)
        return metrics

    def generate(self, round_index: int) -> Rollouts:
        return generate_rollouts(
            self.cfg,
            round_index,
            self.prompts,
            self.prompt_ids,
            self.rollout_client,
            self.tokenizer,
        )

    def reward(self, rollouts: Rollouts) -> np.ndarray:
        return np.asarray(self.reward_fn(rollouts.samples), dtype=np.float32)

    def score(self, round_index: int, batch: TrainBatch) -> TeacherScores | None:
        """The teacher's log-probs of every response token (None without OPD)."""
        if self.teacher is None:
            return None
        scores = self.teacher.score(batch, label=f"round {round_index} teacher")
        scores.attach(batch)
        return scores

    def advantages(
        self,
        batch: TrainBatch,
        rollouts: Rollouts,
        rewards: np.ndarray,
        scores: TeacherScores | None,
    ) -> AdvantageResult:
        """Old log-probs (and ppo values, KL reference), then advantages with the OPD term."""
        algorithm = self.cfg.algorithm
        batch.old_logprobs = (
            [np.asarray(x, dtype=np.float32) for x in rollouts.rollout_logprobs]
            if algorithm.use_rollout_logprobs
            else self.trainer.compute_logprobs(batch)
        )
        values = (
            self.trainer.compute_values(batch) if algorithm.advantage_estimator == "ppo" else None
        )
        result = compute_advantages(
            algorithm,
            rewards=rewards,
            group_ids=np.asarray(rollouts.prompt_index),
            old_logprobs=batch.old_logprobs,
            teacher_logprobs=None if scores is None else scores.logprobs,
            values=values,
        )
        batch.advantages = result.advantages
        if values is not None:
            batch.returns, batch.old_values = result.returns, values
        if algorithm.use_kl_loss:
            batch.ref_logprobs = self.trainer.ref_logprobs(batch)
        return result

    def sync(self, round_index: int) -> Path:
        """Export the new weights and load them into every rollout engine."""
        export_dir = self.trainer.export_hf(self.run_dir.hf_export(round_index))
        self.rollout_client.update_weights_from_disk(str(export_dir))
        return Path(export_dir)

    def _is_checkpoint_round(self, round_index: int) -> bool:
        """Every `save_interval` rounds, and always the last one."""
        last = round_index == self.cfg.rollout.rounds - 1
        return last or (round_index + 1) % self.cfg.train.save_interval == 0


def generate_rollouts(
    cfg: OPDRunConfig,
    round_index: int,
    prompts: pa.Table,
    prompt_ids: list[list[int]],
    client: EngineClient,
    tokenizer: PreTrainedTokenizerBase,
) -> Rollouts:
    """A round's prompts (seeded by round) and their responses from the engines at `client`."""
    rollout = cfg.rollout
    rng = np.random.default_rng([cfg.seed, round_index])
    count = min(rollout.rollout_batch_size, len(prompt_ids))
    chosen = rng.choice(len(prompt_ids), size=count, replace=False)
    rows = [int(i) for i in chosen for _ in range(rollout.n_samples_per_prompt)]
    responses = client.generate(
        [prompt_ids[i] for i in rows],
        {
            "max_new_tokens": rollout.rollout_max_response_len,
            "temperature": rollout.rollout_temperature,
            "top_p": rollout.rollout_top_p,
            "top_k": rollout.rollout_top_k,
            "sampling_seed": int(rng.integers(2**31)),  # SGLang's name; sample i gets seed + i
        },
        return_logprob=True,
        progress=f"round {round_index} rollout",
    )
    labels = prompts.column("label").to_pylist()
    messages = prompts.column("prompt").to_pylist()
    indices = prompts.column("index").to_pylist()
    out = Rollouts()
    for position, (row, response) in enumerate(zip(rows, responses)):
        response_ids = list(response["output_ids"])
        text = tokenizer.decode(response_ids, skip_special_tokens=True)
        meta = response["meta_info"]
        out.prompt_index.append(indices[row])
        out.sample_index.append(position % rollout.n_samples_per_prompt)
        out.prompt_ids.append(prompt_ids[row])
        out.response_ids.append(response_ids)
        out.response_text.append(text)
        out.rollout_logprobs.append([e[0] for e in meta.get("output_token_logprobs") or []])
        out.finish_reason.append(meta["finish_reason"]["type"])
        out.label.append(labels[row])
        out.correct.append(is_correct(text, labels[row]))
        out.samples.append(
            {
                "prompt": messages[row],
                "response_text": text,
                "label": labels[row],
                "response_ids": response_ids,
            }
        )
    return out
