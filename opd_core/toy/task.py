"""The built-in toy task: synthetic integer arithmetic in dapo-math-17k's row shape.

    train, eval = make_toy_splits(cfg.toy)          # two pyarrow Tables, schema PROMPTS
    train["prompt"][0]  -> [{"role": "user",
                             "content": DAPO_INSTRUCTION.format(problem="What is 12 + 34?")}]
    train["label"][0]   -> "46"
    target_response("46") -> "Answer: \\boxed{46}"      # what the toy models are trained to say

Problems are drawn without replacement from all `a <op> b` with operands of exactly
`digits` digits (10..99 for 2; fixed-width operands put the digits at fixed positions, which
is what lets a tiny model learn the task in a minute of CPU), so the train and eval splits
never share a problem. The draw depends only on (seed, digits, operations, num_train,
num_eval): same config, same rows, on any machine.
Subtraction puts the larger operand first so every answer is a non-negative integer.
"""

from __future__ import annotations

import random

import pyarrow as pa

from opd_core.config import ToyConfig
from opd_core.schemas import PROMPTS
from opd_core.toy.tokenizer import DAPO_INSTRUCTION

__all__ = [
    "make_toy_problems",
    "make_toy_splits",
    "problem_text",
    "target_response",
    "toy_prompt_table",
]


def problem_text(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def target_response(label: str | int) -> str:
    """The short answer-only response the toy models learn (the verifier's canonical form)."""
    return f"Answer: \\boxed{{{label}}}"


def _solve(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unsupported toy operation {op!r}")


def make_toy_problems(cfg: ToyConfig) -> list[tuple[int, str, int]]:
    """`num_train + num_eval` distinct problems (a, op, b), in a seed-determined order."""
    low = 10 ** (cfg.digits - 1) if cfg.digits > 1 else 0
    operands = range(low, 10**cfg.digits)
    operand_count = len(operands)
    operations = sorted(set(cfg.operations))
    # Subtraction keeps a >= b, so it has n(n+1)/2 distinct problems, addition n^2.
    sizes = {
        op: operand_count * operand_count if op == "+" else operand_count * (operand_count + 1) // 2
        for op in operations
    }
    space = sum(sizes.values())
    total = cfg.num_train + cfg.num_eval
    if total > space:
        raise ValueError(
            f"toy: num_train + num_eval = {total} exceeds the {space} distinct "
            f"{cfg.digits}-digit problems for operations {operations}; "
            "lower them or raise toy.digits"
        )
    rng = random.Random(cfg.seed)
    if space <= 1_000_000:
        # Small space: enumerate it and sample without replacement.
        everything = [
            (a, op, b)
            for op in operations
            for a in operands
            for b in operands
            if op == "+" or a >= b
        ]
        return rng.sample(everything, total)
    # Large space: rejection-sample distinct problems (collisions are rare here).
    seen: set[tuple[int, str, int]] = set()
    problems = []
    while len(problems) < total:
        op = rng.choice(operations)
        a, b = rng.choice(operands), rng.choice(operands)
        if op == "-" and b > a:
            a, b = b, a
        if (a, op, b) not in seen:
            seen.add((a, op, b))
            problems.append((a, op, b))
    return problems


def toy_prompt_table(problems: list[tuple[int, str, int]], start_index: int = 0) -> pa.Table:
    rows = {"index": [], "prompt": [], "label": []}
    for offset, (a, op, b) in enumerate(problems):
        rows["index"].append(start_index + offset)
        rows["prompt"].append(
            [{"role": "user", "content": DAPO_INSTRUCTION.format(problem=problem_text(a, op, b))}]
        )
        rows["label"].append(str(_solve(a, op, b)))
    return pa.Table.from_pydict(rows, schema=PROMPTS)


def make_toy_splits(cfg: ToyConfig) -> tuple[pa.Table, pa.Table]:
    """(train, eval) PROMPTS tables; `index` runs on across both so every problem has one id."""
    problems = make_toy_problems(cfg)
    train = toy_prompt_table(problems[: cfg.num_train], start_index=0)
    evaluation = toy_prompt_table(problems[cfg.num_train :], start_index=cfg.num_train)
    return train, evaluation
