"""Evaluation of a model on prompts: greedy pass@1 and sampled pass@k with the math verifier.

    prompt_ids = chat_prompt_ids(tokenizer, prompts)           # the ONE place prompts become ids
    samples, summary = evaluate(generator.generate, tokenizer, prompts, cfg.eval, seed=0)
    write_eval(run_dir.stage("baseline_eval"), samples, summary)

`generate(input_ids_batch, sampling_params)` returns one SGLang-shaped response dict per
prompt (`{"text", "output_ids", "meta_info": {...}}`), so the same code evaluates through an
in-process engine or over HTTP against any SGLang-protocol server.

pass@1 is the accuracy of one greedy (temperature 0) sample per prompt. pass@k draws k
samples per prompt at `cfg.temperature` and uses the unbiased estimator of Chen et al. (2021),
1 - C(n-c, k) / C(n, k) with n samples of which c are correct (here n = k).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from opd_core.config import EvalConfig
from opd_core.io import write_arrow, write_json
from opd_core.schemas import EVAL_SAMPLES
from opd_core.verifier import extract_answer, is_correct

__all__ = ["GenerateFn", "chat_prompt_ids", "evaluate", "pass_at_k", "write_eval"]

GenerateFn = Callable[[list[list[int]], dict[str, Any]], list[dict[str, Any]]]


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: pa.Table | Sequence[list[dict]]
) -> list[list[int]]:
    """Token ids of each prompt: the chat template with the assistant turn opened.

    Takes a PROMPTS table or a list of message lists. The template itself writes every
    special token, so the tokenizer must not add its own (BOS etc.) on top.
    """
    messages = (
        prompts.column("prompt").to_pylist() if isinstance(prompts, pa.Table) else list(prompts)
    )
    texts = [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        for m in messages
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimate from `num_samples` samples of which `num_correct` are right."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(
            f"pass_at_k: need 0 <= num_correct ({num_correct}) <= num_samples ({num_samples})"
        )
    if k > num_samples:
        raise ValueError(f"pass_at_k: k={k} is larger than the {num_samples} samples drawn")
    if num_samples - num_correct < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def _generate_in_batches(
    generate: GenerateFn, prompt_ids: list[list[int]], params: dict[str, Any], batch_size: int
) -> list[dict[str, Any]]:
    responses: list[dict[str, Any]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        chunk_params = dict(params)
        if params.get("sampling_seed") is not None:
            # A call-wide seed gives sequence i seed + i (SGLang-protocol rule): offset each
            # batch so no two sampled sequences of the evaluation share a seed.
            chunk_params["sampling_seed"] = params["sampling_seed"] + start
        out = generate(chunk, chunk_params)
        if len(out) != len(chunk):
            raise RuntimeError(
                f"generate returned {len(out)} responses for a batch of {len(chunk)} prompts"
            )
        responses.extend(out)
    return responses


def evaluate(
    generate: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pa.Table,
    cfg: EvalConfig,
    seed: int = 0,
    batch_size: int = 256,
) -> tuple[pa.Table, dict[str, Any]]:
    """Greedy pass@1 and sampled pass@k of `generate` on `prompts` (a PROMPTS table).

    Returns (samples, summary): one EVAL_SAMPLES row per generated response (the greedy one
    has sample_index 0 and greedy=True; sampled ones follow), and the summary dict.
    """
    started = time.perf_counter()
    if cfg.num_prompts is not None:
        prompts = prompts.slice(0, cfg.num_prompts)
    if prompts.num_rows == 0:
        raise ValueError("evaluate: no prompts to evaluate (empty eval split)")
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    indices = prompts.column("index").to_pylist()
    labels = prompts.column("label").to_pylist()
    base = {"max_new_tokens": cfg.max_new_tokens, "skip_special_tokens": True}

    greedy = _generate_in_batches(generate, prompt_ids, {**base, "temperature": 0.0}, batch_size)
    # k samples per prompt in one request list: prompt i repeated k times, consecutively.
    repeated = [ids for ids in prompt_ids for _ in range(cfg.k)]
    sampled_params = {
        **base,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "sampling_seed": seed,
    }
    sampled = _generate_in_batches(generate, repeated, sampled_params, batch_size)

    rows: dict[str, list] = {name: [] for name in EVAL_SAMPLES.names}

    def add(prompt_index: int, sample_index: int, is_greedy: bool, text: str, label: str) -> bool:
        correct = is_correct(text, label)
        rows["prompt_index"].append(prompt_index)
        rows["sample_index"].append(sample_index)
        rows["greedy"].append(is_greedy)
        rows["response_text"].append(text)
        rows["predicted"].append(extract_answer(text))
        rows["label"].append(label)
        rows["correct"].append(correct)
        return correct

    greedy_correct = 0
    pass_k_total = 0.0
    sampled_correct = 0
    for i, (prompt_index, label) in enumerate(zip(indices, labels)):
        greedy_correct += add(prompt_index, 0, True, greedy[i]["text"], label)
        correct_here = 0
        for j in range(cfg.k):
            correct_here += add(prompt_index, j + 1, False, sampled[i * cfg.k + j]["text"], label)
        sampled_correct += correct_here
        pass_k_total += pass_at_k(cfg.k, correct_here, cfg.k)

    num_prompts = len(indices)
    summary = {
        "pass_at_1": greedy_correct / num_prompts,
        "pass_at_k": pass_k_total / num_prompts,
        "k": cfg.k,
        "num_prompts": num_prompts,
        "num_samples": len(rows["prompt_index"]),
        "mean_sample_accuracy": sampled_correct / (num_prompts * cfg.k),
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
        "seconds": time.perf_counter() - started,
    }
    return pa.Table.from_pydict(rows, schema=EVAL_SAMPLES), summary


def write_eval(out_dir: str | Path, samples: pa.Table, summary: dict[str, Any]) -> Path:
    """Write `samples.arrow` and `summary.json` atomically into `out_dir`."""
    out_dir = Path(out_dir)
    write_arrow(out_dir / "samples.arrow", samples, EVAL_SAMPLES)
    write_json(out_dir / "summary.json", summary)
    return out_dir
