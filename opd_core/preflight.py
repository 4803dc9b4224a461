"""The pre-flight check: student and teacher fit together, and every prompt fits the context.

    train, evals, report = run_preflight(cfg, student_dir, teacher_dir, train, evals, sources)

Run by the download stage, before any server starts or GPU time is spent. In sglang teacher
mode the teacher scores the student's token ids as they are, so any difference in how the two
tokenize or render a prompt silently corrupts every teacher log-prob. Checked:

- tokenizers: the same ids for the same text, on a probe set of the DAPO instruction, every
  special token of either model, the data's own chat-rendered prompts and some LaTeX/unicode
  text (`tokenizer`); the same added special tokens (`special_tokens`); the same eos and pad
  (`eos_pad`);
- the chat template: the same rendered text for the probe prompts, with
  `data.chat_template_kwargs` (`chat_template`);
- embedding rows: every real token id fits each model's embedding (padded vocabularies of
  different sizes are fine, e.g. Qwen2.5-7B's 152,064 rows and 0.5B's 151,936);
- context: each train prompt leaves room for a response in an input both models' SGLang
  servers accept (shorter than max_req_input_len = context - 6: the teacher scores prompt +
  response as one input; `protocol.ContextLimits`), each eval prompt leaves room for an
  answer. Prompts with less room than `rollout.rollout_max_response_len` are counted as
  `capped`: their rollouts get fewer new tokens. `rollout.rollout_max_prompt_len` (slime's
  flag) drops longer train prompts; `preflight.drop_overlong_prompts` drops those that cannot
  fit instead of failing. Dropped prompts are counted in the report (download/manifest.json).

Every mismatch found is listed in one PreflightError naming both models and the difference;
`preflight.allow` accepts named differences known to be safe. The teacher is only checked when
`algorithm.use_opd` is on (otherwise there is none).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opd_core.config import OPDRunConfig
from opd_core.datasets import DAPO_TEMPLATE, apply_template
from opd_core.engine.protocol import ContextLimits
from opd_core.errors import NotRetryable
from opd_core.evaluation import chat_prompt_ids

logger = logging.getLogger("opd.preflight")

__all__ = ["ModelInfo", "PreflightError", "check_models", "fit_prompts", "run_preflight"]

# Text every tokenizer pair is compared on, besides the data's own prompts and special tokens.
PROBE_TEXTS = (
    apply_template("dapo", "Find $x$ if $2x + 3 = 11$."),
    DAPO_TEMPLATE,
    "Answer: \\boxed{\\frac{14}{3}}\nAnswer: \\left( 3, \\frac{\\pi}{2} \\right)",
    "1234567890 3.14159 -42 1,234,567 10^{10} 0.5",
    "∫ x² dx = ⅓x³ + C — café, naïve, 数学, 🙂",
    "  leading spaces\n\n\ttabs and\r\nnewlines  ",
    "<think>\nLet me think.\n</think>\n\nAnswer: 7",
)
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are a careful mathematician."},
        {"role": "user", "content": apply_template("dapo", "What is 3 + 4?")},
    ],
)
MAX_LISTED = 5  # over-long prompts named in an error


class PreflightError(NotRetryable, ValueError):
    """Student and teacher do not fit together, or a prompt does not fit the context."""


@dataclass
class ModelInfo:
    """What the check reads of one model dir (no weights are loaded)."""

    role: str  # student | teacher
    source: str  # as the config names it: hf:Qwen/Qwen3-8B, toy, a path
    path: Path
    tokenizer: PreTrainedTokenizerBase
    context_length: int
    embedding_rows: int

    @classmethod
    def load(cls, role: str, source: str, path: str | Path) -> ModelInfo:
        path = Path(path)
        config = json.loads((path / "config.json").read_text())
        config = config.get("text_config", config)  # multimodal configs nest the LM's
        context = next(
            (config[k] for k in ("max_position_embeddings", "max_sequence_length") if k in config),
            None,
        )
        if context is None or "vocab_size" not in config:
            raise PreflightError(
                f"{role} {source}: {path / 'config.json'} has no max_position_embeddings / "
                "vocab_size"
            )
        return cls(
            role,
            source,
            path,
            AutoTokenizer.from_pretrained(path),
            int(context),
            int(config["vocab_size"]),
        )

    @property
    def name(self) -> str:
        return f"{self.role} {self.source}"


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], kwargs: dict) -> str | None:
    if not tokenizer.chat_template:
        return None
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **kwargs
    )


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _snippet(text: str, at: int = 0, width: int = 40) -> str:
    return repr(text[max(0, at - width // 2) : at + width // 2])


def check_models(
    student: ModelInfo,
    teacher: ModelInfo | None,
    probe_prompts: list[list[dict]],
    chat_template_kwargs: dict[str, Any],
) -> tuple[dict[str, str], dict[str, Any]]:
    """({kind: message} of every mismatch, facts for the report). Kinds: tokenizer,
    special_tokens, eos_pad, chat_template, embedding."""
    problems: dict[str, str] = {}
    s_tok = student.tokenizer
    if not s_tok.chat_template:
        problems["chat_template"] = f"{student.name} has no chat template"
    facts: dict[str, Any] = {
        "student": {
            "tokens": len(s_tok),
            "embedding_rows": student.embedding_rows,
            "context_length": student.context_length,
        }
    }
    models = [student] if teacher is None else [student, teacher]
    for model in models:
        if len(model.tokenizer) > model.embedding_rows:
            problems[f"embedding_{model.role}"] = (
                f"{model.name}: the tokenizer has {len(model.tokenizer)} tokens but the "
                f"embedding only {model.embedding_rows} rows (token ids >= "
                f"{model.embedding_rows} would index past it)"
            )
    if teacher is None:
        return problems, facts
    t_tok = teacher.tokenizer
    facts["teacher"] = {
        "tokens": len(t_tok),
        "embedding_rows": teacher.embedding_rows,
        "context_length": teacher.context_length,
    }
    if len(s_tok) > teacher.embedding_rows:
        problems["embedding"] = (
            f"{student.name} can emit token ids up to {len(s_tok) - 1}, but {teacher.name}'s "
            f"embedding has only {teacher.embedding_rows} rows: it cannot score them"
        )
    elif student.embedding_rows != teacher.embedding_rows:
        facts["vocab_padding"] = (
            f"embedding rows differ (student {student.embedding_rows}, teacher "
            f"{teacher.embedding_rows}); every real token id (< {len(s_tok)}) fits both"
        )

    s_special, t_special = _special_tokens(s_tok), _special_tokens(t_tok)
    if s_special != t_special:
        only_s = sorted(set(s_special) - set(t_special))
        only_t = sorted(set(t_special) - set(s_special))
        moved = sorted(k for k in set(s_special) & set(t_special) if s_special[k] != t_special[k])
        parts = [
            f"only the student has {only_s[:5]}" if only_s else "",
            f"only the teacher has {only_t[:5]}" if only_t else "",
            f"different ids for {moved[:5]}" if moved else "",
        ]
        problems["special_tokens"] = "added special tokens differ: " + "; ".join(
            p for p in parts if p
        )

    for what in ("eos", "pad"):
        s_id, t_id = getattr(s_tok, f"{what}_token_id"), getattr(t_tok, f"{what}_token_id")
        if s_id != t_id:
            problems.setdefault("eos_pad", "")
            problems["eos_pad"] += (
                f"{what} token differs: student {getattr(s_tok, f'{what}_token')!r} (id {s_id}), "
                f"teacher {getattr(t_tok, f'{what}_token')!r} (id {t_id}); "
            )

    conversations = [*PROBE_CONVERSATIONS, *probe_prompts]
    renders = []
    for messages in conversations:
        s_text = _render(s_tok, messages, chat_template_kwargs)
        t_text = _render(t_tok, messages, chat_template_kwargs)
        if s_text is not None:
            renders.append(s_text)
        if s_text is not None and s_text != t_text and "chat_template" not in problems:
            if t_text is None:
                problems["chat_template"] = f"{teacher.name} has no chat template"
            else:
                at = next(
                    (i for i, (x, y) in enumerate(zip(s_text, t_text)) if x != y),
                    min(len(s_text), len(t_text)),
                )
                problems["chat_template"] = (
                    f"the same messages render differently (with chat_template_kwargs "
                    f"{chat_template_kwargs}), from character {at}: student "
                    f"{_snippet(s_text, at)} vs teacher {_snippet(t_text, at)}"
                )

    texts = [*PROBE_TEXTS, "".join(sorted({*s_special, *t_special})), *renders]
    for text in texts:
        s_ids = s_tok(text, add_special_tokens=False)["input_ids"]
        t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
        if s_ids != t_ids:
            i = _first_difference(s_ids, t_ids)
            problems["tokenizer"] = (
                f"the same text gets different token ids ({len(s_ids)} vs {len(t_ids)} tokens), "
                f"from token {i}: student {s_tok.convert_ids_to_tokens(s_ids[i : i + 3])} vs "
                f"teacher {t_tok.convert_ids_to_tokens(t_ids[i : i + 3])}, in {_snippet(text)}"
            )
            break
    facts["probe_texts"] = len(texts)
    return problems, facts


def fit_prompts(
    cfg: OPDRunConfig,
    student: ModelInfo,
    teacher: ModelInfo | None,
    train: pa.Table,
    evals: dict[str, pa.Table],
    sources: dict[str, str],
) -> tuple[pa.Table, dict[str, pa.Table], dict[str, Any]]:
    """Drop or reject prompts that cannot fit; returns the kept tables and what happened."""
    kwargs = cfg.data.chat_template_kwargs
    tokenizer = student.tokenizer
    response_len = cfg.rollout.rollout_max_response_len
    contexts = [student] if teacher is None else [student, teacher]
    train_context = min(m.context_length for m in contexts)
    # Prompt + response is scored as one input: it must stay under SGLang's max_req_input_len.
    # Longer prompts than `budget` still train, with their rollouts' max_new_tokens capped.
    input_limit = ContextLimits(train_context).max_prompt_tokens
    budget = input_limit - response_len
    if budget < 1:
        raise PreflightError(
            f"rollout.rollout_max_response_len ({response_len}) leaves no room for a prompt in "
            f"the context of {min(contexts, key=lambda m: m.context_length).name} "
            f"({train_context} tokens)"
        )
    report: dict[str, Any] = {"train_context": train_context, "prompt_budget": budget}

    lengths = [len(ids) for ids in chat_prompt_ids(tokenizer, train, kwargs)]
    keep = [True] * len(lengths)
    limit = cfg.rollout.rollout_max_prompt_len
    if limit is not None:
        keep = [n <= limit for n in lengths]
    over = [i for i, n in enumerate(lengths) if keep[i] and n >= input_limit]
    _reject_or_drop(
        cfg,
        over,
        train,
        lengths,
        sources["train"],
        f">= {input_limit} tokens (no room for a response in what an SGLang server with "
        f"context {train_context} accepts as input)",
    )
    for i in over:
        keep[i] = False
    report["train"] = {
        "longest_prompt": max(lengths),
        "dropped_over_rollout_max_prompt_len": sum(
            1 for n in lengths if limit is not None and n > limit
        ),
        "dropped_over_context": len(over),
        # Rollouts cap max_new_tokens below rollout_max_response_len for these.
        "capped": sum(1 for i, n in enumerate(lengths) if keep[i] and n > budget),
        "kept": sum(keep),
    }
    if report["train"]["capped"]:
        logger.warning(
            "%s: %d train prompt(s) longer than %d tokens: their rollouts get fewer than "
            "rollout.rollout_max_response_len (%d) new tokens, so that prompt + response stays "
            "within what an SGLang server with context %d scores (drop them with "
            "rollout.rollout_max_prompt_len=%d)",
            sources["train"],
            report["train"]["capped"],
            budget,
            response_len,
            train_context,
            budget,
        )
    if not any(keep):
        raise PreflightError(f"{sources['train']}: every train prompt was dropped ({report})")
    train = train.filter(pa.array(keep))

    report["eval"] = {}
    kept_evals = {}
    for name, table in evals.items():
        lengths = [len(ids) for ids in chat_prompt_ids(tokenizer, table, kwargs)]
        over = [i for i, n in enumerate(lengths) if n >= student.context_length]
        _reject_or_drop(
            cfg,
            over,
            table,
            lengths,
            sources[name],
            f">= context {student.context_length} (no room for an answer)",
        )
        bench = next(b for b in cfg.eval.benchmarks if b.name == name)
        max_new = cfg.eval.settings_for(bench).max_new_tokens
        report["eval"][name] = {
            "longest_prompt": max(lengths),
            "dropped_over_context": len(over),
            # evaluate() caps max_new_tokens for these (counted again in the eval summary)
            "capped": sum(
                1
                for n in lengths
                if n < student.context_length and n + max_new > student.context_length
            ),
        }
        if len(over) == len(lengths):
            raise PreflightError(f"{sources[name]}: every prompt of eval set {name!r} was dropped")
        dropped = set(over)
        kept_evals[name] = table.filter(pa.array([i not in dropped for i in range(len(lengths))]))
    return train, kept_evals, report


def _reject_or_drop(
    cfg: OPDRunConfig,
    over: list[int],
    table: pa.Table,
    lengths: list[int],
    where: str,
    why: str,
) -> None:
    if not over or cfg.preflight.drop_overlong_prompts:
        return
    locations = table.column("location").to_pylist()
    listed = ", ".join(f"{locations[i]} ({lengths[i]} tokens)" for i in over[:MAX_LISTED])
    more = f" and {len(over) - MAX_LISTED} more" if len(over) > MAX_LISTED else ""
    raise PreflightError(
        f"{where}: {len(over)} prompt(s) too long: {listed}{more}; prompt tokens (chat "
        f"template applied) {why}. Set preflight.drop_overlong_prompts: true to drop them "
        "(counted in download/manifest.json), or shorten them"
    )


def run_preflight(
    cfg: OPDRunConfig,
    student_dir: str | Path,
    teacher_dir: str | Path | None,
    train: pa.Table,
    evals: dict[str, pa.Table],
    sources: dict[str, str],
) -> tuple[pa.Table, dict[str, pa.Table], dict[str, Any]]:
    """The whole check (module doc). Raises PreflightError; returns the prompts that fit and
    the report for the manifest."""
    student = ModelInfo.load("student", cfg.models.student, student_dir)
    teacher = None
    if cfg.algorithm.use_opd and teacher_dir is not None:
        teacher = ModelInfo.load("teacher", cfg.models.teacher, teacher_dir)
    probes = train.column("prompt").to_pylist()[: cfg.preflight.probe_prompts]
    for table in evals.values():
        probes += table.column("prompt").to_pylist()[: max(1, cfg.preflight.probe_prompts // 4)]
    problems, facts = check_models(student, teacher, probes, cfg.data.chat_template_kwargs)
    allowed = {kind: problems.pop(kind) for kind in cfg.preflight.allow if kind in problems}
    if problems:
        pair = student.name + (f" and {teacher.name}" if teacher else "")
        listed = "\n".join(f"  - {kind}: {message}" for kind, message in problems.items())
        allowable = sorted(
            set(problems) & {"tokenizer", "special_tokens", "eos_pad", "chat_template"}
        )
        hint = (
            f"\nIf a difference is known to be safe, name it in preflight.allow: {allowable}"
            if allowable
            else ""
        )
        raise PreflightError(f"pre-flight check failed for {pair}:\n{listed}{hint}")
    train, evals, lengths = fit_prompts(cfg, student, teacher, train, evals, sources)
    report = {"models": facts, "allowed": allowed, "prompts": lengths}
    return train, evals, report
