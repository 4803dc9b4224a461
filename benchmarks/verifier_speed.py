"""Grading speed of the answer verifier on integer labels, before and after math-verify.

    python -m benchmarks.verifier_speed [--before-ref REF] [--repeats 5]

The answers are real toy eval responses: the toy student and teacher (configs/toy.yaml, built
or taken from their cache) each answer the 200 eval prompts greedily and with 4 samples, as
baseline_eval does: 2,000 (response, integer label) pairs. "before" is opd_core/verifier.py as
it was at `--before-ref` (default: where this branch left main), loaded from git; "after" is
the current one. Each is timed on all pairs, best of `--repeats` (the math-verify cache cleared
before each), after one warm-up pass. The verdicts of both are compared pair by pair.

For scale, the current verifier on MATH-500-style LaTeX answers (tests/test_verifier.py's
table, math-verify's path) is timed too. Prints a table; writes
benchmarks/results/verifier_speed.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd_core import verifier
from opd_core.config import EvalSettings, load_config
from opd_core.engine.generation import Generator
from opd_core.evaluation import evaluate
from opd_core.toy.models import build_toy_models
from opd_core.toy.task import make_toy_splits

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "verifier_speed.json"


def verifier_at(ref: str):
    """opd_core/verifier.py as it was at git `ref`, imported as its own module."""
    source = subprocess.run(
        ["git", "show", f"{ref}:opd_core/verifier.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "verifier_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("verifier_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def toy_eval_pairs() -> list[tuple[str, str]]:
    """(response, label) of the toy student's and teacher's eval responses."""
    cfg = load_config(ROOT / "configs" / "toy.yaml")
    models = build_toy_models(cfg.toy)
    _, prompts = make_toy_splits(cfg.toy)
    settings = EvalSettings(n_samples=4, max_new_tokens=cfg.eval.max_new_tokens)
    pairs = []
    for model_dir in (models.student_dir, models.teacher_dir):
        generator = Generator(model_dir)
        samples, _ = evaluate(generator.generate_ids, generator.tokenizer, prompts, settings)
        pairs += list(
            zip(samples.column("response_text").to_pylist(), samples.column("label").to_pylist())
        )
    return pairs


def latex_pairs() -> list[tuple[str, str]]:
    sys.path.insert(0, str(ROOT))
    from tests.test_verifier import EQUIVALENCE_TABLE

    return [(f"Answer: {answer}", label) for _, answer, label, _ in EQUIVALENCE_TABLE]


def answers_per_second(is_correct, pairs, repeats: int, clear=None) -> tuple[float, list[bool]]:
    verdicts = [is_correct(text, label) for text, label in pairs]  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if clear:
            clear()
        started = time.perf_counter()
        for text, label in pairs:
            is_correct(text, label)
        best = min(best, time.perf_counter() - started)
    return len(pairs) / best, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-ref", default=None, help="git ref (default: merge-base main)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ref = (
        args.before_ref
        or subprocess.run(
            ["git", "merge-base", "HEAD", "main"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    before = verifier_at(ref)
    pairs = toy_eval_pairs()
    clear = verifier._equivalent.cache_clear
    before_rate, before_verdicts = answers_per_second(before.is_correct, pairs, args.repeats)
    after_rate, after_verdicts = answers_per_second(verifier.is_correct, pairs, args.repeats, clear)
    # The pairs whose answer is a plain number (the exact tier, no sympy), and the rest.
    plain = [
        (t, lbl)
        for t, lbl in pairs
        if (raw := verifier.extract_answer(t)) is None or verifier._is_number(raw)
    ]
    other = [pair for pair in pairs if pair not in set(plain)]
    subsets = {}
    for name, subset in (("plain-number or no answer", plain), ("other answers", other)):
        subsets[name] = {
            "pairs": len(subset),
            "before": round(answers_per_second(before.is_correct, subset, args.repeats)[0]),
            "after": round(answers_per_second(verifier.is_correct, subset, args.repeats, clear)[0]),
        }
    latex = latex_pairs()
    latex_rate, _ = answers_per_second(verifier.is_correct, latex, args.repeats, clear)
    differ = [i for i, (a, b) in enumerate(zip(before_verdicts, after_verdicts)) if a != b]
    results = {
        "before_ref": ref,
        "toy_pairs": len(pairs),
        "toy_correct": sum(after_verdicts),
        "before_answers_per_second": round(before_rate),
        "after_answers_per_second": round(after_rate),
        "after_over_before": round(after_rate / before_rate, 3),
        "verdicts_that_differ": len(differ),
        "subsets": subsets,
        "latex_pairs": len(latex),
        "latex_answers_per_second": round(latex_rate),
    }
    table = Table(title=f"verifier grading speed (best of {args.repeats} passes)")
    for column in ("answers", "verifier", "answers/s"):
        table.add_column(column, justify="left" if column != "answers/s" else "right")
    table.add_row(
        f"toy eval, integer labels ({len(pairs)})", f"before ({ref[:7]})", f"{before_rate:,.0f}"
    )
    table.add_row(f"toy eval, integer labels ({len(pairs)})", "after", f"{after_rate:,.0f}")
    for name, row in subsets.items():
        for which in ("before", "after"):
            label = f"before ({ref[:7]})" if which == "before" else "after"
            table.add_row(f"  {name} ({row['pairs']})", label, f"{row[which]:,}")
    table.add_row(f"LaTeX table ({len(latex)}, math-verify)", "after", f"{latex_rate:,.0f}")
    Console().print(table)
    print(f"verdicts that differ on the toy pairs: {len(differ)} of {len(pairs)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
