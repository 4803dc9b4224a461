"""The math verifier: answer extraction, normalisation, correctness against labels (exact
integer rules and math-verify's equivalence), and the time limit in and off the main thread."""

import threading

import pytest

from opd_core import verifier
from opd_core.verifier import extract_answer, is_correct, normalize_answer, signed_math_reward

# (category, response's answer, label, correct): MATH-500-style LaTeX answers. The answer is
# put on an `Answer:` line as the DAPO instruction asks.
EQUIVALENCE_TABLE = [
    ("fraction", "\\dfrac{14}{3}", "\\frac{14}{3}", True),
    ("fraction", "14/3", "\\frac{14}{3}", True),
    ("fraction", "\\frac{28}{6}", "\\frac{14}{3}", True),
    ("fraction", "\\tfrac{1}{2}", "\\frac12", True),
    ("fraction", "\\frac{14}{5}", "\\frac{14}{3}", False),
    ("decimal vs fraction", "0.5", "\\frac12", True),
    ("decimal vs fraction", "\\frac{3}{4}", "0.75", True),
    ("decimal vs fraction", "0.33", "\\frac{1}{3}", False),
    ("interval", "[2,3]", "[2,3]", True),
    ("interval", "(2,3]", "[2,3]", False),
    ("interval", "[2,3)", "[2,3]", False),
    ("interval", "(-\\infty, 3]", "(-\\infty,3]", True),
    ("interval", "(-\\infty,3)", "(-\\infty, 3]", False),
    ("interval", "(-\\infty,-2)\\cup(3,\\infty)", "(-\\infty,-2) \\cup (3,\\infty)", True),
    ("tuple", "\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("tuple", "(3, \\frac{\\pi}{3})", "(3,\\frac{\\pi}{2})", False),
    ("tuple", "(2,1)", "(1,2)", False),
    ("root", "\\sqrt{18}", "3\\sqrt{2}", True),
    ("root", "\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("root", "2\\sqrt{3}", "3\\sqrt{2}", False),
    ("percent", "10\\%", "10", True),
    ("percent", "10", "10\\%", True),
    ("units", "5 \\text{ cm}", "5", True),
    ("units", "90^\\circ", "90", True),
    ("units", "\\$18.90", "18.90", True),
    ("equation", "x = 5", "5", True),
    ("equation", "x=5", "5", True),
    ("equation", "x = 6", "5", False),
    ("text choice", "(A)", "A", True),
    ("text choice", "\\text{(B)}", "B", True),
    ("text choice", "C", "\\text{(C)}", True),
    ("text choice", "D", "\\text{(B)}", False),
    ("infinity", "\\infty", "\\infty", True),
    ("infinity", "-\\infty", "\\infty", False),
    ("expression", "1+x^2", "x^2+1", True),
    ("expression", "x^2-1", "x^2+1", False),
    ("set", "\\{2,1\\}", "\\{1,2\\}", True),
    ("integer", "1,234", "1234", True),
    ("integer", "1,235", "1234", False),
    ("integer", "-2", "2", False),
    ("integer", "1 your", "1", False),  # junk after a number is not the number
]


@pytest.mark.parametrize(
    "category, answer, label, correct", EQUIVALENCE_TABLE, ids=lambda v: str(v)[:24]
)
def test_equivalence_table(category, answer, label, correct):
    assert is_correct(f"Let me work it out.\nAnswer: {answer}", label) is correct
    assert is_correct(f"Answer: \\boxed{{{answer}}}", label) is correct


def test_off_the_main_thread_the_helper_process_grades_the_same():
    """Ray actor methods and Prefect tasks run in threads, where math-verify's signal-based
    timeout cannot work: the helper process must give the same verdicts."""
    verifier._equivalent.cache_clear()
    cases = [(a, lbl) for _, a, lbl, _ in EQUIVALENCE_TABLE[:12]]
    got: list[bool] = []
    thread = threading.Thread(
        target=lambda: got.extend(is_correct(f"Answer: {a}", lbl) for a, lbl in cases)
    )
    thread.start()
    thread.join()
    verifier._equivalent.cache_clear()
    assert got == [is_correct(f"Answer: {a}", lbl) for a, lbl in cases]
    assert got == [c for _, _, _, c in EQUIVALENCE_TABLE[:12]]


def test_an_answer_too_hard_to_compare_is_wrong_not_a_hang(monkeypatch):
    """`9^{9^{9}}` vs `10^{10^{10}}` runs into math-verify's per-step limit: graded wrong, in
    the main thread (signal.alarm) and off it (the helper's own limit, or, when the helper
    misses the deadline, killed and replaced)."""
    hard = ("Answer: 9^{9^{9}}", "10^{10^{10}}")
    verifier._equivalent.cache_clear()
    assert is_correct(*hard) is False
    results: list[bool] = []
    run = lambda: results.append(is_correct(*hard))
    verifier._equivalent.cache_clear()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    monkeypatch.setattr(verifier, "HARD_LIMIT_SECONDS", 0.5)  # shorter than the 2 s step
    verifier._equivalent.cache_clear()
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert results == [False, False]
    # The killed helper is replaced: the next answer is graded normally (with the default
    # limit, which also covers the new helper's start-up on a loaded machine).
    monkeypatch.undo()
    thread = threading.Thread(target=lambda: results.append(is_correct("Answer: 0.5", "\\frac12")))
    thread.start()
    thread.join()
    assert results[-1] is True


def test_signed_math_reward():
    samples = [
        {"response_text": "Answer: \\boxed{2}", "label": "2"},
        {"response_text": "Answer: 3", "label": "2"},
    ]
    assert signed_math_reward(samples) == [1.0, -1.0]


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
