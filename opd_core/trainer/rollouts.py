"""A round's rollouts: the prompts it samples and the student's responses, as rows.

    rollouts = generate_rollouts(cfg, round_index, prompts, prompt_ids, client, tokenizer,
                                 context_length=40960, weight_version="3", max_total_tokens=None)
    write_arrow(round_dir / "rollouts.arrow", rollouts.table(round_index, rewards), ROLLOUTS)

With `on_batch(start, part)` each client batch's rows (a `Rollouts` of the samples at
start, start + 1, ...) are handed on as soon as they are generated, e.g. to the teacher
(streamed scoring, `opd_core.trainer.streaming`); the returned rollouts are the same rows in
the same order either way, each exactly once.

Needs only an `EngineClient` (no Ray): the round loop and scripts/gpu_check.py both use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from opd_core.algorithm.batch import TrainBatch
from opd_core.config import OPDRunConfig
from opd_core.engine.client import EngineClient
from opd_core.engine.protocol import per_sequence_params
from opd_core.trainer.pieces import Pieces
from opd_core.verifier import is_correct

__all__ = ["Rollouts", "generate_rollouts", "round_draw"]


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
    weight_version: list[str] = field(default_factory=list)
    # What reward functions see, one dict per sample (prompt messages, text, label, ids).
    samples: list[dict] = field(default_factory=list)

    def table(self, round_index: int, rewards: np.ndarray) -> pa.Table:
        """Rows of `rollouts.arrow` (opd_core.schemas.ROLLOUTS)."""
        columns = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "samples"}
        return pa.table({"round": [round_index] * len(rewards), **columns, "reward": rewards})

    def batch(self) -> TrainBatch:
        return TrainBatch(prompt_ids=self.prompt_ids, response_ids=self.response_ids)

    def __len__(self) -> int:
        return len(self.prompt_index)

    @classmethod
    def concat(cls, parts: list[Rollouts]) -> Rollouts:
        """The rows of `parts`, one after the other."""
        out = cls()
        for part in parts:
            for f in fields(cls):
                getattr(out, f.name).extend(getattr(part, f.name))
        return out


def round_draw(cfg: OPDRunConfig, round_index: int, num_prompts: int) -> tuple[list[int], int]:
    """Round `round_index`'s draw from `num_prompts` train prompts: the prompt rows in request
    order (each `n_samples_per_prompt` times, consecutively) and the round's sampling seed.
    Seeded by (seed, round), so a resumed run, or another trainer fed the same rows
    (benchmarks/peer_trl.py), sees the same prompts."""
    rollout = cfg.rollout
    rng = np.random.default_rng([cfg.seed, round_index])
    count = min(rollout.rollout_batch_size, num_prompts)
    chosen = rng.choice(num_prompts, size=count, replace=False)
    rows = [int(i) for i in chosen for _ in range(rollout.n_samples_per_prompt)]
    return rows, int(rng.integers(2**31))


def generate_rollouts(
    cfg: OPDRunConfig,
    round_index: int,
    prompts: pa.Table,
    prompt_ids: list[list[int]],
    client: EngineClient,
    tokenizer: PreTrainedTokenizerBase,
    context_length: int | None = None,
    weight_version: str | None = None,
    max_total_tokens: int | None = None,
    on_batch: Callable[[int, Rollouts], None] | None = None,
) -> Rollouts:
    """A round's prompts (seeded by round) and their responses from the engines at `client`.

    `context_length`: the student's; each request's max_new_tokens is capped to fit it.
    `max_total_tokens`: the longest prompt + response the teacher scores; responses are capped
    to stay within it too.
    `weight_version`: what the engines were set to, recorded where a response does not say
    (real SGLang reports it per response in meta_info, the built-in engine does not).
    `on_batch(start, part)`: each client batch's rows as they arrive (module docstring)."""
    rollout = cfg.rollout
    rows, seed = round_draw(cfg, round_index, len(prompt_ids))
    params = {
        "max_new_tokens": rollout.rollout_max_response_len,
        "temperature": rollout.rollout_temperature,
        "top_p": rollout.rollout_top_p,
        "top_k": rollout.rollout_top_k,
    }
    # Only engines started with --enable-deterministic-inference honour a seed. Without one
    # the samples share their params, so a router takes them as batches (see EngineClient).
    if rollout.enable_deterministic_inference:
        params["sampling_seed"] = seed  # SGLang's name; sample i gets seed + i
    sampling = per_sequence_params(params, len(rows))  # a seed: sample i gets seed + i
    if max_total_tokens is not None:  # room left for the response in what the teacher scores
        budgets = [max(0, max_total_tokens - len(prompt_ids[i])) for i in rows]
        if any(b < rollout.rollout_max_response_len for b in budgets):
            shared = sampling if isinstance(sampling, list) else [sampling] * len(rows)
            sampling = [
                {**p, "max_new_tokens": min(p["max_new_tokens"], b)}
                for p, b in zip(shared, budgets)
            ]
    labels = prompts.column("label").to_pylist()
    messages = prompts.column("prompt").to_pylist()
    indices = prompts.column("index").to_pylist()

    def rows_of(start: int, responses: list[dict]) -> Rollouts:
        """The rows of the samples at positions start, start + 1, ..."""
        out = Rollouts()
        for position, response in enumerate(responses, start):
            row = rows[position]
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
            version = meta.get("weight_version") or weight_version or "default"
            out.weight_version.append(str(version))
            out.samples.append(
                {
                    "prompt": messages[row],
                    "response_text": text,
                    "label": labels[row],
                    "response_ids": response_ids,
                }
            )
        return out

    pieces: Pieces[Rollouts] = Pieces(f"round {round_index} rollouts")

    def deliver(start: int, responses: list[dict]) -> None:
        part = rows_of(start, responses)
        pieces.add(start, len(part), part)
        on_batch(start, part)

    responses = client.generate(
        [prompt_ids[i] for i in rows],
        sampling,
        return_logprob=True,
        progress=f"round {round_index} rollout",
        context_length=context_length,
        on_batch=None if on_batch is None else deliver,
    )
    if on_batch is None:
        return rows_of(0, responses)
    return Rollouts.concat(pieces.ordered(len(rows)))
