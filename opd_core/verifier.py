"""The math answer verifier: pull the final answer out of a response and compare it to a label.

    extract_answer("... so the sum is 42.\\nAnswer: \\\\boxed{42}")   -> "42"
    is_correct("Answer: 1,234.0", "1234")                             -> True
    is_correct("Answer: \\\\boxed{\\\\dfrac{14}{3}}", "\\\\frac{14}{3}")   -> True   (math-verify)

Responses follow the dapo-math format: the answer is on a last line `Answer: \\boxed{N}` (or
`Answer: N`); only the last `Answer:` line counts. A response with no `Answer:` line is read
from its last bare `\\boxed{}`. The comparison has two tiers:

1. Exact, and fast (no sympy): both answers normalised (whitespace, `$`, a trailing `.`,
   thousands commas, a `+` sign, leading zeros, `12.0`) and compared as strings; two plain
   numbers that differ are wrong. Integer labels (dapo-math, AIME, GSM8K) stop here.
2. Mathematical equivalence with HF's math-verify (the grader TRL, open-r1 and verl use):
   `\\dfrac{14}{3}` = `14/3`, `0.5` = `\\frac12`, `\\sqrt{18}` = `3\\sqrt{2}`, `x = 5` = `5`,
   `10\\%` = `10`, `(A)` = `A`, tuples and intervals (open and closed ends differ), units.

The verifier is the reward: it must not be gameable by formatting, nor penalise it.

Time limit: math-verify bounds each parse and each comparison with `signal.alarm`, which
works only in a process's main thread (it raises ValueError elsewhere). Called from the main
thread, that is used as it is (ANSWER_SECONDS per step). Called from any other thread (Ray
actor methods, Prefect task threads, thread pools), the comparison runs in a helper process,
in that process's main thread with the same limits, and the caller waits at most
HARD_LIMIT_SECONDS: a hung helper is killed, the answer counts as wrong, a fresh helper serves
the next one.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import subprocess
import sys
import threading
from decimal import Decimal, InvalidOperation
from typing import Any

from math_verify import parse, verify
from sympy import Expr

__all__ = [
    "ANSWER_SECONDS",
    "answers_match",
    "extract_answer",
    "is_correct",
    "normalize_answer",
    "signed_math_reward",
]

# math-verify's per-step limits (whole seconds: signal.alarm), and what a caller off the main
# thread waits for one answer at most (two parses and a comparison, plus the round trip).
ANSWER_SECONDS = 2
HARD_LIMIT_SECONDS = 4 * ANSWER_SECONDS

# `Answer:` at the start of a line (case-insensitive), the rest of that line is the answer.
_ANSWER_LINE = re.compile(
    r"^\s*\**answer\**\s*[:：]\s*\**\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Plain integers/decimals, optionally signed and with well-formed thousands groups (1,234,567).
_NUMBER = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(.*)\}$", re.DOTALL)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` in `text`, in order, with nested braces matched."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:pos])
                    break
        # An unclosed brace (a truncated response) yields nothing: no answer was given.
    return found


def _unwrap(text: str) -> str:
    """Strip math delimiters and wrappers that carry no meaning: $42$, \\(42\\), \\text{42}, 42."""
    for _ in range(3):
        text = text.strip().strip("$").strip()
        if text.startswith("\\(") and text.endswith("\\)"):
            text = text[2:-2]
        if text.startswith("\\[") and text.endswith("\\]"):
            text = text[2:-2]
        wrapped = _TEXT_WRAPPER.match(text)
        if wrapped:
            text = wrapped.group(1)
        text = text.rstrip(".").strip()
    return text


def normalize_answer(answer: str | int | float) -> str:
    """Canonical string form of an answer; numbers become their shortest exact decimal form."""
    text = _unwrap(str(answer))
    text = re.sub(r"\s+", "", text).replace("\\,", "").replace("\\!", "")
    if _is_number(text):
        try:
            value = Decimal(text.replace(",", ""))
        except InvalidOperation:  # pragma: no cover - the regex only admits valid decimals
            return text
        if value == value.to_integral_value():
            return str(int(value))  # 12.0 -> 12, 007 -> 7, +5 -> 5, -0 -> 0
        return format(value.normalize(), "f")  # 0.50 -> 0.5, .5 -> 0.5
    return text


@functools.lru_cache(maxsize=65536)
def _normalized_label(label: str | int | float) -> str:
    """normalize_answer of a label, remembered: every sample of a prompt has the same one."""
    return normalize_answer(label)


def _is_number(text: str) -> bool:
    return bool(text) and bool(_NUMBER.match(text)) and any(ch.isdigit() for ch in text)


def _final_answer(text: str | None) -> tuple[str, str] | None:
    """(the final answer as the response wrote it, its normalised form), or None."""
    if not text:
        return None
    answer_lines = _ANSWER_LINE.findall(text)
    if answer_lines:
        # Only the last `Answer:` line counts: an earlier draft answer must not score.
        line = answer_lines[-1]
        boxed = _boxed_contents(line)
        if _BOXED.search(line) and not boxed:  # `\boxed{` never closed: a truncated answer
            return None
        raw = boxed[-1] if boxed else line
        normalized = normalize_answer(raw)
        return (raw, normalized) if normalized else None
    for candidate in reversed(_boxed_contents(text)):
        if normalized := normalize_answer(candidate):
            return candidate, normalized
    return None


def extract_answer(text: str | None) -> str | None:
    """The normalised final answer of a response, or None when it gives none.

    Order: the last `Answer:` line (its last `\\boxed{}` content if it has one, else the rest of
    the line); only when there is no `Answer:` line, the last bare `\\boxed{}` in the text.
    """
    answer = _final_answer(text)
    return None if answer is None else answer[1]


def answers_match(predicted: str, label: str | int | float, normalized: str | None = None) -> bool:
    """Whether an answer (as written; `normalized` = its normalize_answer if known) equals the
    label: exactly, or mathematically."""
    pred = normalized if normalized is not None else normalize_answer(predicted)
    gold = _normalized_label(label)
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    # A numeric label and an answer that is another number, or has no digit at all, cannot be
    # equal: decided here without sympy (this keeps integer-label grading fast).
    if _is_number(gold) and (_is_number(pred) or not any(ch.isdigit() for ch in pred)):
        return False
    if pred.count("{") != pred.count("}"):  # not LaTeX at all (and slow for the parser)
        return False
    return _equivalent(_unwrap(str(predicted)), _unwrap(str(label)))


def is_correct(text: str | None, label: str | int | float | None) -> bool:
    """True when the response's final answer equals the label (see answers_match)."""
    if label is None:
        return False
    answer = _final_answer(text)
    return answer is not None and answers_match(answer[0], label, answer[1])


def signed_math_reward(samples: list[dict[str, Any]]) -> list[float]:
    """+1 for a right final answer, -1 otherwise: the Modal OPD tutorial's GRPO reward
    (`reward.type: opd_core.verifier:signed_math_reward`)."""
    return [
        1.0 if is_correct(sample.get("response_text"), sample.get("label")) else -1.0
        for sample in samples
    ]


# ------------------------------------------------------------------- math-verify, bounded


@functools.lru_cache(maxsize=65536)
def _equivalent(predicted: str, label: str) -> bool:
    """math-verify's verdict on two LaTeX answers, within the time limit (see module doc).
    Cached: the n samples of one prompt often give the same few answers."""
    if threading.current_thread() is threading.main_thread():
        return _math_verify(predicted, label)
    return _HELPER.equivalent(predicted, label)


def _math_verify(predicted: str, label: str) -> bool:
    # `$...$` makes math-verify read the whole string as one LaTeX expression; the label is the
    # gold side (verify is not symmetric: `x = 5` is accepted for the gold 5, not vice versa).
    gold = parse(f"${label}$", parsing_timeout=ANSWER_SECONDS)
    answer = parse(f"${predicted}$", parsing_timeout=ANSWER_SECONDS)
    if not gold or not answer:
        return False
    # A number never equals an expression in free symbols (`1 your` parses as 1*y*o*u*r): no
    # need for sympy's simplification, the slow part (up to ~150 ms an answer). Equations
    # (`x = 5`), sets and intervals are not plain expressions and still go to verify. (parse
    # returns the sympy form and the matched string; two different strings never match.)
    parsed = [a for a in answer if not isinstance(a, str)]
    if _is_number(normalize_answer(label)) and all(
        isinstance(a, Expr) and a.free_symbols for a in parsed
    ):
        return False
    return verify(gold, answer, timeout_seconds=ANSWER_SECONDS)


class _HelperProcess:
    """A child Python process that answers (predicted, label) -> bool with _math_verify in its
    main thread, one JSON line each way. Callers are serialised; a helper that misses the
    deadline is killed and the next call starts a fresh one.

    A plain subprocess, not multiprocessing: spawn/forkserver re-import the parent's __main__
    (an unguarded script or a notebook would run again), and fork is unsafe in a threaded
    process holding locks (Ray, torch).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def equivalent(self, predicted: str, label: str) -> bool:
        with self._lock:
            for _attempt in (1, 2):
                process = self._process if self._alive() else self._start()
                try:
                    process.stdin.write(json.dumps([predicted, label]) + "\n")
                    process.stdin.flush()
                except (BrokenPipeError, OSError):
                    self._stop()
                    continue
                ready, _, _ = select.select([process.stdout], [], [], HARD_LIMIT_SECONDS)
                if not ready:  # hung beyond math-verify's own limits: the answer is wrong
                    self._stop()
                    return False
                line = process.stdout.readline()
                if line:
                    return json.loads(line)
                self._stop()  # the helper died on this answer: try once with a fresh one
            raise RuntimeError(
                f"the math-verify helper process died twice on the answer {predicted[:80]!r} "
                f"(label {label[:80]!r})"
            )

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from opd_core.verifier import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # math-verify logs a warning per timeout
            text=True,
            env=env,
        )
        return self._process

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._process = None


def _serve() -> None:
    """The helper process: one verdict per input line until stdin closes."""
    for line in sys.stdin:
        predicted, label = json.loads(line)
        sys.stdout.write(json.dumps(_math_verify(predicted, label)) + "\n")
        sys.stdout.flush()


_HELPER = _HelperProcess()
