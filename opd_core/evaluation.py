"""Evaluation as the field reports it: avg@n, unbiased pass@k, greedy pass@1, per benchmark.

    prompt_ids = chat_prompt_ids(tokenizer, prompts, chat_template_kwargs)   # THE rendering
    samples, summary = evaluate(generate, tokenizer, prompts, settings, seed=0,
                                context_length=generator.context_length)
    samples, summary = evaluate_benchmarks(generate, tokenizer, eval_prompts, cfg.eval, ...)
    write_eval(run_dir.stage("baseline_eval"), samples, summary)

`generate(input_ids_batch, sampling_params)` returns one SGLang-shaped response dict per
prompt (`{"text", "output_ids", "meta_info": {...}}`); `sampling_params` is one dict for the
batch or one per sequence. So the same code evaluates through an in-process engine or over
HTTP against any SGLang-protocol server.

Per prompt: `n_samples` responses at the configured temperature / top-p / top-k, and (with
`greedy`) one temperature-0 response. Reported per benchmark:

- avg@n: the mean accuracy over all sampled responses (what slime's eval and Thinking Machines'
  "AIME, mean of 32 samples" report);
- pass@k for each k in `pass_k`: the unbiased estimator of Chen et al. (2021),
  1 - C(n-c, k) / C(n, k), averaged over prompts;
- pass@1 (greedy), as its own number;
- the mean response length in tokens, the share of responses cut at max_new_tokens
  (finish_reason `length`) and the share with no extractable answer;
- the same accuracy numbers per value of each of the benchmark's group fields (MATH-500:
  subject, level).

A prompt's max_new_tokens is capped so that prompt + max_new_tokens fits the model's context
(SGLang answers 400 otherwise); capped prompts are counted.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from opd_core.config import EvalConfig, EvalSettings
from opd_core.io import write_arrow, write_json, write_text
from opd_core.report import eval_markdown
from opd_core.schemas import EVAL_SAMPLES
from opd_core.verifier import extract_answer, is_correct

__all__ = [
    "GenerateFn",
    "chat_prompt_ids",
    "evaluate",
    "evaluate_benchmarks",
    "pass_at_k",
    "write_eval",
]

GenerateFn = Callable[[list[list[int]], dict[str, Any] | list[dict[str, Any]]], list[dict]]
_DIGITS = re.compile(r"(\d+)")


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompts: pa.Table | Sequence[list[dict]],
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Token ids of each prompt: the chat template with the assistant turn opened.

    Takes a table with a `prompt` column or a list of message lists. `chat_template_kwargs`
    (`data.chat_template_kwargs`, e.g. {"enable_thinking": True}) go to the template: every
    place a prompt is rendered calls this, so rollouts, evals and the teacher's view agree.
    The template writes every special token, so the tokenizer must not add its own on top.
    """
    messages = (
        prompts.column("prompt").to_pylist() if isinstance(prompts, pa.Table) else list(prompts)
    )
    kwargs = chat_template_kwargs or {}
    texts = [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False, **kwargs)
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
    generate: GenerateFn,
    prompt_ids: list[list[int]],
    params: dict[str, Any],
    caps: list[int],
    batch_size: int,
) -> list[dict[str, Any]]:
    """All responses, `batch_size` sequences per call. Sequence i is sampled with seed + i (the
    SGLang-protocol rule for a call-wide seed), so no two sequences share a seed however the
    calls are cut; a sequence whose cap is below max_new_tokens gets its own params."""
    responses: list[dict[str, Any]] = []
    seed = params.get("sampling_seed")
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        chunk_caps = caps[start : start + batch_size]
        if all(cap == params["max_new_tokens"] for cap in chunk_caps):
            chunk_params: dict | list[dict] = dict(params)
            if seed is not None:
                chunk_params["sampling_seed"] = seed + start
        else:
            chunk_params = [
                {
                    **params,
                    "max_new_tokens": cap,
                    **({"sampling_seed": seed + start + i} if seed is not None else {}),
                }
                for i, cap in enumerate(chunk_caps)
            ]
        out = generate(chunk, chunk_params)
        if len(out) != len(chunk):
            raise RuntimeError(
                f"generate returned {len(out)} responses for a batch of {len(chunk)} prompts"
            )
        responses.extend(out)
    return responses


def _token_caps(
    prompt_ids: list[list[int]], indices: list[int], max_new_tokens: int, context_length: int | None
) -> list[int]:
    if context_length is None:
        return [max_new_tokens] * len(prompt_ids)
    caps = []
    for ids, index in zip(prompt_ids, indices):
        room = context_length - len(ids)
        if room < 1:
            raise ValueError(
                f"evaluate: prompt {index} has {len(ids)} tokens, no room for an answer in the "
                f"model's context of {context_length} (the download stage's pre-flight check "
                "drops or rejects such prompts: rerun it)"
            )
        caps.append(min(max_new_tokens, room))
    return caps


def _response_tokens(response: dict[str, Any]) -> int:
    ids = response.get("output_ids")
    if ids is not None:
        return len(ids)
    return int((response.get("meta_info") or {}).get("completion_tokens", 0))


def _finish_reason(response: dict[str, Any]) -> str | None:
    reason = (response.get("meta_info") or {}).get("finish_reason")
    return reason.get("type") if isinstance(reason, dict) else reason


def evaluate(
    generate: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pa.Table,
    cfg: EvalSettings,
    seed: int = 0,
    batch_size: int = 256,
    context_length: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    benchmark: str = "eval",
) -> tuple[pa.Table, dict[str, Any]]:
    """avg@n, pass@k and greedy pass@1 of `generate` on `prompts` (index, prompt, label, and
    optionally tags) under `cfg` (EvalSettings, or an EvalConfig for its defaults).

    Returns (samples, summary): one EVAL_SAMPLES row per response (per prompt the greedy one
    first, sample_index 0, then the sampled ones 1..n), and the summary dict.
    """
    started = time.perf_counter()
    if cfg.num_prompts is not None:
        prompts = prompts.slice(0, cfg.num_prompts)
    if prompts.num_rows == 0:
        raise ValueError(f"evaluate: no prompts to evaluate (benchmark {benchmark!r} is empty)")
    prompt_ids = chat_prompt_ids(tokenizer, prompts, chat_template_kwargs)
    indices = prompts.column("index").to_pylist()
    labels = prompts.column("label").to_pylist()
    tags = (
        [dict(t) for t in prompts.column("tags").to_pylist()]
        if "tags" in prompts.column_names
        else [{} for _ in indices]
    )
    n = cfg.n_samples
    caps = _token_caps(prompt_ids, indices, cfg.max_new_tokens, context_length)
    base = {"max_new_tokens": cfg.max_new_tokens, "skip_special_tokens": True}

    greedy = (
        _generate_in_batches(generate, prompt_ids, {**base, "temperature": 0.0}, caps, batch_size)
        if cfg.greedy
        else []
    )
    # n samples per prompt in one request list: prompt i repeated n times, consecutively.
    repeated = [ids for ids in prompt_ids for _ in range(n)]
    sampled_params = {
        **base,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        **({"top_k": cfg.top_k} if cfg.top_k != -1 else {}),
        "sampling_seed": seed,
    }
    sampled = _generate_in_batches(
        generate, repeated, sampled_params, [c for c in caps for _ in range(n)], batch_size
    )

    rows: dict[str, list] = {name: [] for name in EVAL_SAMPLES.names}

    def add(i: int, sample_index: int, response: dict[str, Any]) -> bool:
        text = response["text"]
        correct = is_correct(text, labels[i])
        rows["prompt_index"].append(indices[i])
        rows["sample_index"].append(sample_index)
        rows["greedy"].append(sample_index == 0)
        rows["response_text"].append(text)
        rows["predicted"].append(extract_answer(text))
        rows["label"].append(labels[i])
        rows["correct"].append(correct)
        rows["benchmark"].append(benchmark)
        rows["response_tokens"].append(_response_tokens(response))
        rows["finish_reason"].append(_finish_reason(response))
        return correct

    per_prompt = []  # (greedy correct or None, correct count of the n samples, tags)
    for i in range(len(indices)):
        greedy_right = add(i, 0, greedy[i]) if cfg.greedy else None
        right = sum(add(i, j + 1, sampled[i * n + j]) for j in range(n))
        per_prompt.append((greedy_right, right, tags[i]))

    sampled_rows = [j for j, g in enumerate(rows["greedy"]) if not g]
    summary = {
        "benchmark": benchmark,
        **_accuracy(per_prompt, n, cfg.ks, cfg.greedy),
        "num_samples": len(rows["prompt_index"]),
        "n_samples": n,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens,
        "capped_prompts": sum(cap < cfg.max_new_tokens for cap in caps),
        # Over the sampled responses, the ones the accuracy numbers average.
        "response_tokens_mean": _mean([rows["response_tokens"][j] for j in sampled_rows]),
        "truncated_share": _mean([rows["finish_reason"][j] == "length" for j in sampled_rows]),
        "no_answer_share": _mean([rows["predicted"][j] is None for j in sampled_rows]),
        "by_group": _by_group(per_prompt, n, cfg.ks, cfg.greedy),
        "seconds": time.perf_counter() - started,
    }
    return pa.Table.from_pydict(rows, schema=EVAL_SAMPLES), summary


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def _accuracy(per_prompt: list, n: int, ks: list[int], with_greedy: bool) -> dict[str, Any]:
    """The accuracy numbers of a group of prompts. `pass_at_1`, `pass_at_k` and `k` are the
    headline (and backward-compatible) keys: pass@1 is the greedy one when there is one, else
    the sampled estimate (= avg@n); pass_at_k is pass@k for the largest k."""
    count = len(per_prompt)
    pass_at = {str(k): sum(pass_at_k(n, c, k) for _, c, _ in per_prompt) / count for k in ks}
    avg_at_n = sum(c for _, c, _ in per_prompt) / (count * n)
    greedy = sum(bool(g) for g, _, _ in per_prompt) / count if with_greedy else None
    return {
        "pass_at_1": greedy if with_greedy else pass_at.get("1", avg_at_n),
        "pass_at_1_kind": "greedy" if with_greedy else f"mean of {n} samples",
        "greedy_pass_at_1": greedy,
        "avg_at_n": avg_at_n,
        "mean_sample_accuracy": avg_at_n,  # the name earlier summaries used for avg@n
        "pass_at": pass_at,
        "k": max(ks),
        "pass_at_k": pass_at[str(max(ks))],
        "num_prompts": count,
    }


def _by_group(per_prompt: list, n: int, ks: list[int], with_greedy: bool) -> dict[str, Any]:
    """{group field: {value: accuracy numbers}} for every tag the prompts carry."""
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for entry in per_prompt:
        for key, value in entry[2].items():
            groups[key][value].append(entry)
    return {
        key: {
            value: _accuracy(entries, n, ks, with_greedy)
            for value, entries in sorted(values.items(), key=lambda kv: _natural(kv[0]))
        }
        for key, values in groups.items()
    }


def _natural(value: str) -> tuple:
    """Sort "Level 2" before "Level 10" and numbers as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in _DIGITS.split(value))


def evaluate_benchmarks(
    generate: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    prompts: pa.Table,
    cfg: EvalConfig,
    seed: int = 0,
    batch_size: int = 256,
    context_length: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Every benchmark of `cfg.benchmarks` on its rows of `prompts` (an EVAL_PROMPTS table).

    The summary holds each benchmark's summary under `benchmarks` (in config order) and, at
    the top level, the first benchmark's numbers (pass_at_1, pass_at_k, k, num_prompts,
    mean_sample_accuracy, ...), which is what single-benchmark readers expect.
    """
    started = time.perf_counter()
    names = prompts.column("benchmark").to_pylist()
    all_samples, summaries = [], {}
    for bench in cfg.benchmarks:
        rows = [i for i, name in enumerate(names) if name == bench.name]
        if not rows:
            raise ValueError(
                f"evaluate: the eval data has no rows of benchmark {bench.name!r} (it has "
                f"{sorted(set(names))}): rerun the download stage"
            )
        samples, summary = evaluate(
            generate,
            tokenizer,
            prompts.take(rows),
            cfg.settings_for(bench),
            seed=seed,
            batch_size=batch_size,
            context_length=context_length,
            chat_template_kwargs=chat_template_kwargs,
            benchmark=bench.name,
        )
        all_samples.append(samples)
        summaries[bench.name] = summary
    first = summaries[cfg.benchmarks[0].name]
    summary = {
        **{key: value for key, value in first.items() if key != "by_group"},
        "benchmarks": summaries,
        "seconds": time.perf_counter() - started,
    }
    return pa.concat_tables(all_samples), summary


def write_eval(out_dir: str | Path, samples: pa.Table, summary: dict[str, Any]) -> Path:
    """Write `samples.arrow`, `summary.json` and `summary.md` (the per-benchmark table)
    atomically into `out_dir`."""
    out_dir = Path(out_dir)
    write_arrow(out_dir / "samples.arrow", samples, EVAL_SAMPLES)
    write_json(out_dir / "summary.json", summary)
    write_text(out_dir / "summary.md", eval_markdown(summary))
    return out_dir
