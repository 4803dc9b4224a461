"""The math verifier: answer extraction, normalisation, and correctness against labels."""

import pytest

from opd_core.verifier import extract_answer, is_correct, normalize_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: \\boxed{42}", "42"),
        ("12+30=42\nAnswer: \\boxed{42}", "42"),
        ("Answer: 42", "42"),
        ("answer: 42", "42"),
        ("**Answer:** 42", "42"),
        ("Answer:   \\boxed{ 42 }  ", "42"),
        ("Answer: $42$", "42"),
        ("Answer: \\boxed{$42$}", "42"),
        ("Answer: 42.", "42"),
        ("Answer: \\boxed{42}.", "42"),
        ("Answer: 1,234", "1234"),
        ("Answer: \\boxed{1,234,567}", "1234567"),
        ("Answer: +7", "7"),
        ("Answer: -7", "-7"),
        ("Answer: 007", "7"),
        ("Answer: -007", "-7"),
        ("Answer: 12.0", "12"),
        ("Answer: 12.50", "12.5"),
        ("Answer: .5", "0.5"),
        ("Answer: -0", "0"),
        ("Answer: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("Answer: \\boxed{\\text{7}}", "7"),
        # Only the last Answer line counts, even if an earlier one differs.
        ("Answer: 3\nwait, recompute\nAnswer: \\boxed{5}", "5"),
        # The last box of the Answer line.
        ("Answer: \\boxed{3} or \\boxed{4}", "4"),
        # No Answer line: the last bare box anywhere.
        ("first \\boxed{1} then \\boxed{2} done", "2"),
        ("the result is $\\boxed{-15}$", "-15"),
        # The Answer line wins over a later bare box.
        ("Answer: 9\n\\boxed{8}", "9"),
        # Non-numeric answers are compared as whitespace-free strings.
        ("Answer: x + 1", "x+1"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "no answer here",
        "42",  # a bare number is not an answer
        "Answer:",
        "Answer: \\boxed{4",  # truncated box
        "Answer: \\boxed{}",
        "the answer is \\boxed{",
    ],
)
def test_extract_answer_none(text):
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        (" 42 ", "42"),
        (42, "42"),
        (12.0, "12"),
        ("1,000", "1000"),
        ("1,00", "1,00"),
        ("3.14000", "3.14"),
        ("$-3$.", "-3"),
        ("abc", "abc"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "text, label, correct",
    [
        ("Answer: \\boxed{42}", "42", True),
        ("Answer: \\boxed{42}", 42, True),
        ("Answer: 42", "42.0", True),
        ("Answer: 1,234", "1234", True),
        ("Answer: +5", "5", True),
        ("Answer: 05", "5", True),
        ("Answer: \\boxed{43}", "42", False),
        ("Answer: -42", "42", False),
        ("Answer: 420", "42", False),
        ("Answer: 4.2", "42", False),
        ("42", "42", False),  # no answer given
        ("Answer: 42", None, False),
        (None, "42", False),
        ("Answer: 41\nAnswer: 42", "42", True),
        ("Answer: 42\nAnswer: 41", "42", False),
    ],
)
def test_is_correct(text, label, correct):
    assert is_correct(text, label) is correct
