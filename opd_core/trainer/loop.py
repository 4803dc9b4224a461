"""The OPD training rounds, driver side: generate -> reward -> score -> advantages -> step -> sync.

    summary = run_rounds(cfg, run_dir, teacher=["http://127.0.0.1:30000"], on_round=print)

`opd_core.stages.train.Train` calls this after its cache-key and resume checks; call the
stage, not this, from a notebook. One round (slime's loop, one rollout per round) is
`Rounds.run_round`:

 1. generate: the rollout engines (SGLang protocol, holding the latest student weights) sample
    `n_samples_per_prompt` responses for `rollout_batch_size` prompts;
 2. reward: verifier / none / a user function -> `rollouts.arrow`;
 3. score: the teacher scores every response token, over HTTP (opd_type sglang) or inside the
    training actors (opd_type megatron) -> `teacher_logprobs.arrow`. A server teacher scores
    each generated batch while the others still generate (`rollout.stream_scoring`,
    opd_core.trainer.streaming), with the same rows;
 4. advantages: the actors recompute the student's log-probs ("old" log-probs), the
    estimator turns rewards into advantages, and the OPD term is applied (opd_core.algorithm.opd);
 5. step: the actors take the policy step(s);
 6. sync: the actors export HF weights and every rollout engine reloads them.

Each round's metrics hold its timeline (`RoundTimeline`): when each phase started and ended
and when each server was busy (`time_*`), which the report draws.

Steps 1-3 are `Rounds.produce` (what the round trains on, written to its rollouts.arrow and
teacher_logprobs.arrow), steps 4-6 `Rounds.consume`. `serial_rounds` runs one round after the
other; with `rollout.async_rounds`, `opd_core.trainer.async_rounds` makes round k+1 while
round k trains (its rollouts then come from the weights one step behind).

Everything a round produces is written before the next starts, and `state.json` records the
last checkpointed round, so a killed run resumes where it stopped (see `TrainState`).

Where things run is planned once (`opd_core.cluster.Layout`: training actors, rollout
engines, and the teacher replicas the teacher stage started) and checked against the Ray
cluster before anything of training starts. The rounds heal themselves: a dead rollout
engine or teacher replica is relaunched by its fleet (`opd_core.engine.fleet`) while the
round goes on; a dead training actor fails the round at once, the actors are rebuilt from
the last checkpoint (the rollout engines go back to that checkpoint's weights) and the
rounds since then are redone, with the same seeds, so the run ends as an uninterrupted one
would. Each round's metrics count the relaunches and rebuilds (`*_restarts`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from opd_core.algorithm.advantages import AdvantageResult, compute_advantages
from opd_core.algorithm.batch import TrainBatch
from opd_core.algorithm.metrics import MetricsLog, round_metrics
from opd_core.algorithm.rewards import load_reward_fn
from opd_core.cluster import (
    ClusterResources,
    Layout,
    Reservation,
    colocated_devices,
    ray_session,
    reserve,
)
from opd_core.config import OPDRunConfig
from opd_core.engine.fleet import ServerFleet, start_servers, stop_when_started
from opd_core.evaluation import chat_prompt_ids
from opd_core.io import read_arrow, write_arrow, write_json
from opd_core.rundir import RunDir
from opd_core.schemas import PROMPTS, ROLLOUTS
from opd_core.trainer.async_rounds import async_rounds
from opd_core.trainer.group import TrainerGroup, TrainingActorDied
from opd_core.trainer.rollouts import Rollouts, generate_rollouts
from opd_core.trainer.state import TrainState, rollout_weight_version
from opd_core.trainer.streaming import StreamedScoring
from opd_core.trainer.teachers import ServerTeacher, Teacher, TeacherScores, open_teacher
from opd_core.trainer.timeline import RoundTimeline

logger = logging.getLogger("opd.train")

RoundCallback = Callable[[int, dict], None]
# The teacher the rounds score with: the teacher stage's fleet (self-healing), the URLs of
# servers someone else runs, or None (no server teacher).
TeacherServers = ServerFleet | Sequence[str] | None


def run_rounds(
    cfg: OPDRunConfig,
    run_dir: RunDir,
    teacher: TeacherServers,
    teacher_checkpoint: Path | None = None,
    on_round: RoundCallback | None = None,
) -> dict:
    """Run (or resume) every round; returns the last round's metrics and where the model is.

    `teacher_checkpoint`: the Megatron teacher (opd_type=megatron), resolved by the stage.
    """
    state = TrainState.load(run_dir.stage("train"))
    drive = async_rounds if cfg.rollout.async_rounds else serial_rounds
    with Rounds(cfg, run_dir, teacher, teacher_checkpoint, state) as rounds:
        while True:
            try:
                last_metrics = state.metrics
                for round_index, last_metrics in drive(rounds, state.next_round):
                    if on_round:
                        on_round(round_index, last_metrics)
                final_hf = rounds.trainer.export_hf(run_dir.final_student_hf)
                break
            except TrainingActorDied as death:  # back to the last checkpoint, then on from there
                rounds.rebuild_trainer(death)
    return {"final_hf": str(final_hf), "rounds": cfg.rollout.rounds, "last_metrics": last_metrics}


def serial_rounds(rounds: Rounds, start: int) -> Iterator[tuple[int, dict]]:
    """Rounds `start`.. one after the other, each sampling from the weights of the step before
    it; yields (round, metrics) once each round is done."""
    for round_index in range(start, rounds.cfg.rollout.rounds):
        yield round_index, rounds.run_round(round_index)


@dataclass
class Produced:
    """What a round trains on: its rollouts, rewards and teacher scores (already written to
    rollouts.arrow / teacher_logprobs.arrow), and the timeline of making them."""

    rollouts: Rollouts
    rewards: np.ndarray
    batch: TrainBatch
    scores: TeacherScores | None
    timeline: RoundTimeline
    # Made on a background thread while the previous round trained (async rounds): the
    # round's own time on the driver starts when it is consumed.
    overlapped: bool = False


class Rounds:
    """What every round uses: prompts, reward, rollout engines, trainer and teacher.

    A context manager: entering checks the layout, reserves the actors' and engines'
    placement groups, starts the training actors (resumed from the newest checkpoint) and the
    rollout engines (with that checkpoint's weights); leaving stops them all.
    """

    def __init__(
        self,
        cfg: OPDRunConfig,
        run_dir: RunDir,
        teacher: TeacherServers,
        teacher_checkpoint: Path | None,
        state: TrainState,
    ):
        self.cfg, self.run_dir, self.state = cfg, run_dir, state
        self.teacher_servers, self.teacher_checkpoint = teacher, teacher_checkpoint
        self.prompts = read_arrow(run_dir.train_data, PROMPTS)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(run_dir.student_hf)
        self.prompt_ids = chat_prompt_ids(
            self.tokenizer, self.prompts, cfg.data.chat_template_kwargs
        )
        # Rollouts cap max_new_tokens so that long prompts fit (SGLang would answer 400).
        self.context_length = getattr(
            AutoConfig.from_pretrained(run_dir.student_hf), "max_position_embeddings", None
        )
        self.reward_fn = load_reward_fn(cfg.reward)
        self.layout = Layout.from_config(cfg)
        self.trainer_restarts = 0  # rebuilds so far (bounded by train.ray.max_restarts)
        self._restarts_seen: dict[str, int] = {}
        self._stack = ExitStack()

    def __enter__(self) -> Rounds:
        cfg, run_dir = self.cfg, self.run_dir
        timeout = cfg.train.ray.placement_timeout
        with self._stack as stack:
            self.metrics_log = MetricsLog(
                run_dir.train_metrics,
                loggers=cfg.algorithm.loggers,
                wandb_project=cfg.algorithm.wandb_project,
                run_name=run_dir.root.name,
            )
            stack.callback(self.metrics_log.close)
            stack.enter_context(ray_session(cfg, self.layout))
            # The whole run's layout, the teacher's replicas included: a clear error before
            # any of training starts.
            self.layout.check(ClusterResources.from_ray())
            self._actors = reserve(self.layout.role("actor"), timeout)
            stack.callback(self._actors.release)
            rollout = self.layout.role("rollout")
            reservation = None
            if rollout is not None:
                reservation = reserve(rollout, timeout, host=self._actors)
                stack.callback(reservation.release)
            starting = None
            if rollout is None or not rollout.colocated:
                # The engines start while the actors load (each takes seconds of imports and
                # weights); colocated engines need the actors' GPU ids first.
                starting = stack.enter_context(ThreadPoolExecutor(1)).submit(
                    self._start_engines, reservation
                )
                stack.callback(stop_when_started, starting)
            self.trainer = self._start_trainer()
            stack.callback(lambda: self.trainer.shutdown())
            if starting is None:  # colocated: on the GPUs of the actors they share
                devices = [
                    colocated_devices(self.trainer.placement, e, rollout.gpus)
                    for e in range(rollout.count)
                ]
                self.engines = stack.enter_context(self._start_engines(reservation, devices))
            else:
                self.engines = starting.result()
            self.rollout_client = stack.enter_context(self.engines.client(cfg.client))
            self.teacher: Teacher | None = open_teacher(
                cfg, self.teacher_servers, self.trainer, run_dir.teacher_hf
            )
            if self.teacher is not None:
                stack.callback(lambda: self.teacher.close())
            self.score_limit = self._score_limit()
            # Streamed scoring's requests wait here, not on the rollout client's threads.
            self._score_pool = ThreadPoolExecutor(
                cfg.client.max_concurrency, thread_name_prefix="opd-stream-score"
            )
            stack.callback(self._score_pool.shutdown)
            self._write_placement()
            self._stack = stack.pop_all()  # entered whole: keep it open until __exit__
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _start_engines(
        self, reservation: Reservation | None, devices: list[list[str]] | None = None
    ) -> ServerFleet:
        """The rollout engines, from the newest checkpointed round's weights, else the
        converted student's; weight_version = the number of policy updates in those weights."""
        return start_servers(
            "rollout",
            self.cfg,
            self.state.rollout_export or self.run_dir.student_hf,
            self.run_dir.rollout_log,
            reservation=reservation,
            devices=devices,
            weight_version=self._resume_version(),
        )

    def _start_trainer(self) -> TrainerGroup:
        """The training actors in their bundles, from the newest checkpoint (model, optimizer,
        RNG and iteration) or the converted student."""
        trainer = TrainerGroup(
            self.cfg,
            hf_config_dir=self.run_dir.student_hf,
            ckpt_dir=self.run_dir.student_torch_dist,
            teacher_ckpt_dir=self.teacher_checkpoint,
            reservation=self._actors,
        )
        state = self.state
        try:
            if state.checkpoint_dir is not None:
                trainer.load_checkpoint(state.checkpoint_dir, step=state.checkpoint_round + 1)
        except BaseException:
            trainer.shutdown()
            raise
        return trainer

    def rebuild_trainer(self, death: TrainingActorDied) -> None:
        """After a training actor died: new actors from the last checkpoint, and the rollout
        engines back to that checkpoint's weights; the rounds after it are then redone. A
        RuntimeError once train.ray.max_restarts rebuilds are used up."""
        limit, state = self.cfg.train.ray.max_restarts, self.state
        if self.trainer_restarts >= limit:
            raise RuntimeError(
                f"{death}; no restarts left (train.ray.max_restarts = {limit} used)"
            ) from death
        self.trainer_restarts += 1
        source = (
            f"round {state.checkpoint_round}'s checkpoint"
            if state.checkpoint_dir is not None
            else "the converted student"
        )
        logger.warning(
            "%s; rebuilding the training actors from %s and redoing from round %d (%d/%d)",
            death,
            source,
            state.next_round,
            self.trainer_restarts,
            limit,
        )
        self.trainer.shutdown()
        self.trainer = self._start_trainer()
        if self.teacher is not None and self.cfg.algorithm.teacher_source == "megatron":
            # It lives in the actors.
            self.teacher = open_teacher(self.cfg, None, self.trainer, self.run_dir.teacher_hf)
        self.engines.update_weights(
            state.rollout_export or self.run_dir.student_hf, self._resume_version()
        )
        self._write_placement()

    def _resume_version(self) -> str:
        """The weight_version of the engines' weights when the rounds (re)start at
        `state.next_round` (`state.rollout_export`)."""
        async_rounds = self.cfg.rollout.async_rounds
        return str(rollout_weight_version(self.state.next_round, async_rounds))

    def _score_limit(self) -> int | None:
        """The longest prompt + response the teacher servers score (SGLang answers 400 above
        its max_req_input_len); None for an in-actor teacher or none at all."""
        if not isinstance(self.teacher, ServerTeacher):
            return None
        config = self.run_dir.teacher_hf / "config.json"
        context = (
            getattr(AutoConfig.from_pretrained(config.parent), "max_position_embeddings", None)
            if config.is_file()
            else None
        )
        return self.teacher.client.context_limits(context or 1 << 30).max_prompt_tokens

    def _write_placement(self) -> None:
        """train/placement.json: which actor, engine and replica got which node and GPUs."""
        fleets = [self.engines, self.teacher_servers]
        rows = self.trainer.placement + [
            row for fleet in fleets if isinstance(fleet, ServerFleet) for row in fleet.placement
        ]
        write_json(self.run_dir.train_placement, [row.to_dict() for row in rows])

    def _restarts(self) -> dict[str, int]:
        """Relaunches and rebuilds since the last call: the round's `*_restarts` metrics."""
        totals = {
            "rollout_engine_restarts": self.engines.restarts,
            "teacher_replica_restarts": getattr(self.teacher_servers, "restarts", 0),
            "trainer_restarts": self.trainer_restarts,
        }
        delta = {k: v - self._restarts_seen.get(k, 0) for k, v in totals.items()}
        self._restarts_seen = totals
        return delta

    # -------------------------------------------------------------------- one round

    def run_round(self, round_index: int) -> dict:
        """Generate, reward, score, advantages, step, sync; returns the round's metrics row.
        With streamed scoring the teacher scores each generated batch while the others still
        generate; the rows written are the same."""
        return self.consume(round_index, self.produce(round_index))

    def produce(self, round_index: int, overlapped: bool = False) -> Produced:
        """Generate, reward, score: the round's rollouts and teacher scores, written to its
        rollouts.arrow and teacher_logprobs.arrow. `overlapped`: made while another round
        trains (async rounds)."""
        round_dir, timeline = self.run_dir.round_dir(round_index), RoundTimeline()
        if not overlapped:
            self._server_spans()  # drop what came before this round
        streamed = self._streamed_scoring(round_index, timeline)
        with timeline("generate"):
            rollouts = self.generate(round_index, on_batch=streamed and streamed.submit)
        # One reward call for the whole round, streamed or not: a user reward function takes
        # the round's samples at once (it may shape rewards by group or batch).
        with timeline("reward"):
            rewards = self.reward(rollouts)
            write_arrow(
                round_dir / "rollouts.arrow", rollouts.table(round_index, rewards), ROLLOUTS
            )
        batch = rollouts.batch()
        if streamed is None:
            with timeline("score"):
                scores = self.score(round_index, batch)
        else:
            scores = self.score(round_index, batch, streamed)
            if streamed.span is not None:
                timeline.record("score", *streamed.span)
        if scores is not None:
            table = scores.table(rollouts.prompt_index, rollouts.sample_index)
            write_arrow(round_dir / "teacher_logprobs.arrow", table)
        return Produced(rollouts, rewards, batch, scores, timeline, overlapped)

    def consume(
        self, round_index: int, produced: Produced, wait: Callable[[], object] | None = None
    ) -> dict:
        """Advantages, step, sync, then the round's metrics (and checkpoint); returns the
        metrics row. `wait`: called after the step, before the engines get the new weights
        (async rounds: until the next round's rollouts, made by these engines, are done)."""
        round_dir, timeline = self.run_dir.round_dir(round_index), produced.timeline
        if produced.overlapped:
            # The round starts on the driver now: its rollouts, made while the round before
            # trained, get negative times, and `seconds` is its wall time on the driver.
            timeline.rebase()
        rollouts, batch, scores = produced.rollouts, produced.batch, produced.scores
        rewards = produced.rewards
        with timeline("train"):
            advantages = self.advantages(batch, rollouts, rewards, scores)
            train_metrics = self.trainer.train_step(batch)
        if wait is not None:
            with timeline("wait_rollouts"):
                wait()
        with timeline("sync"):
            export_dir = self.sync(round_index)
        for role, spans in self._server_spans().items():
            timeline.add_servers(role, spans)
        metrics = {
            "round": round_index,
            **round_metrics(
                rewards, rollouts.correct, [len(r) for r in batch.response_ids], advantages
            ),
            **train_metrics,
            **self._restarts(),
            **timeline.metrics(),
        }
        write_json(round_dir / "metrics.json", metrics)
        self.metrics_log.append(metrics)
        if self._is_checkpoint_round(round_index):
            root = self.run_dir.torch_dist_checkpoints
            self.trainer.save_checkpoint(root, step=round_index + 1)
            self.state.record_checkpoint(
                round_index, root, export_dir, metrics, async_rounds=self.cfg.rollout.async_rounds
            )
        return metrics

    def _streamed_scoring(
        self, round_index: int, timeline: RoundTimeline
    ) -> StreamedScoring | None:
        """This round's streamed scoring, or None: scored after generation (no server
        teacher, or rollout.stream_scoring off; see opd_core.trainer.streaming for why the
        Megatron teacher does not stream)."""
        if not (self.cfg.rollout.stream_scoring and isinstance(self.teacher, ServerTeacher)):
            return None
        label = f"round {round_index} teacher"
        return StreamedScoring(self.teacher, self._score_pool, timeline.now, label)

    def _server_spans(self) -> dict[str, list[tuple[str, float, float]]]:
        """The rollout engines' and teacher servers' answered requests since the last call."""
        spans = {"rollout": self.rollout_client.request_spans()}
        if isinstance(self.teacher, ServerTeacher):
            spans["teacher"] = self.teacher.client.request_spans()
        return spans

    def generate(
        self, round_index: int, on_batch: Callable[[int, Rollouts], None] | None = None
    ) -> Rollouts:
        return generate_rollouts(
            self.cfg,
            round_index,
            self.prompts,
            self.prompt_ids,
            self.rollout_client,
            self.tokenizer,
            context_length=self.context_length,
            weight_version=self.engines.weight_version,
            max_total_tokens=self.score_limit,
            on_batch=on_batch,
        )

    def reward(self, rollouts: Rollouts) -> np.ndarray:
        return np.asarray(self.reward_fn(rollouts.samples), dtype=np.float32)

    def score(
        self, round_index: int, batch: TrainBatch, streamed: StreamedScoring | None = None
    ) -> TeacherScores | None:
        """The teacher's log-probs of every response token (None without OPD); with
        `streamed`, those it requested during generation."""
        if self.teacher is None:
            return None
        if streamed is not None:
            scores = streamed.result(len(batch))
        else:
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
        """Old log-probs (the engine's rollout log-probs where `cfg.old_logprobs_from_rollouts`:
        async rounds train on rollouts of the previous weights; else a forward pass when
        something reads them before the step, `cfg.old_logprobs_forward`; else the step's own
        forward is the old policy's), ppo values, the KL reference, then advantages with the
        OPD term."""
        algorithm = self.cfg.algorithm
        if self.cfg.old_logprobs_from_rollouts:
            batch.old_logprobs = [
                np.asarray(x, dtype=np.float32) for x in rollouts.rollout_logprobs
            ]
        elif self.cfg.old_logprobs_forward:
            batch.old_logprobs = self.trainer.compute_logprobs(batch)
        else:
            batch.old_logprobs = []  # the actor takes its training forward's, detached
        values = (
            self.trainer.compute_values(batch) if algorithm.advantage_estimator == "ppo" else None
        )
        result = compute_advantages(
            algorithm,
            rewards=rewards,
            group_ids=np.asarray(rollouts.prompt_index),
            old_logprobs=batch.old_logprobs or None,
            teacher_logprobs=None if scores is None else scores.logprobs,
            values=values,
            response_lengths=[len(r) for r in batch.response_ids],
        )
        batch.advantages = result.advantages
        if values is not None:
            batch.returns, batch.old_values = result.returns, values
        if algorithm.use_kl_loss:
            batch.ref_logprobs = self.trainer.ref_logprobs(batch)
        return result

    def sync(self, round_index: int) -> Path:
        """Export the new weights and load them into every rollout engine; returns once each
        engine reports weight_version round_index + 1 (the next round samples from it)."""
        export_dir = self.trainer.export_hf(self.run_dir.hf_export(round_index))
        self.engines.update_weights(export_dir, weight_version=str(round_index + 1))
        return Path(export_dir)

    def _is_checkpoint_round(self, round_index: int) -> bool:
        """Every `save_interval` rounds, and always the last one."""
        last = round_index == self.cfg.rollout.rounds - 1
        return last or (round_index + 1) % self.cfg.train.save_interval == 0
