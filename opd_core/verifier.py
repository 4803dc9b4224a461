"""The math answer verifier: pull the final answer out of a response and compare it to a label.

    extract_answer("... so the sum is 42.\nAnswer: \\boxed{42}")  -> "42"
    is_correct("Answer: 1,234.0", "1234")                          -> True

Responses follow the dapo-math format: the answer is on a last line `Answer: \\boxed{N}` (or
`Answer: N`). A response with no `Answer:` line is still read from its last bare `\\boxed{N}`.
Answers are normalised before comparing so that formatting differences (whitespace, `$`,
a trailing `.`, thousands commas, a `+` sign, leading zeros, `12.0`) never cost a reward,
while any other difference does (the verifier is the reward: it must not be gameable by
formatting, nor penalise it).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["extract_answer", "is_correct", "normalize_answer"]

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


def normalize_answer(answer: str | int | float) -> str:
    """Canonical string form of an answer; numbers become their shortest exact decimal form."""
    text = str(answer).strip()
    # Strip math delimiters and wrappers that carry no meaning: $42$, \(42\), \text{42}, "42."
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
    text = re.sub(r"\s+", "", text).replace("\\,", "").replace("\\!", "")
    if text and _NUMBER.match(text) and any(ch.isdigit() for ch in text):
        try:
            value = Decimal(text.replace(",", ""))
        except InvalidOperation:  # pragma: no cover - the regex only admits valid decimals
            return text
        if value == value.to_integral_value():
            return str(int(value))  # 12.0 -> 12, 007 -> 7, +5 -> 5, -0 -> 0
        return format(value.normalize(), "f")  # 0.50 -> 0.5, .5 -> 0.5
    return text


def extract_answer(text: str | None) -> str | None:
    """The normalised final answer of a response, or None when it gives none.

    Order: the last `Answer:` line (its last `\\boxed{}` content if it has one, else the rest of
    the line); only when there is no `Answer:` line, the last bare `\\boxed{}` in the text.
    """
    if not text:
        return None
    answer_lines = _ANSWER_LINE.findall(text)
    if answer_lines:
        # Only the last `Answer:` line counts: an earlier draft answer must not score.
        line = answer_lines[-1]
        boxed = _boxed_contents(line)
        if boxed:
            return normalize_answer(boxed[-1]) or None
        if _BOXED.search(line):  # `\boxed{` never closed: a truncated answer
            return None
        return normalize_answer(line) or None
    boxed = _boxed_contents(text)
    for candidate in reversed(boxed):
        if normalize_answer(candidate):
            return normalize_answer(candidate)
    return None


def is_correct(text: str | None, label: str | int | float | None) -> bool:
    """True when the response's final answer equals the label after normalisation."""
    if label is None:
        return False
    answer = extract_answer(text)
    return answer is not None and answer == normalize_answer(label)
