"""The OPD training rounds, driver side: generate -> reward -> teacher -> advantages -> update.

    summary = run_training(cfg, run_dir, teacher_urls=["http://127.0.0.1:30000"])

One round (slime's loop, one rollout per round):
 1. the rollout server (SGLang protocol, holding the latest student weights) samples
    `n_samples_per_prompt` responses for `rollout_batch_size` prompts;
 2. rewards (verifier / none / user function) -> `rollouts.arrow`;
 3. the teacher scores every response token, over HTTP (opd_type sglang) or inside the
    training actors (opd_type megatron) -> `teacher_logprobs.arrow`;
 4. the Megatron actors recompute the student's log-probs ("old" log-probs), the estimator
    turns rewards into advantages and the OPD penalty is added;
 5. the actors take the policy step(s), export HF weights, and the rollout server reloads
    them via /update_weights_from_disk.

Everything a round produces is written before the next starts, and `state.json` records the
last completed round, so a killed run resumes where it stopped (see `TrainState`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
from transformers import AutoTokenizer

from opd_core.algorithm.advantages import compute_advantages
from opd_core.algorithm.batch import TrainBatch
from opd_core.algorithm.metrics import MetricsLog, round_metrics
from opd_core.algorithm.rewards import load_reward_fn
from opd_core.config import OPDRunConfig, TeacherConfig
from opd_core.engine.client import EngineClient, scores_to_table
from opd_core.engine.launcher import launch_server
from opd_core.evaluation import chat_prompt_ids
from opd_core.io import read_arrow, write_arrow, write_json
from opd_core.rundir import RunDir
from opd_core.schemas import PROMPTS, ROLLOUTS
from opd_core.stages import teacher_checkpoint
from opd_core.trainer.group import TrainerGroup
from opd_core.trainer.state import TrainState
from opd_core.verifier import is_correct

RoundCallback = Callable[[int, dict], None]


def run_training(
    cfg: OPDRunConfig,
    run_dir: RunDir,
    teacher_urls: list[str] | None,
    on_round: RoundCallback | None = None,
) -> dict:
    """Run (or resume) all rounds; returns the last round's metrics and where the model is."""
    train_dir = run_dir.stage("train")
    state = TrainState.load(train_dir)
    prompts = read_arrow(run_dir.train_data, PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(run_dir.student_hf)
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    reward_fn = load_reward_fn(cfg.reward)
    metrics_log = MetricsLog(
        train_dir / "metrics.arrow",
        loggers=cfg.algorithm.loggers,
        wandb_project=cfg.algorithm.wandb_project,
        run_name=run_dir.root.name,
    )
    use_megatron_teacher = cfg.algorithm.use_opd and cfg.algorithm.opd_type == "megatron"
    if cfg.algorithm.use_opd and not use_megatron_teacher and not teacher_urls:
        raise ValueError(
            "algorithm.opd_type=sglang needs a teacher server: run the teacher stage first"
        )

    # Resume from the newest checkpointed round, else start from the converted student.
    student_hf = state.hf_export or run_dir.student_hf
    with (
        launch_server(
            "builtin", student_hf, _rollout_engine(cfg), train_dir / "rollout_server.log"
        ) as rollout_server,
        EngineClient.from_config(rollout_server.url, cfg.client) as rollout_client,
        _teacher_client(cfg, teacher_urls) as teacher_client,
        TrainerGroup(
            cfg,
            hf_config_dir=run_dir.student_hf,
            ckpt_dir=run_dir.student_torch_dist,
            teacher_ckpt_dir=teacher_checkpoint(cfg, run_dir),
        ) as trainer,
    ):
        if state.checkpoint_dir is not None:  # model, optimizer, RNG and iteration of that round
            trainer.load_checkpoint(state.checkpoint_dir, step=state.checkpoint_round + 1)
        last_metrics: dict = state.metrics
        for round_index in range(state.next_round, cfg.rollout.num_rollout):
            round_dir = run_dir.round_dir(round_index)
            timings: dict[str, float] = {}

            tick = time.perf_counter()
            rollouts = generate_rollouts(
                cfg, round_index, prompts, prompt_ids, rollout_client, tokenizer
            )
            timings["time_generate"] = time.perf_counter() - tick

            tick = time.perf_counter()
            rewards = np.asarray(reward_fn(rollouts["samples"]), dtype=np.float32)
            write_arrow(
                round_dir / "rollouts.arrow",
                _rollouts_table(round_index, rollouts, rewards),
                ROLLOUTS,
            )
            batch = TrainBatch(
                prompt_ids=rollouts["prompt_ids"], response_ids=rollouts["response_ids"]
            )
            topk = cfg.algorithm.opd_topk
            if not cfg.algorithm.use_opd:
                teacher_logprobs = None
            elif use_megatron_teacher and topk:
                teacher_logprobs, batch.teacher_topk_ids, batch.teacher_topk_logprobs = (
                    trainer.teacher_topk(batch, topk)
                )
            elif use_megatron_teacher:
                teacher_logprobs = trainer.teacher_logprobs(batch)
            elif topk:
                teacher_logprobs, batch.teacher_topk_ids, batch.teacher_topk_logprobs = (
                    teacher_client.score_topk(
                        batch.prompt_ids,
                        batch.response_ids,
                        topk,
                        progress=f"round {round_index} teacher top-{topk}",
                    )
                )
            else:
                teacher_logprobs = teacher_client.score(
                    batch.prompt_ids, batch.response_ids, progress=f"round {round_index} teacher"
                )
            if teacher_logprobs is not None:
                write_arrow(
                    round_dir / "teacher_logprobs.arrow",
                    scores_to_table(
                        rollouts["prompt_index"],
                        rollouts["sample_index"],
                        teacher_logprobs,
                        batch.teacher_topk_ids,
                        batch.teacher_topk_logprobs,
                    ),
                )
            timings["time_score"] = time.perf_counter() - tick

            tick = time.perf_counter()
            batch.old_logprobs = (
                [np.asarray(x, dtype=np.float32) for x in rollouts["rollout_logprobs"]]
                if cfg.algorithm.use_rollout_logprobs
                else trainer.compute_logprobs(batch)
            )
            values = (
                trainer.compute_values(batch)
                if cfg.algorithm.advantage_estimator == "ppo"
                else None
            )
            # Top-k OPD: the OPD term is the actor's dense top-k loss, not an advantage penalty
            # (the sampled-token reverse KL is still computed, as the metric).
            algorithm = (
                cfg.algorithm.model_copy(update={"opd_kl_coef": 0.0}) if topk else cfg.algorithm
            )
            result = compute_advantages(
                algorithm,
                rewards=rewards,
                group_ids=np.asarray(rollouts["prompt_index"]),
                old_logprobs=batch.old_logprobs,
                teacher_logprobs=teacher_logprobs,
                values=values,
            )
            batch.advantages = result.advantages
            if values is not None:
                batch.returns, batch.old_values = result.returns, values
            if cfg.algorithm.use_kl_loss:
                batch.ref_logprobs = trainer.ref_logprobs(batch)
            train_metrics = trainer.train_step(batch)
            timings["time_train"] = time.perf_counter() - tick

            tick = time.perf_counter()
            export_dir = trainer.export_hf(
                train_dir / "checkpoints" / "hf" / f"round_{round_index:04d}"
            )
            rollout_client.update_weights_from_disk(str(export_dir))
            timings["time_sync"] = time.perf_counter() - tick

            last_metrics = {
                "round": round_index,
                **round_metrics(
                    rewards, rollouts["correct"], [len(r) for r in batch.response_ids], result
                ),
                **train_metrics,
                **timings,
                "seconds": sum(timings.values()),
            }
            write_json(round_dir / "metrics.json", last_metrics)
            metrics_log.append(last_metrics)
            if _is_checkpoint_round(cfg, round_index):
                checkpoint_root = train_dir / "checkpoints" / "torch_dist"
                trainer.save_checkpoint(checkpoint_root, step=round_index + 1)
                state.record_checkpoint(round_index, checkpoint_root, export_dir, last_metrics)
            if on_round:
                on_round(round_index, last_metrics)

        final_hf = trainer.export_hf(run_dir.final_student_hf)
    metrics_log.close()
    return {
        "final_hf": str(final_hf),
        "rounds": cfg.rollout.num_rollout,
        "last_metrics": last_metrics,
    }


# ------------------------------------------------------------------------------ helpers


def _rollout_engine(cfg: OPDRunConfig) -> TeacherConfig:
    """The rollout server: the built-in engine on a free local port, no key, no TP. It shares
    only the host and start-up timeout with the teacher's settings."""
    return TeacherConfig(
        backend="builtin",
        host=cfg.teacher.host,
        port=0,
        startup_timeout=cfg.teacher.startup_timeout,
    )


def _teacher_client(cfg: OPDRunConfig, teacher_urls: list[str] | None):
    if not teacher_urls:
        return nullcontext()
    return EngineClient.from_config(teacher_urls, cfg.client, api_key=cfg.teacher.api_key)


def _is_checkpoint_round(cfg: OPDRunConfig, round_index: int) -> bool:
    """Every `save_interval` rounds, and always the last one."""
    last = round_index == cfg.rollout.num_rollout - 1
    return last or (round_index + 1) % cfg.train.save_interval == 0


def generate_rollouts(
    cfg: OPDRunConfig,
    round_index: int,
    prompts: pa.Table,
    prompt_ids: list[list[int]],
    client,
    tokenizer,
) -> dict:
    """Sample this round's prompts (seeded by round) and their responses from the rollout server."""
    rng = np.random.default_rng([cfg.seed, round_index])
    count = min(cfg.rollout.rollout_batch_size, len(prompt_ids))
    chosen = rng.choice(len(prompt_ids), size=count, replace=False)
    n = cfg.rollout.n_samples_per_prompt
    rows = [int(i) for i in chosen for _ in range(n)]
    responses = client.generate(
        [prompt_ids[i] for i in rows],
        {
            "max_new_tokens": cfg.rollout.rollout_max_response_len,
            "temperature": cfg.rollout.rollout_temperature,
            "top_p": cfg.rollout.rollout_top_p,
            "top_k": cfg.rollout.rollout_top_k,
            "sampling_seed": int(rng.integers(2**31)),  # SGLang's name; sample i gets seed + i
        },
        return_logprob=True,
        progress=f"round {round_index} rollout",
    )
    labels = prompts.column("label").to_pylist()
    messages = prompts.column("prompt").to_pylist()
    indices = prompts.column("index").to_pylist()
    out = {
        k: []
        for k in (
            "prompt_index",
            "sample_index",
            "prompt_ids",
            "response_ids",
            "response_text",
            "rollout_logprobs",
            "finish_reason",
            "label",
            "correct",
            "samples",
        )
    }
    for position, (row, response) in enumerate(zip(rows, responses)):
        response_ids = list(response["output_ids"])
        text = tokenizer.decode(response_ids, skip_special_tokens=True)
        logprobs = [entry[0] for entry in response["meta_info"].get("output_token_logprobs") or []]
        out["prompt_index"].append(indices[row])
        out["sample_index"].append(position % n)
        out["prompt_ids"].append(prompt_ids[row])
        out["response_ids"].append(response_ids)
        out["response_text"].append(text)
        out["rollout_logprobs"].append(logprobs)
        out["finish_reason"].append(response["meta_info"]["finish_reason"]["type"])
        out["label"].append(labels[row])
        out["correct"].append(is_correct(text, labels[row]))
        out["samples"].append(
            {
                "prompt": messages[row],
                "response_text": text,
                "label": labels[row],
                "response_ids": response_ids,
            }
        )
    return out


def _rollouts_table(round_index: int, rollouts: dict, rewards: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "round": [round_index] * len(rewards),
            "prompt_index": rollouts["prompt_index"],
            "sample_index": rollouts["sample_index"],
            "prompt_ids": rollouts["prompt_ids"],
            "response_ids": rollouts["response_ids"],
            "response_text": rollouts["response_text"],
            "rollout_logprobs": rollouts["rollout_logprobs"],
            "finish_reason": rollouts["finish_reason"],
            "label": rollouts["label"],
            "reward": rewards,
            "correct": rollouts["correct"],
        }
    )
